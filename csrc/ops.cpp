// torch.library registration of the piece_optim ops and their CPU implementations.
//
// Schemas mark every mutated tensor (Tensor(a!)), so functionalization and torch.compile
// know what changes; the fake (meta) implementations are registered from Python
// (piece_optim/_ext.py).  The CUDA implementations live in cuda_binding.cpp, compiled only
// when CUDA is available.  All checks raise with the argument's name and the fix.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace {

namespace pc = piece_optim::cpu;
using at::Tensor;

pc::DType dtype_of(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return pc::DType::F32;
    case at::kBFloat16: return pc::DType::BF16;
    case at::kHalf: return pc::DType::F16;
    default:
      TORCH_CHECK(false, "piece_optim: ", what, " has dtype ", t.scalar_type(),
                  "; the C++ kernels take float32, bfloat16 or float16");
  }
}

void check_cpu(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "piece_optim: ", what, " must be a CPU tensor, got ",
              t.device());
}

void check_state(const Tensor& t, const char* what, int64_t n) {
  check_cpu(t, what);
  TORCH_CHECK(t.is_contiguous(), "piece_optim: ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == n, "piece_optim: ", what, " has ", t.numel(), " elements, expected ",
              n);
}

pc::DType acc_dtype(const Tensor& t, const char* what) {
  pc::DType d = dtype_of(t, what);
  TORCH_CHECK(d != pc::DType::F16, "piece_optim: ", what,
              " must be float32 or bfloat16 (accumulator dtypes)");
  return d;
}

pc::Method method_of(const std::string& m) {
  if (m == "piece-f") return pc::Method::F;
  if (m == "piece-s") return pc::Method::S;
  TORCH_CHECK(false, "piece_optim: method must be 'piece-f' or 'piece-s', got '", m, "'");
}

// ------------------------------------------------------------------------- accumulate
// Tensor lists that may lack an entry (sum_gs, masters) mark "none" with a 0-element tensor,
// not None: torch 2.13's auto_functionalize fails on None inside a mutable Tensor?[] (seen
// with torch.library.opcheck), and an empty selection never reaches a kernel.
void accumulate_many_(at::TensorList grads, at::TensorList sum_gs, at::TensorList sum_g2s) {
  TORCH_CHECK(grads.size() == sum_g2s.size() && (sum_gs.size() == grads.size()),
              "piece_optim: accumulate_many_ needs lists of equal length (grads ",
              grads.size(), ", sum_gs ", sum_gs.size(), ", sum_g2s ", sum_g2s.size(), ")");
  std::vector<Tensor> keep;  // contiguous copies of strided grads, alive during the kernel
  keep.reserve(grads.size());
  std::vector<pc::AccumItem> items;
  items.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& s2 = sum_g2s[i];
    const int64_t n = s2.numel();
    check_cpu(grads[i], "grad");
    TORCH_CHECK(grads[i].numel() == n, "piece_optim: grad has ", grads[i].numel(),
                " elements but sum_g2 has ", n);
    check_state(s2, "sum_g2", n);
    pc::AccumItem it{};
    keep.push_back(grads[i].contiguous());
    it.grad = keep.back().data_ptr();
    it.grad_dtype = dtype_of(grads[i], "grad");
    it.acc_dtype = acc_dtype(s2, "sum_g2");
    it.sum_g2 = s2.data_ptr();
    it.n = n;
    const Tensor& s1 = sum_gs[i];
    if (s1.defined() && s1.numel() > 0) {
      check_state(s1, "sum_g", n);
      TORCH_CHECK(s1.scalar_type() == s2.scalar_type(),
                  "piece_optim: sum_g and sum_g2 must share a dtype");
      it.sum_g = s1.data_ptr();
    }
    items.push_back(it);
  }
  pc::accumulate_many(items);
}

void accumulate_(const Tensor& grad, const std::optional<Tensor>& sum_g, const Tensor& sum_g2) {
  Tensor s1 = sum_g.has_value() && sum_g->defined() ? *sum_g : at::empty({0}, sum_g2.options());
  accumulate_many_({grad}, {s1}, {sum_g2});
}

