#!/usr/bin/env bash
# Multi-node training without Slurm: start launch/run_local.sh on every host over ssh.
#   HOSTS="gpu1 gpu2" bash launch/multinode_example.sh configs/padded.yaml data.root=/data/shards
# Assumes the repository (with its .venv) and the data at the same path on every host, and
# an output_dir on a shared file system (checkpoints written by rank 0 are read by all ranks
# on resume). The first host hosts torchrun's rendezvous on PORT (29500): open it between
# the hosts, and set NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME when they have several networks
# (launch/slurm/README.md). Ctrl-C ends the ssh sessions and with them every torchrun (a
# hang-up; the runs do not save first). To stop with a checkpoint, send SIGTERM to the
# torchrun processes on the hosts: they save at the next step and exit 75.
#
# Without ssh, the same by hand, on each host:
#   NNODES=2 HEAD=gpu1 JOB_ID=run42 bash launch/run_local.sh configs/padded.yaml data.root=/data/shards
set -euo pipefail
CONFIG=${1:?usage: HOSTS="h1 h2 ..." multinode_example.sh CONFIG [section.key=value ...]}; shift
read -r -a hosts <<< "${HOSTS:?set HOSTS to the hosts, first one = rendezvous head}"
HEAD=${HEAD:-${hosts[0]}}
JOB_ID=${JOB_ID:-unetdist-$(date +%Y%m%d-%H%M%S)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
remote_args=$(printf '%q ' "$CONFIG" "$@")

pids=()
stop_all() { trap - INT TERM; kill -TERM "${pids[@]}" 2>/dev/null || true; wait; exit 130; }
trap stop_all INT TERM
for host in "${hosts[@]}"; do
  # -tt: when ssh ends, the remote torchrun gets a hang-up instead of running on unseen
  ssh -tt "$host" "cd $(printf '%q' "$REPO") && NNODES=${#hosts[@]} HEAD=$HEAD JOB_ID=$JOB_ID \
    PORT=${PORT:-29500} NPROC_PER_NODE=${NPROC_PER_NODE:-} bash launch/run_local.sh $remote_args" \
    > >(sed -u "s/^/[$host] /") 2>&1 < /dev/null &
  pids+=($!)  # ssh's own pid (the output goes through a process substitution)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
