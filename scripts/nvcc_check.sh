#!/usr/bin/env bash
# Compile-check every CUDA source for sm_80 (C++17) and sm_90 (C++20) with plain nvcc (-c
# only, no torch, no GPU needed): the .cu files include only csrc/cuda/launchers.h, CUDA
# and CUB headers.  Two standards because torch's extension builder passes -std=c++17 up
# to torch 2.11 and -std=c++20 from 2.12/2.13 on (we pass none, so torch's applies).
# NVCC overrides the compiler (default /usr/local/bin/nvcc, else nvcc on PATH); without
# one the check is skipped with a message (exit 0), unless NVCC_REQUIRED=1.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-/usr/local/bin/nvcc}
if [ ! -x "$NVCC" ]; then NVCC=$(command -v nvcc || true); fi
if [ -z "$NVCC" ]; then
  echo "nvcc_check: no nvcc found; skipping the CUDA compile check" >&2
  [ "${NVCC_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for f in csrc/cuda/*.cu; do
  "$NVCC" -c -std=c++17 -O2 -Icsrc -gencode arch=compute_80,code=sm_80 -Xcompiler -Wall \
    -o "$out/$(basename "$f").80.o" "$f"
  "$NVCC" -c -std=c++20 -O2 -Icsrc -gencode arch=compute_90,code=sm_90 -Xcompiler -Wall \
    -o "$out/$(basename "$f").90.o" "$f"
  echo "ok $f (sm_80 C++17, sm_90 C++20)"
  n=$((n + 1))
done
echo "nvcc_check: $n CUDA sources compile for sm_80 (C++17) and sm_90 (C++20)" \
  "($("$NVCC" --version | tail -1))"
