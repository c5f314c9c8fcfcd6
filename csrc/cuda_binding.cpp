// CUDA implementations of the piece_optim ops: torch glue around the raw-pointer launchers
// of csrc/cuda (launchers.h).  Compiled only when CUDA_HOME and a CUDA build of torch are
// there (csrc_build.py defines PIECE_WITH_CUDA); the schemas are defined in ops.cpp.  Like
// the CPU binding, every argument is checked and translated by binding.h; what is left
// here is the device: a guard, the current stream, and the launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "binding.h"
#include "cuda/launchers.h"

namespace {

namespace pc = piece_optim::cuda;
namespace pb = piece_optim::binding;
using at::Tensor;
constexpr auto kCUDA = c10::DeviceType::CUDA;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "piece_optim CUDA ", what, ": ", cudaGetErrorString(err));
}

void accumulate_many_(at::TensorList grads, at::TensorList sum_gs, at::TensorList sum_g2s,
                      at::IntArrayRef keys) {
  std::vector<Tensor> keep;
  const std::vector<piece_optim::AccumItem> items =
      pb::accum_items(grads, sum_gs, sum_g2s, keys, kCUDA, &keep);
  for (size_t i = 0; i < items.size(); ++i) {
    c10::cuda::CUDAGuard guard(sum_g2s[i].device());
    check(pc::accumulate(items[i], c10::cuda::getCurrentCUDAStream()), "accumulate");
  }
}

Tensor score(const std::optional<Tensor>& sum_g, const Tensor& sum_g2, c10::string_view method,
             double eps) {
  c10::cuda::CUDAGuard guard(sum_g2.device());
  const pc::ScoreArgs s = pb::score_src(sum_g, sum_g2, method, eps, kCUDA);
  Tensor out = at::empty({s.n}, sum_g2.options().dtype(at::kFloat));
  check(pc::score(s, out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()), "score");
  return out;
}

std::vector<Tensor> score_histogram_many_(at::TensorList sum_gs, at::TensorList sum_g2s,
                                          c10::string_view method, double eps,
                                          const Tensor& hist, int64_t shift, int64_t prefix,
                                          at::IntArrayRef cand_caps) {
  TORCH_CHECK(sum_gs.size() == sum_g2s.size(),
              "piece_optim: score_histogram_many_ needs sum_gs and sum_g2s of equal length");
  TORCH_CHECK(cand_caps.empty() || cand_caps.size() == sum_g2s.size(),
              "piece_optim: cand_caps must be empty or one per tensor");
  pb::check_device(hist, "hist", kCUDA);
  const int64_t replicas = pb::check_hist(hist, shift, prefix, hist, /*max_replicas=*/4096);
  c10::cuda::CUDAGuard guard(hist.device());
  std::vector<Tensor> out;
  for (size_t i = 0; i < sum_g2s.size(); ++i) {
    std::optional<Tensor> s1;
    if (pb::present(sum_gs[i])) s1 = sum_gs[i];
    const pc::ScoreArgs s = pb::score_src(s1, sum_g2s[i], method, eps, kCUDA);
    pb::check_like(sum_g2s[i], "sum_g2", s.n, hist);
    check(pc::score_histogram(s, hist.data_ptr<int64_t>(), int(replicas), int(shift), prefix,
                              c10::cuda::getCurrentCUDAStream()),
          "histogram");
    // candidates are a CPU feature: 0-dim, "none kept", one per tensor when asked for
    if (!cand_caps.empty()) out.push_back(at::empty({}, sum_g2s[i].options().dtype(at::kLong)));
  }
  return out;
}

std::tuple<Tensor, int64_t> compact(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                                    c10::string_view method, double eps, int64_t thr,
                                    int64_t take_eq, at::ScalarType index_dtype,
                                    const std::optional<Tensor>& /*candidates: CPU only*/) {
  pb::check_compact_args(thr, index_dtype);
  c10::cuda::CUDAGuard guard(sum_g2.device());
  const Tensor s2 = sum_g2.contiguous();
  const pc::ScoreArgs s = pb::score_src(sum_g, s2, method, eps, kCUDA);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t ws_bytes = pc::compact_workspace_bytes(s.n);
  Tensor ws = at::empty({int64_t(ws_bytes)}, s2.options().dtype(at::kByte));
  Tensor out = at::empty({s.n}, s2.options().dtype(at::kLong));
  Tensor counts = at::zeros({2}, s2.options().dtype(at::kLong));
  check(pc::compact(s, uint32_t(thr), take_eq, ws.data_ptr(), ws_bytes,
                    out.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), stream),
        "compact");
  const Tensor host = counts.cpu();  // synchronises: the output size is data-dependent
  const int64_t n_sel = host.data_ptr<int64_t>()[0];
  const int64_t n_eq = std::min(std::max<int64_t>(take_eq, 0), host.data_ptr<int64_t>()[1]);
  Tensor idx = out.narrow(0, 0, n_sel);
  if (index_dtype == at::kInt) {
    Tensor narrow = at::empty({n_sel}, s2.options().dtype(at::kInt));
    check(pc::narrow_indices(idx.data_ptr<int64_t>(), narrow.data_ptr<int32_t>(), n_sel, stream),
          "narrow");
    return {narrow, n_eq};
  }
  return {idx.clone(), n_eq};
}

void adamw_step_many_(at::TensorList params, at::TensorList grads,
                      const c10::List<std::optional<Tensor>>& idxs, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters,
                      at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts,
                      double decay, double lerp_weight, double beta2, double sq_weight,
                      double eps, bool grad_is_sparse, const std::optional<Tensor>& status) {
  // Bounds (types.h): the kernel skips an out-of-range index and sets status[0]; the
  // Python backend checked the indices first, passes one status per device and reads it
  // behind the step.
  const bool has_status = status.has_value() && status->defined();
  if (has_status) {
    TORCH_CHECK(status->scalar_type() == at::kInt && status->numel() >= 1 &&
                    status->is_contiguous(),
                "piece_optim: status must be a contiguous int32 tensor");
  }
  std::vector<Tensor> keep;
  std::vector<piece_optim::AdamItem> items =
      pb::adam_items(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, step_sizes, bc2_sqrts,
                     decay, lerp_weight, beta2, sq_weight, eps, grad_is_sparse, kCUDA, &keep);
  for (size_t i = 0; i < items.size(); ++i) {
    const Tensor& p = params[i];
    c10::cuda::CUDAGuard guard(p.device());
    items[i].err =
        has_status && status->device() == p.device() ? status->data_ptr<int>() : nullptr;
    check(pc::adamw(items[i], c10::cuda::getCurrentCUDAStream()), "adamw");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(piece_optim, CUDA, m) {
  m.impl("accumulate_many_", &accumulate_many_);
  m.impl("score", &score);
  m.impl("score_histogram_many_", &score_histogram_many_);
  m.impl("compact", &compact);
  m.impl("adamw_step_many_", &adamw_step_many_);
}
