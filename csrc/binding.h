// The torch side both bindings share (csrc/ops.cpp for CPU, csrc/cuda_binding.cpp for
// CUDA): argument checks that raise with the argument's name and the fix, and the one
// translation of each op's tensors into the plain structs of types.h.  A binding then
// only checks its device and calls its kernels, so the two stay symmetric.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <vector>

#include "types.h"

namespace piece_optim::binding {

using at::Tensor;

inline DType dtype_of(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK(false, "piece_optim: ", what, " has dtype ", t.scalar_type(),
                  "; the kernels take float32, bfloat16 or float16");
  }
}

inline DType acc_dtype(const Tensor& t, const char* what) {
  const DType d = dtype_of(t, what);
  TORCH_CHECK(d != DType::F16, "piece_optim: ", what,
              " must be float32 or bfloat16 (accumulator dtypes)");
  return d;
}

// `t` lives with `like` (same device), is contiguous and has n elements.
inline void check_like(const Tensor& t, const char* what, int64_t n, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "piece_optim: ", what, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "piece_optim: ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == n, "piece_optim: ", what, " has ", t.numel(), " elements, expected ",
              n);
}

// The binding's device: `t` must be on it (the dispatcher picks the binding by device, so
// this only fails for inputs spread over devices).
inline void check_device(const Tensor& t, const char* what, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, "piece_optim: ", what, " must be a ",
              c10::DeviceTypeName(type), " tensor, got ", t.device());
}

inline Method method_of(c10::string_view m) {
  if (m == "piece-f") return Method::F;
  if (m == "piece-s") return Method::S;
  TORCH_CHECK(false, "piece_optim: method must be 'piece-f' or 'piece-s', got '", std::string(m),
              "'");
}

// Tensor lists that may lack an entry (sum_gs, masters) mark "none" with a 0-element
// tensor, not None: torch 2.13's auto_functionalize fails on None inside a mutable
// Tensor?[] (seen with torch.library.opcheck), and an empty selection never reaches a
// kernel.
inline bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

// accumulate_many_: one item per tensor; `keep` holds contiguous copies of strided grads
// alive while the kernels run.  keys: empty (round to nearest) or one per tensor.
inline std::vector<AccumItem> accum_items(at::TensorList grads, at::TensorList sum_gs,
                                          at::TensorList sum_g2s, at::IntArrayRef keys,
                                          c10::DeviceType type, std::vector<Tensor>* keep) {
  TORCH_CHECK(grads.size() == sum_g2s.size() && sum_gs.size() == grads.size(),
              "piece_optim: accumulate_many_ needs lists of equal length (grads ", grads.size(),
              ", sum_gs ", sum_gs.size(), ", sum_g2s ", sum_g2s.size(), ")");
  TORCH_CHECK(keys.empty() || keys.size() == grads.size(),
              "piece_optim: keys must be empty or one per tensor");
  keep->reserve(keep->size() + grads.size());
  std::vector<AccumItem> items;
  items.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& s2 = sum_g2s[i];
    const int64_t n = s2.numel();
    check_device(s2, "sum_g2", type);
    check_like(s2, "sum_g2", n, s2);
    TORCH_CHECK(grads[i].numel() == n, "piece_optim: grad has ", grads[i].numel(),
                " elements but sum_g2 has ", n);
    keep->push_back(grads[i].contiguous());
    check_like(keep->back(), "grad", n, s2);
    AccumItem it{};
    it.grad = keep->back().data_ptr();
    it.grad_dtype = dtype_of(grads[i], "grad");
    it.acc_dtype = acc_dtype(s2, "sum_g2");
    it.sum_g2 = s2.data_ptr();
    it.n = n;
    if (present(sum_gs[i])) {
      check_like(sum_gs[i], "sum_g", n, s2);
      TORCH_CHECK(sum_gs[i].scalar_type() == s2.scalar_type(),
                  "piece_optim: sum_g and sum_g2 must share a dtype");
      it.sum_g = sum_gs[i].data_ptr();
    }
    if (!keys.empty()) {
      TORCH_CHECK(keys[i] >= 0 && keys[i] <= 0xFFFFFFFFll,
                  "piece_optim: a stochastic-rounding key is a uint32, got ", keys[i]);
      it.stochastic = it.acc_dtype == DType::BF16;  // fp32 sums hold the exact result
      it.key = uint32_t(keys[i]);
    }
    items.push_back(it);
  }
  return items;
}

inline ScoreSrc score_src(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                          c10::string_view method, double eps, c10::DeviceType type) {
  ScoreSrc s{};
  check_device(sum_g2, "sum_g2", type);
  check_like(sum_g2, "sum_g2", sum_g2.numel(), sum_g2);
  s.n = sum_g2.numel();
  s.acc_dtype = acc_dtype(sum_g2, "sum_g2");
  s.sum_g2 = sum_g2.data_ptr();
  s.method = method_of(method);
  s.eps = float(eps);
  if (s.method == Method::S) {
    TORCH_CHECK(sum_g.has_value() && sum_g->defined(),
                "piece_optim: piece-s needs sum_g; the estimator was built without it");
    check_like(*sum_g, "sum_g", s.n, sum_g2);
    TORCH_CHECK(sum_g->scalar_type() == sum_g2.scalar_type(),
                "piece_optim: sum_g and sum_g2 must share a dtype");
    s.sum_g = sum_g->data_ptr();
  }
  return s;
}

