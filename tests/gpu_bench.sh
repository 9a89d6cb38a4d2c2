#!/usr/bin/env bash
# GPU checks for issues 4, 9 and 19 (volumes), as one short script for a session with a lent H100/H200:
#   the CUDA tests (pytest -m gpu), the bench rows of issue 9 (most important first), and the
#   data bench with the GPU-side augmentation rate (issue 4), then a compact summary.
#
#   bash tests/gpu_bench.sh                 # from the repository root; ~7 min on one H100/H200
#   QUICK=1 bash tests/gpu_bench.sh         # tests + the paper rows only
#   EXTRA=1 bash tests/gpu_bench.sh         # also fp16+fused and activation checkpointing rows
#   DEADLINE_S=400 bash tests/gpu_bench.sh  # rows not started by then are skipped (default 420)
#   DRY_RUN=1 PY=.venv/bin/python bash tests/gpu_bench.sh   # the plumbing, on CPU with tiny rows
#
# The device machine has python3 + torch (CUDA), numpy, scipy, pyyaml, pytest and pillow, and no
# network. unetdist runs from the work tree (PYTHONPATH); the data bench also needs webdataset
# and zarr, installed from local wheels (Python 3.12) when missing: make them here first, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 \
#       numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
#   then run with  carry=[".whl"]  (WHEELS=.whl is the default).
# Every row has its own time limit, so one slow compile cannot eat the whole budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
DEADLINE_S=${DEADLINE_S:-420}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-150}
OUT=${OUT:-${TMPDIR:-/tmp}/unetdist-gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cache"  # the bare loop's compile reuses the trainer's kernels
START=$SECONDS

missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(module for module in ("numpy", "scipy", "yaml", "pytest", "PIL", "webdataset", "zarr")
               if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing: $missing; installing the wheels in $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/unetdist-site \
      "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/unetdist-site" \
    || echo "WARNING: could not install the wheels; the data bench will fail"
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
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_fast_paths.py \
  2>&1 | tail -n 15 | tee "$OUT/pytest.txt"
tests_status=${PIPESTATUS[0]}

# --- 2. bench rows ----------------------------------------------------------------------------
SUMMARY="$OUT/summary.tsv"
printf 'row\ttrainer_tiles_s\tbare_tiles_s\ttrainer_vs_bare\ttrainer_mfu\tpeak_mem_mb\tgflop_per_tile\n' > "$SUMMARY"
row() {  # row NAME bench-train-args...   (a --compile row gets twice the time: two compiles)
  local name=$1; shift
  if [ $(( SECONDS - START )) -gt "$DEADLINE_S" ]; then
    printf '%s\tSKIPPED(deadline)\n' "$name" >> "$SUMMARY"; return
  fi
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
# volumes (issue 19): nnU-Net's 3d_fullres size class, and Cicek et al.'s 132x132x116 input (-> 44x44x28)
VOLUME=(--spatial-dims 3 --preset padded --base-width 32 --depth 4 --norm instance --tile 128 --tile-depth 64
        --batch 2 --steps 10 --warmup 5 --rounds 2)
CICEK=(--spatial-dims 3 --preset cicek --tile 132 --tile-depth 116 --batch 1 --steps 10 --warmup 5 --rounds 2)
if [ -n "${DRY_RUN:-}" ]; then
  VOLUME=(--spatial-dims 3 --preset padded --base-width 4 --depth 2 --tile 16 --tile-depth 8 --batch 2 --steps 2
          --warmup 1 --rounds 1)
  CICEK=(--spatial-dims 3 --preset cicek --base-width 4 --depth 1 --tile 20 --tile-depth 20 --batch 1 --steps 2
         --warmup 1 --rounds 1)
  PADDED=(--preset padded --base-width 4 --depth 2 --tile 32 --batch 2 --steps 2 --warmup 1 --rounds 1)
  PAPER=(--preset paper --base-width 4 --depth 2 --tile 60 --batch 2 --steps 2 --warmup 1 --rounds 1)
fi
# the issue's acceptance rows first, so a short lease still gets them
row paper-fp32 "${PAPER[@]}" --precision fp32
[ -z "${DRY_RUN:-}" ] && row paper-bf16-cl-compile "${PAPER[@]}" --precision bf16 --channels-last --compile
row paper-bf16-cl "${PAPER[@]}" --precision bf16 --channels-last

# --- 3. data: loader tiles/s per CPU core and the GPU-side augmentation rate (issue 4) ------------
if [ $(( SECONDS - START )) -le "$DEADLINE_S" ]; then
  DATA=(--format webdataset --workers 8 --tiles 1024 --batch 32 --batches 48 --repeats 3)
  [ -n "${DRY_RUN:-}" ] && DATA=(--format webdataset --workers 1 --tiles 64 --tile 64 --batch 8 --batches 4 --repeats 1)
  echo "== bench data ${DATA[*]} --device $DEVICE"
  timeout "$ROW_TIMEOUT_S" "$PY" -m unetdist.bench data "${DATA[@]}" --device "$DEVICE" > "$OUT/data.txt" 2> "$OUT/data.err" \
    || { echo "bench data FAILED"; tail -n 5 "$OUT/data.err"; }
fi

if [ -z "${QUICK:-}" ]; then
  row padded-fp32 "${PADDED[@]}" --precision fp32
  [ -z "${DRY_RUN:-}" ] && row padded-bf16-cl-compile "${PADDED[@]}" --precision bf16 --channels-last --compile
  row padded-bf16-cl "${PADDED[@]}" --precision bf16 --channels-last
  row padded-fp16-cl "${PADDED[@]}" --precision fp16 --channels-last
  row padded-bf16 "${PADDED[@]}" --precision bf16
fi
if [ -z "${QUICK:-}" ]; then  # volumes: bf16, channels_last_3d, compile, activation checkpointing (larger patch)
  row volume-fp32 "${VOLUME[@]}" --precision fp32
  row volume-bf16-cl "${VOLUME[@]}" --precision bf16 --channels-last
  [ -z "${DRY_RUN:-}" ] && row volume-bf16-cl-compile "${VOLUME[@]}" --precision bf16 --channels-last --compile
  row volume-bf16-cl-ckpt "${VOLUME[@]}" --precision bf16 --channels-last --activation-checkpointing
  row cicek-bf16-cl "${CICEK[@]}" --precision bf16 --channels-last
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
[ -f "$OUT/data.txt" ] && echo "data: $(tail -n 1 "$OUT/data.txt")"
