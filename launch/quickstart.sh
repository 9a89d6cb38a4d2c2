#!/usr/bin/env bash
# The Quickstart: install, write synthetic cell shards, train a small U-Net on 2 CPU ranks
# with DDP (gloo), logging to the local MLflow store (./mlflow.db, ./mlruns). A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
PY=.venv/bin/python
[ -f data/quickstart/dataset.json ] ||
  "$PY" -m unetdist.prepare --synthetic 48 --image-size 256 --tile 64 --shard-size 32 --out data/quickstart
.venv/bin/torchrun --standalone --nproc_per_node=2 -m unetdist.train --config configs/quickstart.yaml "$@"
echo
echo "View the run:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"
