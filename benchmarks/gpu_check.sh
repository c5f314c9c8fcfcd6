#!/usr/bin/env bash
# One-shot GPU check for piece_optim, for a machine with one NVIDIA GPU and torch + triton
# already installed (no network needed).  Run from the repository root (or anywhere in it):
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--max-n N] [--budget S] [--skip-bench] [--dry-run]
#
# Stages, most valuable first; each runs under its own timeout, capped so that all of them
# end within the budget (default 390 s; a stage with under 25 s left is skipped); a failed
# or timed-out stage never stops the later ones.  Estimates on an H200 in brackets.
#   env           (30 s cap)  nvidia-smi, python / torch / triton / CUDA / nvcc versions [5 s]
#   build         (200 s)     pip install --no-build-isolation --no-deps -e . with
#                             PIECE_OPTIM_FORCE_BUILD=1, for this GPU's arch only (e.g. 9.0), 16
#                             jobs: 6 translation units (3 .cu, 3 .cpp) [60-120 s]; on
#                             failure, an install without the extension so the Triton
#                             stages still run
#   backends      (40 s)      the triton and cuda backends must load for CUDA tensors [10 s]
#   tests-cuda    (100 s)     pytest, PIECE_OPTIM_TEST_DEVICE=cuda PIECE_OPTIM_BACKEND=cuda:
#                             the device-aware tests on CUDA tensors (cpu_only deselected),
#                             every failure listed (no -x), 60 s per test [30 s]
#   tests-triton  (150 s)     the same with PIECE_OPTIM_BACKEND=triton; first use compiles
#                             each Triton kernel variant (~1 s each, ~60 of them) [60 s]
#   bench-select  (110 s)     accumulate + exact top-0.1% select over N = 1e8 and --max-n
#                             (1e9) fp32 / bf16 sums: GB/s against this run's copy
#                             bandwidth, time against torch.topk [40 s]
#   bench-step    (70 s)      sparse AdamW step, k = 0.1% of N, vs AdamW(fused) dense [20 s]
#   bench-memory  (110 s)     peak GPU memory fine-tuning a 1.1B LLaMA in bf16: AdamW vs
#                             estimation (in_backward, bf16 sums) vs SparseAdamW [50 s]
# --skip-bench stops after the test stages (for a short device lease: ~150 s on an H200).
# Expected about 290 s in all.  Everything goes to DIR (default $OUT, else ./gpu_check_out):
# summary.txt (one line per stage, then the Markdown result tables), gpu_check.log (every
# stage's output), build.log, bench.csv, tests-cuda.xml, tests-triton.xml (JUnit).  The
# exit code is 0 only if every stage passed.  --dry-run needs no GPU: the same stages, on
# CPU at toy sizes (Triton in its interpreter), the test stages only collect (and count)
# the GPU selection, the build only reports the arch flags; it checks this script itself.
set -uo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

OUT_DIR=${OUT:-./gpu_check_out}
MAX_N=1000000000
BUDGET=390
DRY_RUN=0
SKIP_BENCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }
           OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    --max-n) [ $# -ge 2 ] || { echo "gpu_check.sh: --max-n needs a number" >&2; exit 2; }
             MAX_N=$2; shift 2 ;;
    --max-n=*) MAX_N=${1#--max-n=}; shift ;;
    --budget) [ $# -ge 2 ] || { echo "gpu_check.sh: --budget needs seconds" >&2; exit 2; }
              BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#--budget=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$MAX_N" in
  ''|*[!0-9eE.+]*) echo "gpu_check.sh: --max-n '$MAX_N' is not a number (e.g. 1e9)" >&2; exit 2 ;;
esac
case "$BUDGET" in
  ''|*[!0-9]*) echo "gpu_check.sh: --budget '$BUDGET' must be whole seconds" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
