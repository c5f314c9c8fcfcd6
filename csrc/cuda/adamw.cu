// AdamW (torch single-tensor op order) on the entries idx of a parameter, all in fp32 with
// explicit roundings: fma only where torch's kernels have one (lerp, addcmul).
#include "cuda/common.cuh"

namespace piece_optim::cuda {
namespace {

template <class P, class G, class I>
__global__ void adamw_kernel(AdamArgs a) {
  typename P::T* param = static_cast<typename P::T*>(a.param);
  const typename G::T* grad = static_cast<const typename G::T*>(a.grad);
  const I* idx = static_cast<const I*>(a.idx);
  const float decay = float(a.decay), w1 = float(a.lerp_weight), b2 = float(a.beta2);
  const float c2 = float(a.sq_weight), eps = float(a.eps), bc2 = float(a.bc2_sqrt);
  const float neg_step = -float(a.step_size);
  const bool small = fabsf(w1) < 0.5f;
  const float coeff = small ? w1 : __fsub_rn(w1, 1.0f);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < a.n; j += stride) {
    const int64_t p = idx != nullptr ? int64_t(idx[j]) : j;
    if (uint64_t(p) >= uint64_t(a.numel)) {  // a negative index wraps to a huge one
      if (a.err != nullptr) atomicExch(a.err, 1);
      continue;
    }
    const float g = G::ld(grad[a.grad_is_sparse ? j : p]);
    float w = a.master != nullptr ? a.master[j] : P::ld(param[p]);
    w = __fmul_rn(w, decay);
    const float mj = a.exp_avg[j];
    const float mn = __fmaf_rn(coeff, __fsub_rn(g, mj), small ? mj : g);
    const float vn = __fmaf_rn(__fmul_rn(c2, g), g, __fmul_rn(a.exp_avg_sq[j], b2));
    const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vn), bc2), eps);
    w = __fadd_rn(w, __fdiv_rn(__fmul_rn(neg_step, mn), den));
    a.exp_avg[j] = mn;
    a.exp_avg_sq[j] = vn;
    if (a.master != nullptr) a.master[j] = w;
    param[p] = P::st(w);
  }
}

template <class P, class G>
cudaError_t launch_pg(const AdamArgs& a, cudaStream_t st) {
  if (a.idx64) adamw_kernel<P, G, int64_t><<<grid_for(a.n), kThreads, 0, st>>>(a);
  else adamw_kernel<P, G, int32_t><<<grid_for(a.n), kThreads, 0, st>>>(a);
  return cudaGetLastError();
}

template <class P>
cudaError_t launch_p(const AdamArgs& a, cudaStream_t st) {
  switch (a.grad_dtype) {
    case DType::F32: return launch_pg<P, F32>(a, st);
    case DType::BF16: return launch_pg<P, BF16>(a, st);
    default: return launch_pg<P, F16>(a, st);
  }
}

}  // namespace

cudaError_t adamw(const AdamArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  switch (a.param_dtype) {
    case DType::F32: return launch_p<F32>(a, stream);
    case DType::BF16: return launch_p<BF16>(a, stream);
    default: return launch_p<F16>(a, stream);
  }
}

}  // namespace piece_optim::cuda
