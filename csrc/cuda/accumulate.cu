// accumulate: sum_g += g, sum_g2 += g*g in fp32 math (explicit roundings: __fadd_rn, and
// __fmaf_rn where torch's addcmul_ has its fma), stored as fp32 or bf16.
#include "cuda/common.cuh"

namespace piece_optim::cuda {
namespace {

template <class G, class A>
__global__ void accumulate_kernel(const typename G::T* __restrict__ g, typename A::T* s1,
                                  typename A::T* __restrict__ s2, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float x = G::ld(g[i]);
    if (s1 != nullptr) s1[i] = A::st(__fadd_rn(A::ld(s1[i]), x));
    s2[i] = A::st(__fmaf_rn(x, x, A::ld(s2[i])));
  }
}

template <class G, class A>
cudaError_t launch(const void* grad, void* sum_g, void* sum_g2, int64_t n, cudaStream_t st) {
  accumulate_kernel<G, A><<<grid_for(n), kThreads, 0, st>>>(
      static_cast<const typename G::T*>(grad), static_cast<typename A::T*>(sum_g),
      static_cast<typename A::T*>(sum_g2), n);
  return cudaGetLastError();
}

template <class G>
cudaError_t launch_g(int acc, const void* grad, void* s1, void* s2, int64_t n, cudaStream_t st) {
  return acc == kF32 ? launch<G, F32>(grad, s1, s2, n, st) : launch<G, BF16>(grad, s1, s2, n, st);
}

}  // namespace

cudaError_t accumulate(const void* grad, int grad_dtype, void* sum_g, void* sum_g2,
                       int acc_dtype, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (grad_dtype) {
    case kF32: return launch_g<F32>(acc_dtype, grad, sum_g, sum_g2, n, stream);
    case kBF16: return launch_g<BF16>(acc_dtype, grad, sum_g, sum_g2, n, stream);
    default: return launch_g<F16>(acc_dtype, grad, sum_g, sum_g2, n, stream);
  }
}

}  // namespace piece_optim::cuda