# accept 1e9 style: python turns it into an integer
MAX_N=$($PY -c "import sys; v=float(sys.argv[1]); assert v>=1e6; print(int(v))" "$MAX_N" 2>/dev/null) \
  || { echo "gpu_check.sh: --max-n must be a number >= 1e6" >&2; exit 2; }
SIZES=100000000
[ "$MAX_N" -gt 100000000 ] && SIZES="100000000 $MAX_N"
[ "$MAX_N" -lt 100000000 ] && SIZES=$MAX_N

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.txt
: > "$SUMMARY"
cd "$REPO"
FAILED=0
START=$SECONDS
MIN_STAGE=25
export PYTHONUNBUFFERED=1
# The GPU stages must fail, not quietly JIT-build a CPU-only extension, if the build failed.
export PIECE_OPTIM_NO_JIT=1

# stage NAME CAP CMD...: run CMD under timeout min(CAP, time left), log it, record the result.
stage() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - START))) secs rc status t0=$SECONDS
  secs=$cap
  [ "$left" -lt "$secs" ] && secs=$left
  if [ "$secs" -lt "$MIN_STAGE" ]; then
    echo "== [$name] skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    echo "$name skipped(no-time) 0s" >> "$SUMMARY"
    FAILED=1
    return 0
  fi
  echo "== [$name] (timeout ${secs}s, t=$((SECONDS - START))s) $*" | tee -a "$LOG"
  timeout --kill-after=10 "$secs" "$@" >> "$LOG" 2>&1
  rc=$?
  status=pass
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status="fail(rc=$rc)"; fi
  [ "$status" = pass ] || FAILED=1
  echo "$name $status $((SECONDS - t0))s" | tee -a "$SUMMARY" "$LOG"
}

# pytest's last line ("12 passed, 3 failed, 184 deselected in 30s") of the log lines after
# line $2 (where the stage began) into the summary
test_counts() {
  local line
  line=$(tail -n +"$(($2 + 1))" "$LOG" | grep -E \
    '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|tests collected|no tests ran' \
    | tail -1 | sed 's/=//g; s/^ *//')
  echo "  $1: ${line:-no pytest summary line (see gpu_check.log)}" >> "$SUMMARY"
}

echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) repo=$REPO out=$OUT_DIR max_n=$MAX_N" \
  "budget=${BUDGET}s dry_run=$DRY_RUN commit=${PIECE_OPTIM_COMMIT:-$(git rev-parse --short=12 HEAD \
  2>/dev/null || echo unknown)}" | tee "$LOG"

ENV_PY='import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "cc", f"{p.major}.{p.minor}", "sms", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
else:
    print("no CUDA device visible")'
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  # Triton's interpreter stands in for the GPU kernels on CPU tensors.
  export TRITON_INTERPRET=1
  stage env 30 bash -c "(command -v nvidia-smi >/dev/null && nvidia-smi) || echo 'no nvidia-smi'; \
(command -v nvcc >/dev/null && nvcc --version | tail -2) || echo 'no nvcc'; $PY -c '$ENV_PY'"
  # Only the arch the build would use: there is no GPU (and no CUDA torch) to build for.
  stage build 60 env PIECE_OPTIM_CUDA_ARCH_LIST=9.0 $PY -c "import csrc_build, pathlib; \
print('arch', csrc_build.cuda_arch_list(), 'sources', csrc_build.cpu_sources(pathlib.Path('.')) \
+ csrc_build.cuda_sources(pathlib.Path('.')), 'cuda', csrc_build.cuda_wanted())"
  stage backends 40 $PY -c "import piece_optim as p; print(p.available_backends('cpu'))"
  for be in cuda triton; do
    at=$(wc -l < "$LOG")
    stage tests-$be 100 env PIECE_OPTIM_TEST_DEVICE=cuda PIECE_OPTIM_BACKEND=$be $PY -m pytest -q \
      -p no:cacheprovider --collect-only tests
    test_counts tests-$be "$at"
  done
  TINY=--tiny
