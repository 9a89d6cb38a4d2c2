#!/usr/bin/env bash
# GPU checks for issue 9, as one short script for a session with a lent H100/H200:
#   the CUDA tests (pytest -m gpu) and the bench rows of the issue, then a compact summary.
#
#   bash tests/gpu_bench.sh                 # from the repository root; ~6-7 min on one H100/H200
#   QUICK=1 bash tests/gpu_bench.sh         # tests + the two eager paper rows only (~3 min)
#   EXTRA=1 bash tests/gpu_bench.sh         # also fp16+fused and activation checkpointing rows
#   DRY_RUN=1 PY=.venv/bin/python bash tests/gpu_bench.sh   # the plumbing, on CPU with tiny rows
#
# The device machine has python3 + torch (CUDA) preinstalled and no network. unetdist runs from
# the work tree (PYTHONPATH); its other imports (numpy, scipy, pyyaml, pytest) are installed
# from local wheels when missing: make them here first and carry the folder, e.g.
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .wheels pyyaml scipy pytest
#   then run with  carry=[".wheels"]  (WHEELS=.wheels is the default).
# Every row has its own time limit, so one slow compile cannot eat the whole budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.wheels}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-150}
OUT=${OUT:-${TMPDIR:-/tmp}/unetdist-gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cache"  # the bare loop's compile reuses the trainer's kernels
START=$SECONDS

missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(pip for module, pip in [("numpy", "numpy"), ("scipy", "scipy"), ("yaml", "pyyaml"),
                                       ("pytest", "pytest")] if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "installing missing: $missing (from $WHEELS)"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing || "$PY" -m pip install -q $missing \
    || echo "WARNING: could not install $missing; the steps that need them will fail"
fi
DEVICE=cuda
if [ -n "${DRY_RUN:-}" ]; then
  DEVICE=cpu
else
  "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")' \
    || { echo "no CUDA device: nothing to do (DRY_RUN=1 checks the script on CPU)"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
fi

# --- 1. the CUDA tests ------------------------------------------------------------------------
echo "== pytest -m gpu"
timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_fast_paths.py \
  2>&1 | tail -n 15 | tee "$OUT/pytest.txt"
tests_status=${PIPESTATUS[0]}

# --- 2. bench rows ----------------------------------------------------------------------------
SUMMARY="$OUT/summary.tsv"
printf 'row\ttrainer_tiles_s\tbare_tiles_s\ttrainer_vs_bare\ttrainer_mfu\tpeak_mem_mb\tgflop_per_tile\n' > "$SUMMARY"
row() {  # row NAME bench-train-args...   (a --compile row gets twice the time: two compiles)
  local name=$1; shift
  local limit=$ROW_TIMEOUT_S
  case " $* " in *" --compile "*) limit=$(( 2 * ROW_TIMEOUT_S ));; esac
  echo "== $name: bench train $*"
  timeout "$limit" "$PY" -m unetdist.bench train --device "$DEVICE" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  local status=$?
  if [ $status -ne 0 ]; then
    printf '%s\tFAILED(exit %s)\n' "$name" "$status" >> "$SUMMARY"
    tail -n 5 "$OUT/$name.err"
    return
  fi
  tail -n 1 "$OUT/$name.txt" | "$PY" -c '
import sys
name = sys.argv[1]
pairs = dict(item.split("=", 1) for item in sys.stdin.read().split())
keys = ["trainer_samples_per_s", "bare_samples_per_s", "trainer_vs_bare", "trainer_mfu", "peak_mem_mb",
        "model_gflops_per_sample"]
print("\t".join([name] + [pairs.get(key, "?") for key in keys]))' "$name" >> "$SUMMARY"
  tail -n 1 "$SUMMARY"
}

# GPU timings are steady: 2 rounds of 15 steps after 5 warmup steps (compile happens in warmup)
PADDED=(--preset padded --base-width 32 --tile 256 --batch 32 --steps 15 --warmup 5 --rounds 2)
PAPER=(--preset paper --tile 572 --batch 8 --steps 15 --warmup 5 --rounds 2)
if [ -n "${DRY_RUN:-}" ]; then
  PADDED=(--preset padded --base-width 4 --depth 2 --tile 32 --batch 2 --steps 2 --warmup 1 --rounds 1)
  PAPER=(--preset paper --base-width 4 --depth 2 --tile 60 --batch 2 --steps 2 --warmup 1 --rounds 1)
fi
row paper-fp32 "${PAPER[@]}" --precision fp32
row paper-bf16-cl "${PAPER[@]}" --precision bf16 --channels-last
if [ -z "${QUICK:-}" ]; then
  row padded-fp32 "${PADDED[@]}" --precision fp32
  row padded-bf16 "${PADDED[@]}" --precision bf16
  row padded-bf16-cl "${PADDED[@]}" --precision bf16 --channels-last
  row padded-fp16-cl "${PADDED[@]}" --precision fp16 --channels-last
  [ -z "${DRY_RUN:-}" ] && row padded-bf16-cl-compile "${PADDED[@]}" --precision bf16 --channels-last --compile
  [ -z "${DRY_RUN:-}" ] && row paper-bf16-cl-compile "${PAPER[@]}" --precision bf16 --channels-last --compile
fi
if [ -n "${EXTRA:-}" ]; then
  row padded-fp16-cl-fused "${PADDED[@]}" --precision fp16 --channels-last --fused
  row paper-bf16-cl-ckpt "${PAPER[@]}" --precision bf16 --channels-last --activation-checkpointing
fi

echo
echo "== summary ($(( SECONDS - START )) s; tests exit $tests_status; files in $OUT)"
"$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)", "| torch", torch.__version__)'
tail -n 1 "$OUT/pytest.txt"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
