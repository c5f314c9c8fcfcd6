// Raw-pointer launchers of the piece_optim CUDA kernels.  No torch headers here or in any
// .cu file, so every .cu compiles with plain `nvcc -c -std=c++17 -Icsrc` on any machine
// (scripts/nvcc_check.sh does so for sm_80 and sm_90); csrc/cuda_binding.cpp is the only
// torch-facing file.  All launchers are asynchronous on `stream` and return the
// cudaError_t of their last launch.  Element counts and offsets are int64 throughout.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "types.h"

namespace piece_optim::cuda {

using ScoreArgs = piece_optim::ScoreSrc;
using AdamArgs = piece_optim::AdamItem;

// types.h's AccumItem: sum_g += g (when sum_g is not null), sum_g2 += g*g, fp32 math; bf16
// sums rounded to nearest even, or stochastically.
cudaError_t accumulate(const AccumItem& it, cudaStream_t stream);

cudaError_t score(const ScoreArgs& s, float* out, cudaStream_t stream);

// hist: replicas * 65536 int64 counters (added to; the histogram is the sum of the
// replicas, block b adds to replica b % replicas); see piece_optim/backends/reference.py.
cudaError_t score_histogram(const ScoreArgs& s, int64_t* hist, int replicas, int shift,
                            int64_t prefix, cudaStream_t stream);

// Compaction in four steps (flags, scan of the ties, flags, CUB select).  Call
// compact_workspace_bytes(n) for the workspace size; out must hold n int64 entries;
// counts[0] receives the number selected and counts[1] the number of ties (bits == thr)
// in the whole tensor (device memory; the caller copies them back).  take_eq >= n (every
// tie kept) skips the tie flags and their scan: keep = bits >= thr.
size_t compact_workspace_bytes(int64_t n);
cudaError_t compact(const ScoreArgs& s, uint32_t thr, int64_t take_eq, void* workspace,
                    size_t workspace_bytes, int64_t* out, int64_t* counts, cudaStream_t stream);
cudaError_t narrow_indices(const int64_t* in, int32_t* out, int64_t n, cudaStream_t stream);

// types.h's AdamItem (its err flag guards an index changed behind the host's check).
cudaError_t adamw(const AdamArgs& a, cudaStream_t stream);

}  // namespace piece_optim::cuda
