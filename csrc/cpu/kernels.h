// CPU kernels of piece_optim: raw pointers and plain types only (no torch headers), so
// the torch glue (csrc/ops.cpp) stays the only place that knows about at::Tensor.
//
// Semantics are piece_optim/_reference.py's, bit for bit on machines where torch's CPU
// kernels use FMA (AVX2/AVX512 builds): torch contracts `s + c*g*g` into fma(c*g, g, s)
// and computes lerp with fma, so these kernels call fmaf at exactly those places.
#pragma once

#include <cstdint>
#include <vector>

namespace piece_optim::cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class Method : int { F = 0, S = 1 };  // F: sum_g2; S: |sum_g| / sqrt(sum_g2 + eps)

// ---- accumulate: sum_g += g, sum_g2 += g*g (fp32 math), many tensors in ONE parallel pass
struct AccumItem {
  const void* grad;
  DType grad_dtype;
  void* sum_g;  // may be null
  void* sum_g2;
  DType acc_dtype;  // dtype of sum_g and sum_g2
  int64_t n;
};
void accumulate_many(const std::vector<AccumItem>& items);

// ---- scores, fused into the histogram and the compaction
struct ScoreSrc {
  const void* sum_g;  // null for piece-f
  const void* sum_g2;
  DType acc_dtype;
  int64_t n;
  Method method;
  float eps;
};
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
struct AdamItem {
  void* param;
  DType param_dtype;
  const void* grad;
  DType grad_dtype;
  bool grad_is_sparse;
  const void* idx;  // null: dense
  bool idx64;
  float* exp_avg;
  float* exp_avg_sq;
  float* master;  // may be null
  int64_t n;      // number of entries updated
  // Python-side doubles, rounded to fp32 here exactly as torch rounds scalar arguments
  double decay;      // 1 - lr * weight_decay
  double w1;         // 1 - beta1 (lerp weight)
  double beta2;      // beta2
  double c2;         // 1 - beta2
  double eps;
  double step_size;  // lr / (1 - beta1**step)
  double bc2_sqrt;   // sqrt(1 - beta2**step)
};
void adamw_many(const std::vector<AdamItem>& items);

// Position of the first index outside [0, numel) in idx[0, k), or -1 when all are in range.
// The step's glue calls it on every tensor before any kernel writes (see csrc/ops.cpp).
int64_t first_out_of_range(const void* idx, bool idx64, int64_t k, int64_t numel);

// Which instruction set the kernels run with ("avx2+fma" or "generic").
const char* isa();

}  // namespace piece_optim::cpu
