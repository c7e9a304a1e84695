#!/usr/bin/env bash
# On a GPU machine: install mmloss (CUDA kernels included when torch is a CUDA build and nvcc
# is found), run the Triton and CUDA GPU tests, run the benchmark (triton and cuda side by
# side), all in < 10 minutes.
#   bash bench/gpu.sh [OUT_DIR]        (default: $OUT, else bench/out)
# Writes OUT_DIR/{info.txt,gpu_tests.txt,cuda_tests.txt,bench.csv,bench.png,summary.txt,
# static_model.txt,auto_table.json,RESULTS_GPU.md} and prints the short table last.
# auto_table.json records whether the CUDA suite passed and where cuda beat triton: commit it
# as mmloss/auto_table.json (backend="auto" reads only the committed file). An Inf-CL wheel, if carried, is taken
# from $INFCL_WHEEL or bench/wheels/inf_cl-*.whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/out}}
mkdir -p "$OUT_DIR"
START=$(date +%s)
TOTAL_S=${GPU_SH_TOTAL_S:-570}
elapsed() { echo $(( $(date +%s) - START )); }

echo "== install ($(date -u +%H:%M:%S))"
# Editable: _C lands in ./mmloss, which is what the tests and the benchmark import (pytest puts
# the repository first on sys.path; a plain install would leave ./mmloss without _C).
MAX_JOBS=${MAX_JOBS:-8} NVCC_THREADS=${NVCC_THREADS:-2} MMLOSS_CUDA_ARCHS=${MMLOSS_CUDA_ARCHS:-90} \
    pip install --no-build-isolation -e . > "$OUT_DIR/install.txt" 2>&1 || { tail -20 "$OUT_DIR/install.txt"; exit 1; }
WHEEL=${INFCL_WHEEL:-$(ls bench/wheels/inf_cl-*.whl 2>/dev/null | head -1)}
if [ -n "$WHEEL" ]; then pip install --no-deps "$WHEEL" >> "$OUT_DIR/install.txt" 2>&1 || echo "Inf-CL wheel failed to install"; fi
python -m mmloss.info | tee "$OUT_DIR/info.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT_DIR/info.txt" 2>/dev/null

echo "== GPU tests ($(elapsed) s)"
# One config per compiled variant: the tests check numbers, not speed (autotuning every
# feature x dtype variant would take most of the budget). Compiling the ~100 variants is
# the slow part and runs on the CPU: pytest-xdist (in the H100 image) spreads it over cores.
PARALLEL=$(python -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
MMLOSS_TRITON_AUTOTUNE=0 timeout $(( TOTAL_S * 2 / 5 )) python -m pytest tests/test_triton_gpu.py -q -x $PARALLEL \
    -p no:cacheprovider > "$OUT_DIR/gpu_tests.txt" 2>&1
TESTS_RC=$?
tail -3 "$OUT_DIR/gpu_tests.txt"
timeout $(( TOTAL_S / 5 )) python -m pytest tests/test_cuda_gpu.py -q -x $PARALLEL -p no:cacheprovider \
    > "$OUT_DIR/cuda_tests.txt" 2>&1
CUDA_RC=$?
tail -3 "$OUT_DIR/cuda_tests.txt"
# "passed" only when the suite ran and passed (not when it was skipped: no CUDA kernels).
if [ $CUDA_RC -eq 0 ] && grep -q " passed" "$OUT_DIR/cuda_tests.txt" && ! grep -q "skipped" "$OUT_DIR/cuda_tests.txt"; then
  CUDA_TESTS=passed
else
  CUDA_TESTS="failed (exit $CUDA_RC)"
fi

echo "== static model"
python bench/static_model.py --csv "$OUT_DIR/static_model.csv" > "$OUT_DIR/static_model.txt"

BUDGET=$(( TOTAL_S - $(elapsed) - 60 ))
echo "== benchmark, budget ${BUDGET} s ($(elapsed) s)"
python bench/gpu_bench.py --out "$OUT_DIR" --budget-s "$BUDGET" --cuda-tests "$CUDA_TESTS" \
    > "$OUT_DIR/bench_log.txt" 2>&1
BENCH_RC=$?

{
  echo "# mmloss Triton and CUDA backends: GPU results"
  echo
  echo "$(head -1 "$OUT_DIR/summary.txt" 2>/dev/null)"
  echo
  echo '```'
  cat "$OUT_DIR/info.txt"
  echo '```'
  echo
  echo "GPU tests (exit $TESTS_RC): $(tail -1 "$OUT_DIR/gpu_tests.txt")"
  echo
  echo "CUDA backend tests ($CUDA_TESTS): $(tail -1 "$OUT_DIR/cuda_tests.txt")"
  echo
  echo "## Forward + backward, bf16 (benchmark exit $BENCH_RC; full rows in bench.csv, plot bench.png)"
  echo
  echo '```'
  tail -n +2 "$OUT_DIR/summary.txt" 2>/dev/null
  echo '```'
  echo
  echo "## Static model (H100 peak rates), for comparison"
  echo
  echo '```'
  cat "$OUT_DIR/static_model.txt"
  echo '```'
} > "$OUT_DIR/RESULTS_GPU.md"

echo "== done in $(elapsed) s; tests exit $TESTS_RC, cuda tests $CUDA_TESTS, bench exit $BENCH_RC"
cat "$OUT_DIR/summary.txt" 2>/dev/null || tail -20 "$OUT_DIR/bench_log.txt"
