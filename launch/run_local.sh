#!/usr/bin/env bash
# torchrun on one machine with all its GPUs (or NPROC CPU processes):
#   bash launch/run_local.sh configs/padded.yaml data.root=/data/shards train.max_steps=1000
# Multi-node without Slurm: run on every host, with the same HEAD address and job id:
#   NNODES=2 HEAD=10.0.0.1 bash launch/run_local.sh configs/padded.yaml
set -euo pipefail
CONFIG=${1:?usage: run_local.sh CONFIG [section.key=value ...]}; shift
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" -m unetdist.train --config "$CONFIG" --resume auto "$@"
fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
  --rdzv_endpoint="${HEAD:?set HEAD to the first node's address}:${PORT:-29500}" --rdzv_id="${JOB_ID:-unetdist}" \
  -m unetdist.train --config "$CONFIG" --resume auto "$@"