// A histogram of R replicas of 65536 bins (see piece_optim/backends/reference.py): the CPU
// kernels take one (max_replicas 1), the CUDA ones up to 4096.  Returns R.
inline int64_t check_hist(const Tensor& hist, int64_t shift, int64_t prefix, const Tensor& like,
                          int64_t max_replicas = 1) {
  const int64_t replicas = hist.numel() / 65536;
  TORCH_CHECK(hist.numel() % 65536 == 0 && replicas >= 1 && replicas <= max_replicas,
              "piece_optim: hist must be a contiguous int64 tensor of 65536 bins",
              max_replicas > 1 ? " (or R * 65536 for R <= 4096 replicas)" : "", ", got ",
              hist.numel(), " elements");
  check_like(hist, "hist", replicas * 65536, like);
  TORCH_CHECK(hist.scalar_type() == at::kLong,
              "piece_optim: hist must be a contiguous int64 tensor of 65536 bins");
  TORCH_CHECK(shift >= 0 && shift <= 16, "piece_optim: shift must be in [0, 16], got ", shift);
  TORCH_CHECK(prefix >= 0, "piece_optim: prefix must be >= 0, got ", prefix);
  return replicas;
}

inline void check_compact_args(int64_t thr, at::ScalarType index_dtype) {
  TORCH_CHECK(index_dtype == at::kInt || index_dtype == at::kLong,
              "piece_optim: index_dtype must be torch.int32 or torch.int64");
  TORCH_CHECK(thr >= 0 && thr <= 0xFFFFFFFFll, "piece_optim: thr must be a uint32 bit pattern");
}

// adamw_step_many_: one item per tensor, every argument checked; `keep` holds contiguous
// copies of strided grads and indices alive while the kernels run.
inline std::vector<AdamItem> adam_items(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<Tensor>>& idxs,
    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,
    at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts, double decay,
    double lerp_weight, double beta2, double sq_weight, double eps, bool grad_is_sparse,
    c10::DeviceType type, std::vector<Tensor>* keep) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && idxs.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && masters.size() == n && step_sizes.size() == n &&
                  bc2_sqrts.size() == n,
              "piece_optim: adamw_step_many_ needs lists of equal length");
  keep->reserve(keep->size() + 2 * n);
  std::vector<AdamItem> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_device(p, "param", type);
    TORCH_CHECK(p.is_contiguous(), "piece_optim: param must be contiguous");
    AdamItem it{};
    it.param = p.data_ptr();
    it.param_dtype = dtype_of(p, "param");
    it.numel = p.numel();
    const std::optional<Tensor> idx = idxs.get(i);
    int64_t k = p.numel();
    if (idx.has_value() && idx->defined()) {
      TORCH_CHECK(idx->dim() == 1 && (idx->scalar_type() == at::kInt ||
                                      idx->scalar_type() == at::kLong),
                  "piece_optim: idx must be a 1-D int32 or int64 tensor");
      keep->push_back(idx->contiguous());
      check_like(keep->back(), "idx", idx->numel(), p);
      it.idx = keep->back().data_ptr();
      it.idx64 = idx->scalar_type() == at::kLong;
      k = idx->numel();
    }
    it.n = k;
    it.grad_is_sparse = grad_is_sparse && it.idx != nullptr;
    keep->push_back(grads[i].contiguous());
    check_like(keep->back(), "grad", it.grad_is_sparse ? k : p.numel(), p);
    it.grad = keep->back().data_ptr();
    it.grad_dtype = dtype_of(grads[i], "grad");
    check_like(exp_avgs[i], "exp_avg", k, p);
    check_like(exp_avg_sqs[i], "exp_avg_sq", k, p);
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat &&
                    exp_avg_sqs[i].scalar_type() == at::kFloat,
                "piece_optim: exp_avg/exp_avg_sq must be fp32");
    it.exp_avg = exp_avgs[i].data_ptr<float>();
    it.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    if (present(masters[i])) {
      check_like(masters[i], "master", k, p);
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "piece_optim: master must be fp32");
      it.master = masters[i].data_ptr<float>();
    }
    it.decay = decay;
    it.lerp_weight = lerp_weight;
    it.beta2 = beta2;
    it.sq_weight = sq_weight;
    it.eps = eps;
    it.step_size = step_sizes[i];
    it.bc2_sqrt = bc2_sqrts[i];
    items.push_back(it);
  }
  return items;
}

}  // namespace piece_optim::binding
