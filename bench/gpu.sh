#!/usr/bin/env bash
# The GPU run in stages, each writing its results under OUT_DIR before the next begins (a run
# cut short still returns numbers), each within its own time; the summary prints last.
#   bash bench/gpu.sh [--dry-run] [OUT_DIR]     (OUT_DIR: default $OUT, else bench/out)
# Stage 1, until GPU_SH_STAGE1_S (240) s after the start, the install included: a plain
#   (non-editable) install of this checkout and of the anchors' wheels in bench/wheels, offline;
#   the ceilings, the correctness grid of every GPU backend against float64, the anchors'
#   errors, and N = 8,192 ... 65,536, d = 768 bf16 of every method (bench/gpu_bench.py).
# Stage 2, until GPU_SH_STAGE2_S (240) s more: what stage 1 had no time for, features, small
#   batches with and without CUDA graphs, N = 1,048,576 at d = 256, the full grid.
# Stage 3, only with GPU_SH_PYTEST=1, until GPU_SH_STAGE3_S (240) s more: the GPU test suites
#   (tests/kernels/{triton,cuda}/test_*_gpu.py, one config per Triton variant).
# After each stage bench/gpu_report.py rewrites RESULTS_GPU.md, auto_table.json and bench.png.
# OUT_DIR then holds 8 files (the device tool returns at most 8): run.log, ceilings.json,
# correctness.csv, stage1.csv, stage2.csv, RESULTS_GPU.md (commit as bench/RESULTS_GPU.md),
# auto_table.json (commit as src/mmloss/auto_table.json after reading the run), bench.png.
# --dry-run: installs nothing and runs both stages on the CPU (Triton interpreter, tiny sizes)
# with the Python environment at hand, to check the harness.
# On the lent GPU machine: `bash bench/gpu.sh` (OUT is set there) with a command limit of at
# least 540 s; GPU_SH_STAGE2_S=0 runs stage 1 alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=()
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--dry-run)
  shift
fi
OUT_DIR=${1:-${OUT:-bench/out}}
PY=${PYTHON:-python3}
if [ ${#DRY[@]} -eq 0 ]; then DEFAULT_S=240; else DEFAULT_S=900; fi
STAGE1_S=${GPU_SH_STAGE1_S:-$DEFAULT_S}
STAGE2_S=${GPU_SH_STAGE2_S:-$DEFAULT_S}
STAGE3_S=${GPU_SH_STAGE3_S:-240}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/run.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1

say() { echo "== $* (+$(( $(date +%s) - START )) s, $(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"; }

# A stage: bench/gpu_bench.py with the stage's deadline (it skips what would not fit), then the
# report; `timeout` ends a stage that overruns its deadline by more than 20 s.
stage() {
  local n=$1 end=$(( START + $2 )) left
  left=$(( end - $(date +%s) ))
  if [ "$left" -le 10 ]; then
    say "stage $n skipped: ${left} s left"
    return 0
  fi
  say "stage $n, ${left} s"
  timeout --kill-after=10 $(( left + 20 )) "$PY" -m bench.gpu_bench --stage "$n" --out "$OUT_DIR" \
    --deadline "$end" "${DRY[@]}" 2>&1 | tee -a "$LOG" || say "stage $n ended with exit $?"
  "$PY" -m bench.gpu_report --out "$OUT_DIR" > /dev/null 2>> "$LOG" || say "report after stage $n failed"
}

say "install"
if [ ${#DRY[@]} -eq 0 ]; then
  nvidia-smi >> "$LOG" 2>&1 || true
  if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"  # the CUDA kernels build when nvcc is found
  fi
  # Plain install: the tests and the benchmark import the installed package (src/ layout). If
  # the CUDA kernels do not build, the Triton backend is still measured (the CUDA rows say why).
  install() {
    MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-2} MMLOSS_CUDA_ARCHS=${MMLOSS_CUDA_ARCHS:-90} \
      "$PY" -m pip install --no-build-isolation --no-deps --no-index . >> "$LOG" 2>&1
  }
  if ! install; then
    tail -40 "$LOG"
    say "install failed; again without the CUDA kernels"
    MMLOSS_WITH_CUDA=0 install || { say "install failed"; exit 1; }
  fi
  for wheel in bench/wheels/*.whl; do
    "$PY" -m pip install --no-deps --no-index "$wheel" >> "$LOG" 2>&1 || say "$wheel failed to install"
  done
else
  echo "dry run: nothing installed" >> "$LOG"
fi
"$PY" -m mmloss.info 2>&1 | tee -a "$LOG" || say "mmloss does not import"

stage 1 "$STAGE1_S"
if [ "$STAGE2_S" -gt 0 ]; then  # its deadline: stage 1's + STAGE2_S (it gets stage 1's unused time)
  stage 2 $(( STAGE1_S + STAGE2_S ))
else
  say "stage 2 not run (GPU_SH_STAGE2_S=0)"
fi

if [ "${GPU_SH_PYTEST:-0}" = 1 ] && [ ${#DRY[@]} -eq 0 ]; then
  left=$(( START + STAGE1_S + STAGE2_S + STAGE3_S - $(date +%s) ))
  say "stage 3 (GPU test suites), ${left} s"
  workers=()
  if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-16}"); fi
  MMLOSS_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$left" "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" \
    tests/kernels/triton/test_triton_gpu.py tests/kernels/cuda/test_cuda_gpu.py >> "$LOG" 2>&1 \
    || say "GPU test suites ended with exit $?"
  tail -3 "$LOG"
fi

say "done; the summary (also in $OUT_DIR/RESULTS_GPU.md)"
"$PY" -m bench.gpu_report --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
