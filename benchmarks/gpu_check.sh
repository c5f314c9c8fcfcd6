#!/usr/bin/env bash
# One-shot GPU check for piece_optim, for a machine with one NVIDIA GPU and torch + triton
# already installed (no network needed).  Run from anywhere inside the repository:
#
#   benchmarks/gpu_check.sh [--out DIR] [--max-n N] [--dry-run]
#
# Stages, each under its own `timeout` so the whole check stays under 8 minutes:
#   1. env     (20 s)  nvidia-smi, torch / triton / CUDA versions
#   2. build   (140 s) pip install --no-build-isolation --no-deps -e . with
#                      PIECE_FORCE_BUILD=1 (builds the CUDA extension; CUDA_HOME / nvcc
#                      needed), arch = this GPU only; then (30 s) triton + cuda must load
#   3. tests   (70 s + 70 s) the test suite natively with PIECE_OPTIM_BACKEND=triton, =cuda
#                      (less the tests of this script, which would call it recursively)
#   4. bench   (140 s) piece-optim bench --device cuda --max-n N: micro benchmarks at N up
#                      to N (default 1e9) vs torch.topk / kthvalue and fused AdamW, copy
#                      bandwidth, and the small-LLaMA training step
# Worst case 470 s.  Everything goes to DIR (default $OUT, else ./gpu_check_out):
# gpu_check.log, bench.csv, the PNGs and summary.txt (one line per stage).  The exit code
# is 0 only if every stage passed.  --dry-run needs no GPU: it prints the plan and runs
# the CSV path on CPU at toy sizes (PIECE_BENCH_TINY=1), to check the script itself.
set -uo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

OUT_DIR=${OUT:-./gpu_check_out}
MAX_N=1000000000
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }
           OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    --max-n) [ $# -ge 2 ] || { echo "gpu_check.sh: --max-n needs a number" >&2; exit 2; }
             MAX_N=$2; shift 2 ;;
    --max-n=*) MAX_N=${1#--max-n=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$MAX_N" in
  ''|*[!0-9eE.+]*) echo "gpu_check.sh: --max-n '$MAX_N' is not a number (e.g. 1e9)" >&2; exit 2 ;;
esac
# accept 1e9 style: python turns it into an integer
PY=${PYTHON:-python3}
MAX_N=$($PY -c "import sys; v=float(sys.argv[1]); assert v>=1e6; print(int(v))" "$MAX_N" 2>/dev/null) \
  || { echo "gpu_check.sh: --max-n must be a number >= 1e6" >&2; exit 2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.txt
: > "$SUMMARY"
cd "$REPO"
FAILED=0

# stage NAME SECONDS CMD...: run CMD under timeout, log it, record pass/fail/timeout.
stage() {
  local name=$1 secs=$2; shift 2
  echo "== [$name] (timeout ${secs}s) $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  if [ "$DRY_RUN" = 1 ] && [ "$name" != csv ]; then
    echo "   (dry run: not executed)" | tee -a "$LOG"
    echo "$name skipped 0s" >> "$SUMMARY"
    return 0
  fi
  timeout --kill-after=10 "$secs" "$@" >> "$LOG" 2>&1
  rc=$?
  local status=pass
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status="fail(rc=$rc)"; fi
  [ "$status" = pass ] || FAILED=1
  echo "$name $status $((SECONDS - t0))s" | tee -a "$SUMMARY" "$LOG"
}

echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) repo=$REPO out=$OUT_DIR max_n=$MAX_N dry_run=$DRY_RUN" | tee "$LOG"

stage env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name(0))'"
ARCH=$($PY -c "import torch; c=torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "")
stage build 140 env PIECE_FORCE_BUILD=1 ${ARCH:+PIECE_CUDA_ARCH_LIST=$ARCH TORCH_CUDA_ARCH_LIST=$ARCH} \
  MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -q -e .
stage backends 30 $PY -c "import piece_optim as p; b = p.available_backends('cuda'); print(b); \
missing = {'triton', 'cuda'} - set(b); assert not missing, f'not loaded: {missing}'"
stage tests-triton 70 env PIECE_OPTIM_BACKEND=triton $PY -m pytest -q -x -p no:cacheprovider \
  -k "not gpu_check" tests
stage tests-cuda 70 env PIECE_OPTIM_BACKEND=cuda $PY -m pytest -q -x -p no:cacheprovider \
  -k "not gpu_check" tests
stage bench 140 $PY -m piece_optim bench --device cuda --threads 0 --no-memory --max-n "$MAX_N" \
  --out "$OUT_DIR"
if [ "$DRY_RUN" = 1 ]; then
  # The GPU-free path: the same CSV writer, on CPU at toy sizes.
  stage csv 120 env PIECE_BENCH_TINY=1 $PY -m piece_optim bench --device cpu --no-e2e --no-plot \
    --out "$OUT_DIR"
fi

echo "== summary ($SUMMARY)" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
exit $FAILED
