// Shared device helpers of the .cu files (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"

namespace piece_optim::cuda {

constexpr int kThreads = 256;
constexpr int kPieceF = 0, kPieceS = 1;  // the method as a template argument

inline unsigned grid_for(int64_t n, int64_t per_block = kThreads) {
  int64_t b = (n + per_block - 1) / per_block;
  if (b < 1) b = 1;
  // grid-stride loops cover the rest: 65535 * 256 is plenty of parallelism
  return unsigned(b > 65535 ? 65535 : b);
}

struct F32 {
  using T = float;
  static __device__ __forceinline__ float ld(float x) { return x; }
  static __device__ __forceinline__ float st(float x) { return x; }
};
struct BF16 {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float ld(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 st(float x) { return __float2bfloat16_rn(x); }
  // rounded stochastically with 16 bits of noise (types.h)
  static __device__ __forceinline__ __nv_bfloat16 st_stochastic(float x, uint32_t noise16) {
    return __ushort_as_bfloat16(bf16_stochastic(__float_as_uint(x), x != x, noise16));
  }
};
struct F16 {
  using T = __half;
  static __device__ __forceinline__ float ld(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half st(float x) { return __float2half_rn(x); }
};

// fp32 bits of the score of element i (scores >= 0 order like their bits as uint32)
template <class A, int M>
__device__ __forceinline__ uint32_t score_bits(const ScoreArgs& s, int64_t i) {
  const typename A::T* s2 = static_cast<const typename A::T*>(s.sum_g2);
  float v;
  if (M == kPieceF) {
    v = A::ld(s2[i]);
  } else {
    const typename A::T* s1 = static_cast<const typename A::T*>(s.sum_g);
    // The rule of reference.score (piece_optim/backends/reference.py): NaN in -> NaN
    // out; den == +inf (g*g overflowed) -> +inf;
    // den == 0 -> 0.  `num * 0` is 0 for a finite numerator and NaN for a NaN one.
    const float num = fabsf(A::ld(s1[i]));
    const float den = __fsqrt_rn(__fadd_rn(A::ld(s2[i]), s.eps));
    const float zero = __fmul_rn(num, 0.0f);
    v = den == 0.0f ? zero : __fdiv_rn(num, den);
    const float inf = __int_as_float(0x7f800000);
    v = den == inf ? __fadd_rn(zero, inf) : v;
  }
  return __float_as_uint(v);
}

// Calls f.template operator()<A, M>() for the runtime accumulator dtype and method.
template <class F>
cudaError_t dispatch_score(const ScoreArgs& s, F&& f) {
  const bool piece_f = s.method == Method::F;
  if (s.acc_dtype == DType::F32) {
    return piece_f ? f.template run<F32, kPieceF>() : f.template run<F32, kPieceS>();
  }
  return piece_f ? f.template run<BF16, kPieceF>() : f.template run<BF16, kPieceS>();
}

}  // namespace piece_optim::cuda