// ---------------------------------------------------------------------- scores/select
pc::ScoreSrc score_src(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                       const std::string& method, double eps) {
  pc::ScoreSrc s{};
  check_cpu(sum_g2, "sum_g2");
  TORCH_CHECK(sum_g2.is_contiguous(), "piece_optim: sum_g2 must be contiguous");
  s.n = sum_g2.numel();
  s.acc_dtype = acc_dtype(sum_g2, "sum_g2");
  s.sum_g2 = sum_g2.data_ptr();
  s.method = method_of(method);
  s.eps = float(eps);
  if (s.method == pc::Method::S) {
    TORCH_CHECK(sum_g.has_value() && sum_g->defined(),
                "piece_optim: piece-s needs sum_g; the estimator was built without it");
    check_state(*sum_g, "sum_g", s.n);
    TORCH_CHECK(sum_g->scalar_type() == sum_g2.scalar_type(),
                "piece_optim: sum_g and sum_g2 must share a dtype");
    s.sum_g = sum_g->data_ptr();
  }
  return s;
}

Tensor score(const std::optional<Tensor>& sum_g, const Tensor& sum_g2, c10::string_view method,
             double eps) {
  pc::ScoreSrc s = score_src(sum_g, sum_g2, std::string(method), eps);
  Tensor out = at::empty({s.n}, sum_g2.options().dtype(at::kFloat));
  pc::score(s, out.data_ptr<float>());
  return out;
}

void check_hist(const Tensor& hist, int64_t shift, int64_t prefix) {
  check_cpu(hist, "hist");
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.is_contiguous() && hist.numel() == 65536,
              "piece_optim: hist must be a contiguous int64 tensor of 65536 bins");
  TORCH_CHECK(shift >= 0 && shift <= 16, "piece_optim: shift must be in [0, 16], got ", shift);
  TORCH_CHECK(prefix >= 0, "piece_optim: prefix must be >= 0, got ", prefix);
}

std::vector<Tensor> score_histogram_many_(at::TensorList sum_gs, at::TensorList sum_g2s,
                                          c10::string_view method, double eps,
                                          const Tensor& hist, int64_t shift, int64_t prefix,
                                          at::IntArrayRef cand_caps) {
  TORCH_CHECK(sum_gs.size() == sum_g2s.size(),
              "piece_optim: score_histogram_many_ needs sum_gs and sum_g2s of equal length");
  TORCH_CHECK(cand_caps.empty() || cand_caps.size() == sum_g2s.size(),
              "piece_optim: cand_caps must be empty or one per tensor");
  check_hist(hist, shift, prefix);
  std::vector<pc::ScoreSrc> items;
  for (size_t i = 0; i < sum_g2s.size(); ++i) {
    std::optional<Tensor> s1;
    if (sum_gs[i].defined() && sum_gs[i].numel() > 0) s1 = sum_gs[i];
    items.push_back(score_src(s1, sum_g2s[i], std::string(method), eps));
  }
  std::vector<int64_t> caps(cand_caps.begin(), cand_caps.end());
  std::vector<std::vector<int64_t>> cands;
  std::vector<char> ok;
  pc::score_histogram_many(items, hist.data_ptr<int64_t>(), int(shift), prefix, caps,
                           caps.empty() ? nullptr : &cands, caps.empty() ? nullptr : &ok);
  std::vector<Tensor> out;
  for (size_t i = 0; i < cands.size(); ++i) {
    auto opts = sum_g2s[i].options().dtype(at::kLong);
    if (!ok[i]) {
      out.push_back(at::empty({}, opts));  // 0-dim: no candidates kept
      continue;
    }
    Tensor t = at::empty({int64_t(cands[i].size())}, opts);
    if (!cands[i].empty()) std::memcpy(t.data_ptr<int64_t>(), cands[i].data(), cands[i].size() * 8);
    out.push_back(t);
  }
  return out;
}

Tensor score_histogram_(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                        c10::string_view method, double eps, const Tensor& hist, int64_t shift,
                        int64_t prefix, int64_t cand_cap) {
  Tensor s1 = sum_g.has_value() && sum_g->defined() ? *sum_g : at::empty({0}, sum_g2.options());
  std::vector<int64_t> caps;
  if (cand_cap > 0) caps.push_back(cand_cap);
  std::vector<Tensor> out =
      score_histogram_many_({s1}, {sum_g2}, method, eps, hist, shift, prefix, caps);
  return out.empty() ? at::empty({}, sum_g2.options().dtype(at::kLong)) : out[0];
}

void histogram_(const Tensor& scores, const Tensor& hist, int64_t shift, int64_t prefix) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "piece_optim: scores must be float32");
  Tensor sc = scores.contiguous();
  score_histogram_(std::nullopt, sc, "piece-f", 0.0, hist, shift, prefix, 0);
}

