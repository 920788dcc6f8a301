#!/usr/bin/env bash
# One command for a fresh GPU test machine (Python 3.12, torch 2.11, Triton 3.6, no DALI, no network):
#   bash benchmarks/gpu_check.sh
# Installs the project (building the C++/CUDA extension), runs the CUDA-marked tests, the kernel benchmark
# (if present) and the search benchmark. Every stage has its own timeout; the total stays under 8 minutes.
# Writes at most 8 files under $OUT (default ./gpu_check_out): env.txt install.log pytest_cuda.log
# bench_kernels.log bench_search.log search.csv kernels.csv summary.txt — and prints the summary last.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
declare -a SUMMARY=()

stage() {  # stage NAME TIMEOUT_S LOGFILE CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMEOUT after ${limit}s"
  [ $rc -ne 0 ] && [ "$what" = ok ] && what="FAILED rc=$rc"
  SUMMARY+=("$(printf '%-14s %-22s %4ss  %s' "$name" "$what" "$dt" "$(basename "$log")")")
  return $rc
}

{
  echo "date: $(date -Is)"; hostname
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  git log --oneline -1 2>/dev/null || true
} >"$OUT/env.txt" 2>&1

export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then  # set it for a dry run in an existing environment
  stage install 200 "$OUT/install.log" "$PY" -m pip install -e . --no-build-isolation --no-deps
fi
stage pytest-cuda 170 "$OUT/pytest_cuda.log" "$PY" -m pytest -m cuda -q -rs --durations=15 -p no:cacheprovider tests
if [ -f benchmarks/bench_kernels.py ]; then
  stage bench-kernels 100 "$OUT/bench_kernels.log" "$PY" benchmarks/bench_kernels.py
  [ -f benchmarks/kernels.csv ] && cp benchmarks/kernels.csv "$OUT/kernels.csv"
else
  SUMMARY+=("$(printf '%-14s %-22s' bench-kernels 'skipped (no benchmarks/bench_kernels.py)')")
fi
LEFT=$(( 470 - ($(date +%s) - START) ))
[ $LEFT -lt 30 ] && LEFT=30
stage bench-search "$LEFT" "$OUT/bench_search.log" "$PY" benchmarks/bench_search.py --csv "$OUT/search.csv"

{
  echo "== gpu_check summary ($(( $(date +%s) - START ))s total) =="
  grep -E '^(NVIDIA|name)|^torch|^triton' "$OUT/env.txt" | head -4
  printf '%s\n' "${SUMMARY[@]}"
  echo "-- pytest -m cuda --"
  grep -E '^(FAILED|ERROR)' "$OUT/pytest_cuda.log" | head -8
  tail -n 1 "$OUT/pytest_cuda.log"
  echo "-- bench_search --"
  sed -n '/^mode /,$p' "$OUT/bench_search.log" | head -12
  [ -f "$OUT/bench_kernels.log" ] && { echo "-- bench_kernels (tail) --"; tail -n 12 "$OUT/bench_kernels.log"; }
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
