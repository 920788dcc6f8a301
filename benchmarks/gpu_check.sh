#!/usr/bin/env bash
# One command for a fresh GPU test machine (no network):
#   bash benchmarks/gpu_check.sh            # install, search benchmark, kernel benchmark, CUDA/gpu_path tests
#   bash benchmarks/gpu_check.sh --dry-run  # the same plumbing on any machine: no install, CPU smoke of both
#                                           # benchmarks, pytest --collect-only (under 3 minutes on 2 cores)
# Always brings numbers back: every stage has a time limit and the limits add up to less than BUDGET (8 min),
# the search benchmark runs first, both benchmarks print and append each row as soon as it is measured, and
# all output is unbuffered, so a stage that is cut short keeps what it measured.
# Writes at most 8 files under $OUT (default ./gpu_check_out): env.txt install.log bench_search.log search.csv
# bench_kernels.log kernels.csv pytest.log summary.txt — and prints the summary last.
set -u
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"

# Time limits (s). Worst case = their sum + KILL_AFTER per stage + SUMMARY_S ≤ BUDGET, by construction;
# the last stage (pytest) also gets whatever the earlier ones left unused.
BUDGET=480 KILL_AFTER=3 SUMMARY_S=10
L_ENV=15 L_INSTALL=120 L_INFO=30 L_SEARCH=130 L_KERNELS=60 L_PYTEST=90
STAGES=6
WORST=$(( L_ENV + L_INSTALL + L_INFO + L_SEARCH + L_KERNELS + L_PYTEST + STAGES * KILL_AFTER + SUMMARY_S ))
if [ "$WORST" -gt "$BUDGET" ]; then echo "gpu_check.sh: stage limits add up to ${WORST}s > ${BUDGET}s" >&2; exit 2; fi

START=$(date +%s)
declare -a SUMMARY=()
for f in env.txt install.log bench_search.log search.csv bench_kernels.log kernels.csv pytest.log summary.txt; do
  rm -f "$OUT/$f"
done

stage() {  # stage NAME LIMIT_S LOGFILE CMD... (output appended to LOGFILE)
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc dt what
  t0=$(date +%s)
  timeout --kill-after="$KILL_AFTER" "$limit" "$@" >>"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  what="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMEOUT after ${limit}s"
  elif [ $rc -ne 0 ]; then what="FAILED rc=$rc"; fi
  SUMMARY+=("$(printf '%-14s %-22s %4ss  %s' "$name" "$what" "$dt" "$(basename "$log")")")
  return $rc
}
skip() { SUMMARY+=("$(printf '%-14s %s' "$1" "$2")"); }

environment() {
  echo "date: $(date -Is)  host: $(hostname)  mode: $([ $DRY = 1 ] && echo dry-run || echo full)"
  if command -v nvidia-smi >/dev/null; then
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
      | sed 's/^/nvidia-smi: /'
  else echo "nvidia-smi: not found"; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
  if command -v nvcc >/dev/null; then echo "nvcc: $(nvcc --version | grep -o 'release [0-9.]*' | head -n 1) ($(command -v nvcc))"
  else echo "nvcc: not found"; fi
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: MISSING"
  git log --oneline -1 2>/dev/null || true
}
stage env "$L_ENV" "$OUT/env.txt" bash -c "$(declare -f environment); DRY=$DRY PY='$PY' environment"

if [ $DRY = 1 ]; then
  skip install "skipped (dry run)"
else
  stage install "$L_INSTALL" "$OUT/install.log" "$PY" -m pip install -e . --no-build-isolation --no-deps
fi
echo "--- milenas-fast info --json ---" >>"$OUT/env.txt"
stage info "$L_INFO" "$OUT/env.txt" "$PY" -m milenas_fast info --json

SEARCH_ARGS=(--csv "$OUT/search.csv")
KERNEL_ARGS=(--quick --csv "$OUT/kernels.csv")
if [ $DRY = 1 ]; then
  SEARCH_ARGS+=(--iters 2 --warmup 1)
  KERNEL_ARGS+=(--cpu-smoke)
fi
stage bench-search "$L_SEARCH" "$OUT/bench_search.log" "$PY" -u benchmarks/bench_search.py "${SEARCH_ARGS[@]}"
stage bench-kernels "$L_KERNELS" "$OUT/bench_kernels.log" "$PY" -u benchmarks/bench_kernels.py "${KERNEL_ARGS[@]}"

PYTEST_ARGS=(-m "cuda or gpu_path" -q -rfEs --durations=15 -p no:cacheprovider tests)
[ $DRY = 1 ] && PYTEST_ARGS=(--collect-only "${PYTEST_ARGS[@]}")
if "$PY" -c "import pytest" 2>/dev/null; then
  LEFT=$(( BUDGET - ($(date +%s) - START) - KILL_AFTER - SUMMARY_S ))
  [ $LEFT -lt $L_PYTEST ] && LEFT=$L_PYTEST
  stage pytest "$LEFT" "$OUT/pytest.log" "$PY" -u -m pytest "${PYTEST_ARGS[@]}"
else
  skip pytest "MISSING: pytest is not installed for $PY (pip install pytest); tests not run"
fi

{
  echo "== gpu_check summary ($(( $(date +%s) - START ))s of a ${WORST}s worst case; budget ${BUDGET}s) =="
  grep -E '^(nvidia-smi|torch|triton|nvcc|pytest)' "$OUT/env.txt"
  grep -E '"(C\+\+ extension|Triton kernels|auto|loader --loader auto)"' "$OUT/env.txt" | sed 's/^ *//'
  echo "-- stages --"
  printf '%s\n' "${SUMMARY[@]}"
  echo "-- bench_search (ms per iteration) --"
  grep -E '^(device:|no CUDA)' "$OUT/bench_search.log" 2>/dev/null
  sed -n '/^mode /,$p' "$OUT/bench_search.log" 2>/dev/null | grep -vE '^(CSV rows|Traceback|  )' | head -n 8
  echo "-- bench_kernels (fused rows, fwd+bwd; errors) --"
  grep -E '^# |fwd\+bwd fused| ERROR ' "$OUT/bench_kernels.log" 2>/dev/null | head -n 30
  echo "-- pytest -m 'cuda or gpu_path' --"
  grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" 2>/dev/null | head -n 12
  tail -n 1 "$OUT/pytest.log" 2>/dev/null
  echo "-- fallbacks and warnings (milenas_fast) --"
  cat "$OUT"/*.log "$OUT/env.txt" 2>/dev/null | grep -oE '((Runtime|User)Warning: milenas_fast: |WARNING +milenas_fast:).*' \
    | sort | uniq -c | sort -rn | head -n 8
  true
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
