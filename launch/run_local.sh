#!/usr/bin/env bash
# torchrun on one machine, one process per GPU (or NPROC_PER_NODE CPU processes):
#   bash launch/run_local.sh configs/padded.yaml data.root=/data/shards train.max_steps=1000
#   NPROC_PER_NODE=2 bash launch/run_local.sh configs/quickstart.yaml          (CPU, 2 ranks)
# Several machines without Slurm: run it on every host with the same NNODES, HEAD (an address
# of the first host that the others reach) and JOB_ID; see launch/multinode_example.sh.
#   NNODES=2 HEAD=10.0.0.1 JOB_ID=run42 bash launch/run_local.sh configs/padded.yaml ...
# Env: UNETDIST_PYTHON (default: ./.venv/bin/python if present, else python), PORT (29500),
# RDZV_TIMEOUT_S (600: how long to wait for every host to join). --resume auto is always on.
set -euo pipefail
CONFIG=${1:?usage: run_local.sh CONFIG [section.key=value ...]}; shift
if [ -z "${UNETDIST_PYTHON:-}" ] && [ -x .venv/bin/python ]; then UNETDIST_PYTHON=.venv/bin/python; fi
PYTHON=${UNETDIST_PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}}
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
    -m unetdist.train --config "$CONFIG" --resume auto "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0 \
  --rdzv_backend=c10d --rdzv_endpoint="${HEAD:?set HEAD to an address of the first host}:${PORT:-29500}" \
  --rdzv_id="${JOB_ID:?set JOB_ID to the same name on every host}" --rdzv_conf="join_timeout=${RDZV_TIMEOUT_S:-600}" \
  -m unetdist.train --config "$CONFIG" --resume auto "$@"
