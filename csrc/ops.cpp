// torch.library registration of the piece_optim ops and their CPU implementations.
//
// The five ops are the ones piece_optim.backends.native calls; schemas mark every mutated
// tensor (Tensor(a!)), so functionalization and torch.compile know what changes; the fake
// (meta) implementations are registered from Python (piece_optim/backends/_native_ops.py).
// The CUDA implementations live in cuda_binding.cpp, compiled only when CUDA is available;
// both bindings check and translate their arguments with binding.h, so they stay
// symmetric.  All checks raise with the argument's name and the fix.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include <string>
#include <vector>

#include "binding.h"
#include "cpu/kernels.h"

namespace {

namespace pc = piece_optim::cpu;
namespace pb = piece_optim::binding;
using at::Tensor;
constexpr auto kCPU = c10::DeviceType::CPU;

void accumulate_many_(at::TensorList grads, at::TensorList sum_gs, at::TensorList sum_g2s,
                      at::IntArrayRef keys) {
  std::vector<Tensor> keep;
  pc::accumulate_many(pb::accum_items(grads, sum_gs, sum_g2s, keys, kCPU, &keep));
}

Tensor score(const std::optional<Tensor>& sum_g, const Tensor& sum_g2, c10::string_view method,
             double eps) {
  const pc::ScoreSrc s = pb::score_src(sum_g, sum_g2, method, eps, kCPU);
  Tensor out = at::empty({s.n}, sum_g2.options().dtype(at::kFloat));
  pc::score(s, out.data_ptr<float>());
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
  pb::check_device(hist, "hist", kCPU);
  pb::check_hist(hist, shift, prefix, hist);
  std::vector<pc::ScoreSrc> items;
  for (size_t i = 0; i < sum_g2s.size(); ++i) {
    std::optional<Tensor> s1;
    if (pb::present(sum_gs[i])) s1 = sum_gs[i];
    items.push_back(pb::score_src(s1, sum_g2s[i], method, eps, kCPU));
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

std::tuple<Tensor, int64_t> compact(const std::optional<Tensor>& sum_g, const Tensor& sum_g2,
                                    c10::string_view method, double eps, int64_t thr,
                                    int64_t take_eq, at::ScalarType index_dtype,
                                    const std::optional<Tensor>& candidates) {
  pb::check_compact_args(thr, index_dtype);
  const Tensor s2 = sum_g2.contiguous();
  const pc::ScoreSrc s = pb::score_src(sum_g, s2, method, eps, kCPU);
  const int64_t* cand = nullptr;
  int64_t ncand = 0;
  if (candidates.has_value() && candidates->defined()) {
    pb::check_device(*candidates, "candidates", kCPU);
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

void adamw_step_many_(at::TensorList params, at::TensorList grads,
                      const c10::List<std::optional<Tensor>>& idxs, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters,
                      at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts,
                      double decay, double lerp_weight, double beta2, double sq_weight,
                      double eps, bool grad_is_sparse, const std::optional<Tensor>& /*status*/) {
  // `status` is for the CUDA kernels (which skip and flag a bad index); this op raises
  // before writing instead (below).
  std::vector<Tensor> keep;
  const std::vector<pc::AdamItem> items =
      pb::adam_items(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, step_sizes, bc2_sqrts,
                     decay, lerp_weight, beta2, sq_weight, eps, grad_is_sparse, kCPU, &keep);
  // Bounds: every tensor's indices are checked before any kernel writes, so an index that
  // was changed after the optimizer validated it raises here instead of writing outside
  // the parameter, and the step is all-or-nothing (nothing at all is written).
  for (size_t i = 0; i < items.size(); ++i) {
    const pc::AdamItem& it = items[i];
    if (it.idx == nullptr) continue;
    const int64_t j = pc::first_out_of_range(it.idx, it.idx64, it.n, it.numel);
    if (j >= 0) {
      const int64_t bad = it.idx64 ? static_cast<const int64_t*>(it.idx)[j]
                                   : int64_t(static_cast<const int32_t*>(it.idx)[j]);
      TORCH_CHECK_INDEX(false, "piece_optim: sparse AdamW step: index ", bad, " (position ", j,
                        " of the indices of tensor ", i, " in this step) is outside its "
                        "parameter of ", it.numel, " entries; nothing was written. The "
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
  pb::check_device(idx, "idx", kCPU);
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
  m.def(
      "accumulate_many_(Tensor[] grads, Tensor(a!)[] sum_gs, Tensor(b!)[] sum_g2s, int[] keys) "
      "-> ()");
  m.def("score(Tensor? sum_g, Tensor sum_g2, str method, float eps) -> Tensor");
  m.def(
      "score_histogram_many_(Tensor[] sum_gs, Tensor[] sum_g2s, str method, float eps, "
      "Tensor(a!) hist, int shift, int prefix, int[] cand_caps) -> Tensor[]");
  m.def(
      "compact(Tensor? sum_g, Tensor sum_g2, str method, float eps, int thr, int take_eq, "
      "ScalarType index_dtype, Tensor? candidates=None) -> (Tensor, int)");
  m.def(
      "adamw_step_many_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] idxs, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, "
      "float[] step_sizes, float[] bc2_sqrts, float decay, float lerp_weight, float beta2, "
      "float sq_weight, float eps, bool grad_is_sparse, Tensor(e!)? status=None) -> ()");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("_hist_num_chunks(int total, int threads) -> int", &hist_num_chunks);
  m.def("_first_out_of_range(Tensor idx, int numel) -> int");
}

TORCH_LIBRARY_IMPL(piece_optim, CPU, m) {
  m.impl("accumulate_many_", &accumulate_many_);
  m.impl("score", &score);
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
