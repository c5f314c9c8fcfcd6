// CPU kernels of piece_optim: raw pointers and plain types only (no torch headers), so
// the torch glue (csrc/ops.cpp) stays the only place that knows about at::Tensor.
//
// Semantics are piece_optim/backends/reference.py's, bit for bit on machines where torch's
// CPU kernels use FMA (AVX2/AVX512 builds): torch contracts `s + c*g*g` into fma(c*g, g, s)
// and computes lerp with fma, so these kernels call fmaf at exactly those places.
#pragma once

#include <cstdint>
#include <vector>

#include "types.h"

namespace piece_optim::cpu {

using piece_optim::AccumItem;
using piece_optim::AdamItem;
using piece_optim::DType;
using piece_optim::Method;
using piece_optim::ScoreSrc;

// ---- accumulate: many tensors in ONE parallel pass (see AccumItem in types.h)
void accumulate_many(const std::vector<AccumItem>& items);

// ---- scores, fused into the histogram and the compaction
void score(const ScoreSrc& src, float* out);

// Adds to hist[65536] the count of each element with bits >> (shift + 16) == prefix, in bin
// (bits >> shift) & 0xFFFF, over all items in ONE parallel region.  With caps (one per
// item, non-empty) it also collects into (*cands)[i], sorted, the indices of item i with
// bits >> (shift + 16) >= prefix (the candidates of the compaction that follows a
// 2nd-level pass); (*ok)[i] is 0 (and (*cands)[i] empty) when there were more than caps[i].
// How many chunks score_histogram_many splits a pass over `total` scores into with
// `threads` threads: never fewer than needed to keep every chunk below 2**31 elements (the
// per-thread uint32 counters are merged between chunks).
int64_t hist_num_chunks(int64_t total, int64_t threads);
void score_histogram_many(const std::vector<ScoreSrc>& items, int64_t* hist, int shift,
                          int64_t prefix, const std::vector<int64_t>& caps,
                          std::vector<std::vector<int64_t>>* cands, std::vector<char>* ok);

// ---- compaction: sorted indices with bits > thr, plus the first take_eq with bits == thr.
// Phase 1 (one read of the scores, or of the candidates only) keeps per-chunk lists;
// phase 2 writes them out once the output size is known.
struct CompactPlan {
  std::vector<std::vector<int64_t>> parts;  // per chunk, in index order; eq entries flagged
  std::vector<int64_t> n_eq;                // per chunk
  int64_t total_gt = 0;
  int64_t total_eq = 0;
};
void compact_scan(const ScoreSrc& src, uint32_t thr, const int64_t* cand, int64_t ncand,
                  CompactPlan* plan);
int64_t compact_count(const CompactPlan& plan, int64_t take_eq);
void compact_write(const CompactPlan& plan, int64_t take_eq, void* out, bool idx64);

// ---- AdamW (torch single-tensor op order) on the entries idx (all when idx is null)
void adamw_many(const std::vector<AdamItem>& items);

// Position of the first index outside [0, numel) in idx[0, k), or -1 when all are in range.
// The step's glue calls it on every tensor before any kernel writes (see csrc/ops.cpp).
int64_t first_out_of_range(const void* idx, bool idx64, int64_t k, int64_t numel);

// Which instruction set the kernels run with ("avx2+fma" or "generic").
const char* isa();

}  // namespace piece_optim::cpu