std::tuple<Tensor, int64_t> compact(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                                    c10::string_view method, double eps, int64_t thr,
                                    int64_t take_eq, at::ScalarType index_dtype,
                                    const std::optional<Tensor>& candidates) {
  TORCH_CHECK(index_dtype == at::kInt || index_dtype == at::kLong,
              "piece_optim: index_dtype must be torch.int32 or torch.int64");
  TORCH_CHECK(thr >= 0 && thr <= 0xFFFFFFFFll, "piece_optim: thr must be a uint32 bit pattern");
  Tensor s2 = sum_g2.contiguous();
  pc::ScoreSrc s = score_src(sum_g, s2, std::string(method), eps);
  const int64_t* cand = nullptr;
  int64_t ncand = 0;
  if (candidates.has_value() && candidates->defined()) {
    check_cpu(*candidates, "candidates");
    TORCH_CHECK(candidates->scalar_type() == at::kLong && candidates->dim() == 1 &&
                    candidates->is_contiguous(),
                "piece_optim: candidates must be the 1-D int64 tensor score_histogram_ made");
    cand = candidates->data_ptr<int64_t>();
    ncand = candidates->numel();
  }
  pc::CompactPlan plan;
  pc::compact_scan(s, uint32_t(thr), cand, ncand, &plan);
  const int64_t n = pc::compact_count(plan, take_eq);
  Tensor out = at::empty({n}, sum_g2.options().dtype(index_dtype));
  pc::compact_write(plan, take_eq, out.data_ptr(), index_dtype == at::kLong);
  const int64_t n_eq = std::min(std::max<int64_t>(take_eq, 0), plan.total_eq);
  return {out, n_eq};
}

// ------------------------------------------------------------------------------- AdamW
void adamw_step_many_(at::TensorList params, at::TensorList grads,
                      const c10::List<std::optional<Tensor>>& idxs, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters,
                      at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts, double lr,
                      double beta1, double beta2, double eps, double weight_decay,
                      bool grad_is_sparse, const std::optional<Tensor>& /*status*/) {
  // `status` is for the CUDA kernels (which skip and flag a bad index); this op raises
  // before writing instead (below).
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && idxs.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && masters.size() == n && step_sizes.size() == n &&
                  bc2_sqrts.size() == n,
              "piece_optim: adamw_step_many_ needs lists of equal length");
  std::vector<Tensor> keep;
  keep.reserve(2 * n);
  std::vector<pc::AdamItem> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_cpu(p, "param");
    TORCH_CHECK(p.is_contiguous(), "piece_optim: param must be contiguous");
    pc::AdamItem it{};
    it.param = p.data_ptr();
    it.param_dtype = dtype_of(p, "param");
    const std::optional<Tensor> idx = idxs.get(i);
    const bool dense = !(idx.has_value() && idx->defined());
    int64_t k = p.numel();
    if (!dense) {
      check_cpu(*idx, "idx");
      TORCH_CHECK(idx->dim() == 1 && (idx->scalar_type() == at::kInt ||
                                      idx->scalar_type() == at::kLong),
                  "piece_optim: idx must be a 1-D int32 or int64 tensor");
      keep.push_back(idx->contiguous());
      it.idx = keep.back().data_ptr();
      it.idx64 = idx->scalar_type() == at::kLong;
      k = idx->numel();
    }
    it.n = k;
    const Tensor& g = grads[i];
    check_cpu(g, "grad");
    it.grad_is_sparse = grad_is_sparse && !dense;
    TORCH_CHECK(g.numel() == (it.grad_is_sparse ? k : p.numel()), "piece_optim: grad has ",
                g.numel(), " elements, expected ", (it.grad_is_sparse ? k : p.numel()));
    keep.push_back(g.contiguous());
    it.grad = keep.back().data_ptr();
    it.grad_dtype = dtype_of(g, "grad");
    for (const Tensor* t : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      check_state(*t, "exp_avg/exp_avg_sq", k);
      TORCH_CHECK(t->scalar_type() == at::kFloat, "piece_optim: exp_avg/exp_avg_sq must be fp32");
    }
    it.exp_avg = exp_avgs[i].data_ptr<float>();
    it.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    const Tensor& w = masters[i];
    if (w.defined() && w.numel() > 0) {
      check_state(w, "master", k);
      TORCH_CHECK(w.scalar_type() == at::kFloat, "piece_optim: master must be fp32");
      it.master = w.data_ptr<float>();
    }
    // the same double expressions as _reference.adamw_step_ evaluates in Python
    it.decay = 1 - lr * weight_decay;
    it.w1 = 1 - beta1;
    it.beta2 = beta2;
    it.c2 = 1 - beta2;
    it.eps = eps;
    it.step_size = step_sizes[i];
    it.bc2_sqrt = bc2_sqrts[i];
    items.push_back(it);
  }
  // Bounds: every tensor's indices are checked before any kernel writes, so an index that
  // was changed after the optimizer validated it raises here instead of writing outside
  // the parameter, and the step is all-or-nothing (nothing at all is written).
  for (size_t i = 0; i < n; ++i) {
    const pc::AdamItem& it = items[i];
    if (it.idx == nullptr) continue;
    const int64_t numel = params[i].numel();
    const int64_t j = pc::first_out_of_range(it.idx, it.idx64, it.n, numel);
    if (j >= 0) {
      const int64_t bad = it.idx64 ? static_cast<const int64_t*>(it.idx)[j]
                                   : int64_t(static_cast<const int32_t*>(it.idx)[j]);
      TORCH_CHECK_INDEX(false, "piece_optim: sparse AdamW step: index ", bad, " (position ", j,
                        " of the indices of tensor ", i, " in this step) is outside its "
                        "parameter of ", numel, " entries; nothing was written. The "
                        "optimizer's indices were changed after they were validated (e.g. "
                        "in place through opt.state[p]['idx'] or a state_dict tensor)");
    }
  }
  pc::adamw_many(items);
}

