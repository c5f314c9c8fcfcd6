// CUDA implementations of the piece_optim ops: torch glue around the raw-pointer launchers
// of csrc/cuda (launchers.h).  Compiled only when CUDA_HOME and a CUDA build of torch are
// there (csrc_build.py defines PIECE_WITH_CUDA); the schemas are defined in ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/launchers.h"

namespace {

namespace pc = piece_optim::cuda;
using at::Tensor;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "piece_optim CUDA ", what, ": ", cudaGetErrorString(err));
}

int dtype_of(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return pc::kF32;
    case at::kBFloat16: return pc::kBF16;
    case at::kHalf: return pc::kF16;
    default:
      TORCH_CHECK(false, "piece_optim: ", what, " has dtype ", t.scalar_type(),
                  "; the CUDA kernels take float32, bfloat16 or float16");
  }
}

void check_state(const Tensor& t, const char* what, int64_t n, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "piece_optim: ", what, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "piece_optim: ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == n, "piece_optim: ", what, " has ", t.numel(), " elements, expected ",
              n);
}

int acc_dtype(const Tensor& t, const char* what) {
  const int d = dtype_of(t, what);
  TORCH_CHECK(d != pc::kF16, "piece_optim: ", what, " must be float32 or bfloat16");
  return d;
}

void accumulate_many_(at::TensorList grads, at::TensorList sum_gs, at::TensorList sum_g2s) {
  TORCH_CHECK(grads.size() == sum_g2s.size() && sum_gs.size() == grads.size(),
              "piece_optim: accumulate_many_ needs lists of equal length");
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& s2 = sum_g2s[i];
    const int64_t n = s2.numel();
    c10::cuda::CUDAGuard guard(s2.device());
    TORCH_CHECK(grads[i].numel() == n, "piece_optim: grad has ", grads[i].numel(),
                " elements but sum_g2 has ", n);
    check_state(s2, "sum_g2", n, s2);
    const Tensor g = grads[i].contiguous();
    check_state(g, "grad", n, s2);
    void* s1 = nullptr;
    if (sum_gs[i].defined() && sum_gs[i].numel() > 0) {
      check_state(sum_gs[i], "sum_g", n, s2);
      TORCH_CHECK(sum_gs[i].scalar_type() == s2.scalar_type(),
                  "piece_optim: sum_g and sum_g2 must share a dtype");
      s1 = sum_gs[i].data_ptr();
    }
    check(pc::accumulate(g.data_ptr(), dtype_of(g, "grad"), s1, s2.data_ptr(),
                         acc_dtype(s2, "sum_g2"), n, c10::cuda::getCurrentCUDAStream()),
          "accumulate");
  }
}

void accumulate_(const Tensor& grad, const std::optional<Tensor>& sum_g, const Tensor& sum_g2) {
  Tensor s1 = sum_g.has_value() && sum_g->defined() ? *sum_g : at::empty({0}, sum_g2.options());
  accumulate_many_({grad}, {s1}, {sum_g2});
}

pc::ScoreArgs score_args(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                         c10::string_view method, double eps) {
  pc::ScoreArgs s{};
  TORCH_CHECK(sum_g2.is_contiguous(), "piece_optim: sum_g2 must be contiguous");
  s.n = sum_g2.numel();
  s.acc_dtype = acc_dtype(sum_g2, "sum_g2");
  s.sum_g2 = sum_g2.data_ptr();
  s.eps = float(eps);
  if (method == "piece-f") {
    s.method = pc::kPieceF;
  } else if (method == "piece-s") {
    s.method = pc::kPieceS;
    TORCH_CHECK(sum_g.has_value() && sum_g->defined(),
                "piece_optim: piece-s needs sum_g; the estimator was built without it");
    check_state(*sum_g, "sum_g", s.n, sum_g2);
    TORCH_CHECK(sum_g->scalar_type() == sum_g2.scalar_type(),
                "piece_optim: sum_g and sum_g2 must share a dtype");
    s.sum_g = sum_g->data_ptr();
  } else {
    TORCH_CHECK(false, "piece_optim: method must be 'piece-f' or 'piece-s', got '",
                std::string(method), "'");
  }
  return s;
}

Tensor score(const std::optional<Tensor>& sum_g, const Tensor& sum_g2, c10::string_view method,
             double eps) {
  c10::cuda::CUDAGuard guard(sum_g2.device());
  const pc::ScoreArgs s = score_args(sum_g, sum_g2, method, eps);
  Tensor out = at::empty({s.n}, sum_g2.options().dtype(at::kFloat));
  check(pc::score(s, out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()), "score");
  return out;
}

Tensor score_histogram_(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                        c10::string_view method, double eps, const Tensor& hist, int64_t shift,
                        int64_t prefix, int64_t /*cand_cap: candidates are a CPU feature*/) {
  c10::cuda::CUDAGuard guard(sum_g2.device());
  const pc::ScoreArgs s = score_args(sum_g, sum_g2, method, eps);
  // R replicas of 65536 bins (see _reference.histogram_): the caller sums them
  const int64_t replicas = hist.numel() / 65536;
  TORCH_CHECK(replicas >= 1 && replicas <= 4096 && hist.numel() % 65536 == 0,
              "piece_optim: hist must hold R * 65536 bins (1 <= R <= 4096), got ",
              hist.numel());
  check_state(hist, "hist", replicas * 65536, sum_g2);
  TORCH_CHECK(hist.scalar_type() == at::kLong, "piece_optim: hist must be int64");
  TORCH_CHECK(shift >= 0 && shift <= 16 && prefix >= 0,
              "piece_optim: shift must be in [0, 16] and prefix >= 0");
  check(pc::score_histogram(s, hist.data_ptr<int64_t>(), int(replicas), int(shift), prefix,
                            c10::cuda::getCurrentCUDAStream()),
        "histogram");
  return at::empty({}, sum_g2.options().dtype(at::kLong));  // 0-dim: no candidates kept
}

