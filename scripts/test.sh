#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite, in every backend configuration
# this machine can run (no GPU needed):
#   1. default backend dispatch ("auto")     2. the pure-torch reference
#   3. Triton kernels under TRITON_INTERPRET=1 4. the C++ CPU extension
# then compile-checks every CUDA source with nvcc (when nvcc exists), builds a wheel and
# uses it from a fresh venv (scripts/wheel_check.sh), syntax-checks the shell scripts and
# runs ruff.  PIECE_OPTIM_SKIP_INSTALL=1 skips the install step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

skip_install=${PIECE_OPTIM_SKIP_INSTALL:-}
if [ -z "$skip_install" ] && [ -n "${PIECE_SKIP_INSTALL:-}" ]; then
  echo "note: PIECE_SKIP_INSTALL is deprecated; use PIECE_OPTIM_SKIP_INSTALL" >&2
  skip_install=$PIECE_SKIP_INSTALL
fi
if [ "${skip_install:-0}" != 1 ]; then
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

# The backend stages: one per backend that runs on this machine's CPU (a backend added to
# piece_optim.backends gets its line here).  Each must load: a stage never skips quietly.
must_load() {
  $PY -c "from piece_optim import backends as b; import sys; \
sys.exit(0 if b.load('$1') else f'FAIL: the $1 backend does not load: {b.explain(\"adamw\")[\"$1\"]}')"
}
suite "backend=auto"
suite "backend=torch" PIECE_OPTIM_BACKEND=torch
TRITON_INTERPRET=1 must_load triton
suite "backend=triton, interpreter" PIECE_OPTIM_BACKEND=triton TRITON_INTERPRET=1
must_load cpu
suite "backend=cpu" PIECE_OPTIM_BACKEND=cpu

if [ -x scripts/nvcc_check.sh ]; then
  echo "== nvcc compile check"
  scripts/nvcc_check.sh
fi

echo "== wheel: built, installed in a fresh venv, used outside the repository"
PYTHON=$PY bash scripts/wheel_check.sh

echo "== bash -n"
for f in scripts/*.sh benchmarks/*.sh .ci/run; do
  [ -f "$f" ] && bash -n "$f" && echo "ok $f"
done

echo "== ruff"
$PY -m ruff check .
$PY -m ruff format --check .
echo "== all test stages passed"
