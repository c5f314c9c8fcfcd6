#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite, in every backend configuration
# this machine can run (no GPU needed):
#   1. default backend dispatch ("auto")     2. the pure-torch reference
#   3. Triton kernels under TRITON_INTERPRET=1 4. the C++ CPU extension
# then compile-checks every CUDA source with nvcc (when nvcc exists), syntax-checks the
# shell scripts and runs ruff.  PIECE_SKIP_INSTALL=1 skips the install step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${PIECE_SKIP_INSTALL:-0}" != 1 ]; then
  echo "== install"
  # torch first: on our machines this takes the local CPU build (no multi-GB CUDA download)
  $PY -m pip install -q torch==2.13.0
  # the extension build runs without isolation (it needs this torch): bring its tools
  $PY -m pip install -q "setuptools>=70" wheel ninja
  $PY -m pip install -q --no-build-isolation -e ".[dev]"
fi

suite() {  # $1 = label, rest = environment assignments
  local label=$1; shift
  echo "== pytest ($label)"
  local start=$SECONDS
  env "$@" $PY -m pytest -q -p no:cacheprovider tests
  echo "== pytest ($label): $((SECONDS - start)) s"
}

suite "backend=auto"
suite "backend=torch" PIECE_OPTIM_BACKEND=torch
# Each backend stage runs as soon as its code is in the tree; once there, it must load.
if [ -f piece_optim/_triton_backend.py ]; then
  suite "backend=triton, interpreter" PIECE_OPTIM_BACKEND=triton TRITON_INTERPRET=1
else
  echo "== (no Triton backend in this tree yet)"
fi
if [ -d csrc ]; then
  if $PY -c "import piece_optim._ext_backend as e; e.CpuBackend()" 2>/dev/null; then
    suite "backend=cpu" PIECE_OPTIM_BACKEND=cpu
  else
    echo "FAIL: the C++ CPU extension did not build or load" >&2
    $PY -c "import piece_optim._ext_backend as e; e.CpuBackend()" || true
    exit 1
  fi
else
  echo "== (no C++ extension in this tree yet)"
fi

if [ -x scripts/nvcc_check.sh ]; then
  echo "== nvcc compile check"
  scripts/nvcc_check.sh
fi

echo "== bash -n"
for f in scripts/*.sh benchmarks/*.sh .ci/run; do
  [ -f "$f" ] && bash -n "$f" && echo "ok $f"
done

echo "== ruff"
$PY -m ruff check .
$PY -m ruff format --check .
echo "== all test stages passed"
