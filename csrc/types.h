// What the CPU kernels, the CUDA kernels and their two torch bindings share: the dtype and
// method enums, one plain struct per op's input, and the stochastic-rounding hash.  No
// torch and no CUDA headers, so every .cu compiles against it with plain nvcc
// (scripts/nvcc_check.sh) and the kernels stay raw-pointer code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PIECE_HD __host__ __device__ __forceinline__
#else
#define PIECE_HD inline
#endif

namespace piece_optim {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class Method : int { F = 0, S = 1 };  // F: sum_g2; S: |sum_g| / sqrt(sum_g2 + eps)

// accumulate: sum_g += g (when sum_g is not null), sum_g2 += g*g, fp32 math; bf16 sums
// rounded to nearest even, or stochastically with the bits of stochastic_bits(i, key).
struct AccumItem {
  const void* grad;
  DType grad_dtype;
  void* sum_g;  // may be null
  void* sum_g2;
  DType acc_dtype;  // dtype of sum_g and sum_g2
  int64_t n;
  bool stochastic;  // bf16 sums only
  uint32_t key;     // piece_optim.backends.reference.stochastic_key
};

// The scores of one tensor's sums, computed on the fly by the score, histogram and
// compaction kernels (never stored by selection).
struct ScoreSrc {
  const void* sum_g;  // null for piece-f
  const void* sum_g2;
  DType acc_dtype;
  int64_t n;
  Method method;
  float eps;
};

// AdamW (torch's single-tensor op order) on the entries idx of a parameter (all when idx
// is null).  The scalars are the Python doubles of
// piece_optim.backends.reference.adamw_scalars; each kernel rounds them to fp32 where
// torch rounds a Python scalar.
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
  int64_t numel;  // entries of the parameter
  double decay;        // 1 - lr * weight_decay
  double lerp_weight;  // 1 - beta1
  double beta2;
  double sq_weight;  // 1 - beta2
  double eps;
  double step_size;  // lr / (1 - beta1**step)
  double bc2_sqrt;   // sqrt(1 - beta2**step)
  // CUDA: an index outside [0, numel) is skipped (nothing read or written for that entry)
  // and sets *err to 1 (may be null); the host checked the indices before the launch, this
  // guards an index changed behind that check.  The CPU op checks first and raises.
  int* err;
};

// C. Wellons' "lowbias32" integer hash, on unsigned 32-bit integers (wrapping arithmetic):
// piece_optim.backends.reference.hash32.
PIECE_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The 32 random bits of flat index i: the high 16 round sum_g, the low 16 sum_g2.
PIECE_HD uint32_t stochastic_bits(int64_t i, uint32_t key) {
  const uint64_t u = uint64_t(i);
  return hash32(uint32_t(u) ^ hash32(uint32_t(u >> 32) ^ key));
}

// fp32 bits -> bf16 bits rounded stochastically: add the 16-bit noise, keep the top 16;
// a NaN (tested first: its bits plus the noise could wrap around) is the canonical 0x7FC0.
PIECE_HD uint16_t bf16_stochastic(uint32_t bits, bool is_nan, uint32_t noise16) {
  return is_nan ? uint16_t(0x7FC0) : uint16_t((bits + noise16) >> 16);
}

}  // namespace piece_optim