std::string cpu_isa() { return pc::isa(); }

// For benchmarks/bench_ext.py: the step's index range check alone (position of the first
// index outside [0, numel), or -1).
int64_t first_out_of_range(const Tensor& idx, int64_t numel) {
  check_cpu(idx, "idx");
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() &&
                  (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
              "piece_optim: idx must be a contiguous 1-D int32 or int64 tensor");
  return pc::first_out_of_range(idx.data_ptr(), idx.scalar_type() == at::kLong, idx.numel(),
                                numel);
}

// For tests: the chunk plan of a histogram pass (each chunk < 2**31 scores, see kernels.cpp).
int64_t hist_num_chunks(int64_t total, int64_t threads) {
  return pc::hist_num_chunks(total, threads);
}

}  // namespace

TORCH_LIBRARY(piece_optim, m) {
  m.def("accumulate_(Tensor grad, Tensor(a!)? sum_g, Tensor(b!) sum_g2) -> ()");
  m.def("accumulate_many_(Tensor[] grads, Tensor(a!)[] sum_gs, Tensor(b!)[] sum_g2s) -> ()");
  m.def("score(Tensor? sum_g, Tensor sum_g2, str method, float eps) -> Tensor");
  m.def("histogram_(Tensor scores, Tensor(a!) hist, int shift, int prefix) -> ()");
  m.def(
      "score_histogram_many_(Tensor[] sum_gs, Tensor[] sum_g2s, str method, float eps, "
      "Tensor(a!) hist, int shift, int prefix, int[] cand_caps) -> Tensor[]");
  m.def(
      "score_histogram_(Tensor? sum_g, Tensor sum_g2, str method, float eps, Tensor(a!) hist, "
      "int shift, int prefix, int cand_cap=0) -> Tensor");
  m.def(
      "compact(Tensor? sum_g, Tensor sum_g2, str method, float eps, int thr, int take_eq, "
      "ScalarType index_dtype, Tensor? candidates=None) -> (Tensor, int)");
  m.def(
      "adamw_step_many_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] idxs, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, "
      "float[] step_sizes, float[] bc2_sqrts, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool grad_is_sparse, Tensor(e!)? status=None) -> ()");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("_hist_num_chunks(int total, int threads) -> int", &hist_num_chunks);
  m.def("_first_out_of_range(Tensor idx, int numel) -> int");
}

TORCH_LIBRARY_IMPL(piece_optim, CPU, m) {
  m.impl("accumulate_", &accumulate_);
  m.impl("accumulate_many_", &accumulate_many_);
  m.impl("score", &score);
  m.impl("histogram_", &histogram_);
  m.impl("score_histogram_", &score_histogram_);
  m.impl("score_histogram_many_", &score_histogram_many_);
  m.impl("compact", &compact);
  m.impl("adamw_step_many_", &adamw_step_many_);
  m.impl("_first_out_of_range", &first_out_of_range);
}

// `import piece_optim._C` runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