else
  DEVICE=cuda
  unset TRITON_INTERPRET
  stage env 30 bash -c "nvidia-smi && ((command -v nvcc && nvcc --version | tail -2) \
|| echo 'nvcc not on PATH') && $PY -c 'from torch.utils import cpp_extension as c; \
print(\"CUDA_HOME\", c.CUDA_HOME)' && $PY -c '$ENV_PY' \
&& $PY -c 'import torch; assert torch.cuda.is_available(), \"torch sees no GPU\"'"
  ARCH=$($PY -c "import torch; c=torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" \
    2>/dev/null || echo "")
  # -v: setuptools prints the compiler lines; they go to build.log, not the main log
  stage build 200 bash -c "env PIECE_OPTIM_FORCE_BUILD=1 ${ARCH:+PIECE_OPTIM_CUDA_ARCH_LIST=$ARCH} \
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -v -e . \
> '$OUT_DIR/build.log' 2>&1; rc=\$?; tail -25 '$OUT_DIR/build.log'; exit \$rc"
  if ! grep -q '^build pass' "$SUMMARY"; then
    # Without the extension the Triton stages can still run: install the Python package.
    stage install-no-ext 60 env PIECE_OPTIM_SKIP_BUILD=1 $PY -m pip install --no-build-isolation \
      --no-deps -q -e .
  fi
  stage backends 40 $PY -c "import torch, piece_optim as p; from piece_optim import backends as B; \
b = p.available_backends('cuda'); print('available for cuda:', b); \
print('why not:', {k: v for k, v in B.explain('adamw', 'cuda', (torch.float32,) * 2).items() if v}); \
print('auto picks:', B.get_backend('auto', 'cuda').name, '|', B.load('cuda')); \
missing = {'triton', 'cuda'} - set(b); assert not missing, f'not loaded: {missing}'"
  # 60 s per test (pytest-timeout) bounds a hung kernel; 4 xdist workers share the ~60
  # one-off Triton compilations (CPU-bound, 16 cores here) when pytest-xdist is there.
  TEST_OPTS=""
  $PY -c "import pytest_timeout" 2>/dev/null && TEST_OPTS="--timeout=60"
  $PY -c "import xdist" 2>/dev/null && TEST_OPTS="$TEST_OPTS -n 4"
  for be in cuda triton; do
    cap=100
    [ "$be" = triton ] && cap=150
    at=$(wc -l < "$LOG")
    stage tests-$be $cap env PIECE_OPTIM_TEST_DEVICE=cuda PIECE_OPTIM_BACKEND=$be $PY -m pytest -q \
      -p no:cacheprovider -rfE $TEST_OPTS --junitxml="$OUT_DIR/tests-$be.xml" tests
    test_counts tests-$be "$at"
  done
  TINY=
fi

# The benchmarks: on a GPU the backends auto would consider (triton, cuda); in the dry run
# the CPU ones plus Triton's interpreter.  Rows go to bench.csv as they are measured.
since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [ "$SKIP_BENCH" = 1 ]; then
  echo "== benchmarks skipped (--skip-bench)" | tee -a "$LOG"
  echo "bench skipped(--skip-bench) 0s" >> "$SUMMARY"
else
stage bench-select 110 $PY -m benchmarks.gpu select --device $DEVICE --sizes $SIZES --out "$OUT_DIR" $TINY
stage bench-step 70 $PY -m benchmarks.gpu step --device $DEVICE --sizes $MAX_N --out "$OUT_DIR" $TINY
stage bench-memory 110 $PY -m benchmarks.gpu memory --device $DEVICE --out "$OUT_DIR" $TINY
fi

{
  echo "total $((SECONDS - START))s (budget ${BUDGET}s)"
  echo
  $PY -m benchmarks.gpu table --out "$OUT_DIR" --since "$since" 2>&1 || echo "(no result table)"
} >> "$SUMMARY"
echo "== summary ($SUMMARY)" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
exit $FAILED