std::vector<Tensor> score_histogram_many_(at::TensorList sum_gs, at::TensorList sum_g2s,
                                          c10::string_view method, double eps,
                                          const Tensor& hist, int64_t shift, int64_t prefix,
                                          at::IntArrayRef cand_caps) {
  TORCH_CHECK(sum_gs.size() == sum_g2s.size(),
              "piece_optim: score_histogram_many_ needs sum_gs and sum_g2s of equal length");
  std::vector<Tensor> out;
  for (size_t i = 0; i < sum_g2s.size(); ++i) {
    std::optional<Tensor> s1;
    if (sum_gs[i].defined() && sum_gs[i].numel() > 0) s1 = sum_gs[i];
    Tensor c = score_histogram_(s1, sum_g2s[i], method, eps, hist, shift, prefix, 0);
    if (!cand_caps.empty()) out.push_back(c);  // 0-dim: the CUDA kernels keep no candidates
  }
  return out;
}

void histogram_(const Tensor& scores, const Tensor& hist, int64_t shift, int64_t prefix) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "piece_optim: scores must be float32");
  score_histogram_(std::nullopt, scores.contiguous(), "piece-f", 0.0, hist, shift, prefix, 0);
}

std::tuple<Tensor, int64_t> compact(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                                    c10::string_view method, double eps, int64_t thr,
                                    int64_t take_eq, at::ScalarType index_dtype,
                                    const std::optional<Tensor>& /*candidates*/) {
  TORCH_CHECK(index_dtype == at::kInt || index_dtype == at::kLong,
              "piece_optim: index_dtype must be torch.int32 or torch.int64");
  c10::cuda::CUDAGuard guard(sum_g2.device());
  const Tensor s2 = sum_g2.contiguous();
  const pc::ScoreArgs s = score_args(sum_g, s2, method, eps);
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
                      at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts, double lr,
                      double beta1, double beta2, double eps, double weight_decay,
                      bool grad_is_sparse, const std::optional<Tensor>& status) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && idxs.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && masters.size() == n && step_sizes.size() == n &&
                  bc2_sqrts.size() == n,
              "piece_optim: adamw_step_many_ needs lists of equal length");
  // Bounds (csrc/cuda/launchers.h): the kernel skips an out-of-range index and sets
  // status[0]; the Python backend passes one status per device and reads it lazily.
  const bool has_status = status.has_value() && status->defined();
  if (has_status) {
    TORCH_CHECK(status->scalar_type() == at::kInt && status->numel() >= 1 &&
                    status->is_contiguous(),
                "piece_optim: status must be a contiguous int32 tensor");
  }
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    c10::cuda::CUDAGuard guard(p.device());
    TORCH_CHECK(p.is_contiguous(), "piece_optim: param must be contiguous");
    pc::AdamArgs a{};
    a.param = p.data_ptr();
    a.param_dtype = dtype_of(p, "param");
    const std::optional<Tensor> idx_opt = idxs.get(i);
    Tensor idx;
    int64_t k = p.numel();
    if (idx_opt.has_value() && idx_opt->defined()) {
      idx = idx_opt->contiguous();
      TORCH_CHECK(idx.dim() == 1 && (idx.scalar_type() == at::kInt ||
                                     idx.scalar_type() == at::kLong),
                  "piece_optim: idx must be a 1-D int32 or int64 tensor");
      check_state(idx, "idx", idx.numel(), p);
      a.idx = idx.data_ptr();
      a.idx64 = idx.scalar_type() == at::kLong;
      k = idx.numel();
    }
    a.n = k;
    a.grad_is_sparse = grad_is_sparse && a.idx != nullptr;
    const Tensor g = grads[i].contiguous();
    check_state(g, "grad", a.grad_is_sparse ? k : p.numel(), p);
    a.grad = g.data_ptr();
    a.grad_dtype = dtype_of(g, "grad");
    check_state(exp_avgs[i], "exp_avg", k, p);
    check_state(exp_avg_sqs[i], "exp_avg_sq", k, p);
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat &&
                    exp_avg_sqs[i].scalar_type() == at::kFloat,
                "piece_optim: exp_avg/exp_avg_sq must be fp32");
    a.exp_avg = exp_avgs[i].data_ptr<float>();
    a.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    if (masters[i].defined() && masters[i].numel() > 0) {
      check_state(masters[i], "master", k, p);
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "piece_optim: master must be fp32");
      a.master = masters[i].data_ptr<float>();
    }
    a.decay = 1 - lr * weight_decay;
    a.w1 = 1 - beta1;
    a.beta2 = beta2;
    a.c2 = 1 - beta2;
    a.eps = eps;
    a.step_size = step_sizes[i];
    a.bc2_sqrt = bc2_sqrts[i];
    a.numel = p.numel();
    a.err = has_status && status->device() == p.device() ? status->data_ptr<int>() : nullptr;
    check(pc::adamw(a, c10::cuda::getCurrentCUDAStream()), "adamw");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(piece_optim, CUDA, m) {
  m.impl("accumulate_", &accumulate_);
  m.impl("accumulate_many_", &accumulate_many_);
  m.impl("score", &score);
  m.impl("histogram_", &histogram_);
  m.impl("score_histogram_", &score_histogram_);
  m.impl("score_histogram_many_", &score_histogram_many_);
  m.impl("compact", &compact);
  m.impl("adamw_step_many_", &adamw_step_many_);
}
