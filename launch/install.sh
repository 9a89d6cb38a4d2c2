#!/usr/bin/env bash
# Set up a virtual environment with unetdist and its test tools.
# One install path for the Quickstart, .ci/run and docker/ (so CI exercises the image's steps).
#   bash launch/install.sh                    -> ./.venv, CPU build of torch
#   VENV=/opt/venv TORCH_SPEC="torch==2.11.0" bash launch/install.sh   (docker/Dockerfile, CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# The pinned CPU build installs from local wheels in seconds; an unpinned torch would pull a
# multi-GB CUDA build. pyproject.toml keeps torch>=2.4 open for clusters.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -c launch/constraints.txt -e ".[test,remote]"
# Azurite (Microsoft's Azure Blob Storage emulator, from npm) for the az:// tests
# (tests/services/azurite.py); where npm is missing those tests skip, saying so.
if command -v npm >/dev/null 2>&1 && [ ! -x "$VENV/azurite/node_modules/.bin/azurite-blob" ]; then
  npm install --prefix "$VENV/azurite" --no-audit --no-fund --loglevel=error azurite@3.35.0 >/dev/null \
    || echo "launch/install.sh: npm could not install Azurite; the az:// tests will skip" >&2
fi
"$VENV/bin/python" -c 'import torch, mlflow, webdataset, zarr, obstore; print(f"unetdist env ready: torch {torch.__version__}, mlflow {mlflow.__version__}")'
