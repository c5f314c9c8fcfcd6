// accumulate: sum_g += g, sum_g2 += g*g in fp32 math (explicit roundings: __fadd_rn, and
// __fmaf_rn where torch's addcmul_ has its fma), stored as fp32 or bf16 (rounded to nearest
// even, or stochastically with the bits of types.h's stochastic_bits).
#include "cuda/common.cuh"

namespace piece_optim::cuda {
namespace {

template <class G, class A, bool SR>
__global__ void accumulate_kernel(const typename G::T* __restrict__ g, typename A::T* s1,
                                  typename A::T* __restrict__ s2, int64_t n, uint32_t key) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float x = G::ld(g[i]);
    if constexpr (SR) {
      const uint32_t h = stochastic_bits(i, key);
      if (s1 != nullptr) s1[i] = A::st_stochastic(__fadd_rn(A::ld(s1[i]), x), h >> 16);
      s2[i] = A::st_stochastic(__fmaf_rn(x, x, A::ld(s2[i])), h & 0xFFFFu);
    } else {
      if (s1 != nullptr) s1[i] = A::st(__fadd_rn(A::ld(s1[i]), x));
      s2[i] = A::st(__fmaf_rn(x, x, A::ld(s2[i])));
    }
  }
}

template <class G, class A, bool SR>
cudaError_t launch(const AccumItem& it, cudaStream_t st) {
  accumulate_kernel<G, A, SR><<<grid_for(it.n), kThreads, 0, st>>>(
      static_cast<const typename G::T*>(it.grad), static_cast<typename A::T*>(it.sum_g),
      static_cast<typename A::T*>(it.sum_g2), it.n, it.key);
  return cudaGetLastError();
}

template <class G>
cudaError_t launch_g(const AccumItem& it, cudaStream_t st) {
  if (it.acc_dtype == DType::F32) return launch<G, F32, false>(it, st);
  return it.stochastic ? launch<G, BF16, true>(it, st) : launch<G, BF16, false>(it, st);
}

}  // namespace

cudaError_t accumulate(const AccumItem& it, cudaStream_t stream) {
  if (it.n == 0) return cudaSuccess;
  switch (it.grad_dtype) {
    case DType::F32: return launch_g<F32>(it, stream);
    case DType::BF16: return launch_g<BF16>(it, stream);
    default: return launch_g<F16>(it, stream);
  }
}

}  // namespace piece_optim::cuda
