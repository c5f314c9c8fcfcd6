// CPU kernels: one parallel region per pass (at::parallel_for over a few large chunks, one
// per thread), per-thread histograms merged once, scores computed on the fly and never
// stored.  A previous version with many small OpenMP regions per call spent its time in
// thread wake-ups (0.7x torch with libgomp's default spin policy on 2 shared cores).
//
// The loop bodies live in kernels_impl.inc, compiled twice: plain x86-64 and with
// AVX2+FMA+F16C (selected at run time with __builtin_cpu_supports), so a default build runs
// anywhere and still vectorises the fma-bearing loops where the CPU allows.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

namespace piece_optim::cpu {
namespace {

constexpr int kBins = 1 << 16;
constexpr int64_t kBlock = 1024;               // scores per stack buffer (4 KiB)
constexpr int64_t kSerialHist = 1 << 15;       // below: no per-thread histograms to merge
constexpr int64_t kMinChunk = 1 << 16;         // smallest chunk worth a thread
constexpr int64_t kEqFlag = int64_t(1) << 62;  // marks "bits == thr" entries in compaction

using AccFn = void (*)(const AccumItem&, int64_t, int64_t);
using ScoreFn = void (*)(const ScoreSrc&, float*, int64_t, int64_t);
using AdamFn = void (*)(const AdamItem&, int64_t, int64_t);
template <class C>
using HistFn = int64_t (*)(const ScoreSrc&, int64_t, int64_t, C*, int, uint64_t, int64_t,
                           std::vector<int64_t>*, int64_t);

int64_t num_chunks(int64_t n, int64_t min_chunk) {
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(t, n / min_chunk));
}

// fn(chunk, lo, hi) for nch equal chunks of [0, n), in ONE parallel region.
template <class F>
void run_chunks(int64_t n, int64_t nch, const F& fn) {
  auto body = [&](int64_t c) { fn(c, n * c / nch, n * (c + 1) / nch); };
  if (nch == 1) {
    body(0);
    return;
  }
  at::parallel_for(0, nch, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) body(c);
  });
}

// torch's CPU sqrt goes through MKL's VML (vmsSqrt, accurate to 1 ulp but not correctly
// rounded: 16% of random inputs differ from IEEE sqrt) when torch is built with MKL.  To
// match the reference bit for bit we call the same function, found in libtorch_cpu; on
// builds without it (weak symbol unresolved) torch uses IEEE sqrt, and so do we.
extern "C" void vmsSqrt(int n, const float* a, float* r, long long mode) __attribute__((weak));
constexpr long long kVmlMode = 0x2 | 0x100 | 0x140000;  // VML_HA | ERRMODE_IGNORE | FTZDAZ_OFF

void block_sqrt(float* x, int64_t n) {
  if (vmsSqrt != nullptr) {
    vmsSqrt(int(n), x, x, kVmlMode);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
  }
}

std::vector<uint32_t>& tls_hist() {
  thread_local std::vector<uint32_t> h(kBins);
  return h;
}

}  // namespace

namespace generic {
#include "kernels_impl.inc"
}  // namespace generic

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PIECE_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "kernels_impl.inc"
}  // namespace avx2
#pragma GCC pop_options
#else
#define PIECE_HAVE_AVX2 0
#endif

namespace {

bool use_avx2() {
#if PIECE_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// Walk the global range [lo, hi) of items laid end to end (offsets: exclusive prefix sums).
template <class F>
void for_segments(const std::vector<int64_t>& off, int64_t lo, int64_t hi, const F& fn) {
  size_t s = std::upper_bound(off.begin(), off.end(), lo) - off.begin() - 1;
  for (; s + 1 < off.size() && off[s] < hi; ++s) {
    const int64_t a = std::max(lo, off[s]), b = std::min(hi, off[s + 1]);
    if (a < b) fn(s, a - off[s], b - off[s]);
  }
}

// One parallel region over the concatenation of all items.
template <class Item, class Fn, class Pick>
void run_many(const std::vector<Item>& items, Pick pick, int64_t min_chunk) {
  std::vector<int64_t> off(items.size() + 1, 0);
  std::vector<Fn> fns(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    off[i + 1] = off[i] + items[i].n;
    fns[i] = pick(items[i]);
  }
  const int64_t total = off.back();
  if (total == 0) return;
  run_chunks(total, num_chunks(total, min_chunk), [&](int64_t, int64_t lo, int64_t hi) {
    for_segments(off, lo, hi, [&](size_t s, int64_t a, int64_t b) { fns[s](items[s], a, b); });
  });
}

}  // namespace

void accumulate_many(const std::vector<AccumItem>& items) {
  if (use_avx2()) {
#if PIECE_HAVE_AVX2
    run_many<AccumItem, AccFn>(items, [](const AccumItem& it) { return avx2::acc_fn(it); },
                               kMinChunk);
#endif
  } else {
    run_many<AccumItem, AccFn>(items, [](const AccumItem& it) { return generic::acc_fn(it); },
                               kMinChunk);
  }
}

void adamw_many(const std::vector<AdamItem>& items) {
  // ~40 flops and 5 random accesses per entry: a thread pays off above ~16K entries
  if (use_avx2()) {
#if PIECE_HAVE_AVX2
    run_many<AdamItem, AdamFn>(items, [](const AdamItem& it) { return avx2::adam_fn(it); },
                               1 << 14);
#endif
  } else {
    run_many<AdamItem, AdamFn>(items, [](const AdamItem& it) { return generic::adam_fn(it); },
                               1 << 14);
  }
}

void score(const ScoreSrc& src, float* out) {
  ScoreFn fn = nullptr;
#if PIECE_HAVE_AVX2
  if (use_avx2()) fn = avx2::score_fn(src);
#endif
  if (fn == nullptr) fn = generic::score_fn(src);
  run_chunks(src.n, num_chunks(src.n, kMinChunk),
             [&](int64_t, int64_t lo, int64_t hi) { fn(src, out, lo, hi); });
}

void score_histogram_many(const std::vector<ScoreSrc>& items, int64_t* hist, int shift,
                          int64_t prefix, const std::vector<int64_t>& caps,
                          std::vector<std::vector<int64_t>>* cands, std::vector<char>* ok) {
  const size_t m = items.size();
  const bool want = !caps.empty() && cands != nullptr && ok != nullptr;
  std::vector<int64_t> off(m + 1, 0);
  std::vector<HistFn<uint32_t>> f32(m);
  std::vector<HistFn<int64_t>> f64(m);
  const bool wide = use_avx2();
  int64_t cap_total = 0;
  for (size_t i = 0; i < m; ++i) {
    off[i + 1] = off[i] + items[i].n;
#if PIECE_HAVE_AVX2
    if (wide) {
      f32[i] = avx2::hist_fn<uint32_t>(items[i]);
      f64[i] = avx2::hist_fn<int64_t>(items[i]);
    }
#endif
    if (!wide) {
      f32[i] = generic::hist_fn<uint32_t>(items[i]);
      f64[i] = generic::hist_fn<int64_t>(items[i]);
    }
    if (want) cap_total += caps[i];
  }
  if (want) {
    cands->assign(m, {});
    ok->assign(m, 1);
  }
  const uint64_t pre = uint64_t(prefix);
  const int64_t total = off[m];
  if (total <= kSerialHist) {  // small: count straight into the result, no merge
    for (size_t i = 0; i < m; ++i) {
      const int64_t seen = f64[i](items[i], 0, items[i].n, hist, shift, pre,
                                  want ? caps[i] : 0, want ? &(*cands)[i] : nullptr, 0);
      if (want && seen > caps[i]) {
        (*cands)[i].clear();
        (*ok)[i] = 0;
      }
    }
    return;
  }
  const int64_t nch = num_chunks(total, kMinChunk);
  std::vector<std::vector<int64_t>> parts(want ? nch : 0);  // global indices, sorted
  std::vector<int64_t> seen(nch, 0);
  std::mutex mu;
  run_chunks(total, nch, [&](int64_t c, int64_t lo, int64_t hi) {
    std::vector<uint32_t>& local = tls_hist();
    std::fill(local.begin(), local.end(), 0u);
    // uint32 counts: merge every 2**31 elements so they never wrap
    for (int64_t b = lo; b < hi; b += (int64_t(1) << 31)) {
      const int64_t e = std::min<int64_t>(hi, b + (int64_t(1) << 31));
      for_segments(off, b, e, [&](size_t i, int64_t x, int64_t y) {
        seen[c] += f32[i](items[i], x, y, local.data(), shift, pre, cap_total,
                          want ? &parts[c] : nullptr, off[i]);
      });
      std::lock_guard<std::mutex> g(mu);
      for (int j = 0; j < kBins; ++j) hist[j] += local[j];
      if (e < hi) std::fill(local.begin(), local.end(), 0u);
    }
  });
  if (!want) return;
  int64_t all_seen = 0;
  for (int64_t x : seen) all_seen += x;
  if (all_seen > cap_total) {  // some were dropped: keep none
    ok->assign(m, 0);
    return;
  }
  size_t i = 0;
  for (auto& part : parts) {
    for (int64_t gidx : part) {
      while (gidx >= off[i + 1]) ++i;
      (*cands)[i].push_back(gidx - off[i]);
    }
  }
  for (size_t j = 0; j < m; ++j) {
    if (int64_t((*cands)[j].size()) > caps[j]) {
      (*cands)[j].clear();
      (*ok)[j] = 0;
    }
  }
}

void compact_scan(const ScoreSrc& src, uint32_t thr, const int64_t* cand, int64_t ncand,
                  CompactPlan* plan) {
#if PIECE_HAVE_AVX2
  if (use_avx2()) return avx2::compact_scan_d(src, thr, cand, ncand, plan);
#endif
  generic::compact_scan_d(src, thr, cand, ncand, plan);
}

int64_t compact_count(const CompactPlan& plan, int64_t take_eq) {
  return plan.total_gt + std::min(std::max<int64_t>(take_eq, 0), plan.total_eq);
}

void compact_write(const CompactPlan& plan, int64_t take_eq, void* out, bool idx64) {
  const size_t nch = plan.parts.size();
  std::vector<int64_t> pos(nch + 1, 0), eq_before(nch + 1, 0);
  for (size_t c = 0; c < nch; ++c) {
    const int64_t neq = plan.n_eq[c];
    const int64_t ngt = int64_t(plan.parts[c].size()) - neq;
    const int64_t eq_room = std::max<int64_t>(0, std::min(neq, take_eq - eq_before[c]));
    eq_before[c + 1] = eq_before[c] + neq;
    pos[c + 1] = pos[c] + ngt + eq_room;
  }
  auto write = [&](int64_t c) {
    int64_t p = pos[c], eq_rank = eq_before[c];
    for (int64_t v : plan.parts[c]) {
      if (v & kEqFlag) {
        if (eq_rank++ >= take_eq) continue;
        v &= ~kEqFlag;
      }
      if (idx64) static_cast<int64_t*>(out)[p++] = v;
      else static_cast<int32_t*>(out)[p++] = int32_t(v);
    }
  };
  if (pos[nch] < kMinChunk || nch == 1) {
    for (size_t c = 0; c < nch; ++c) write(int64_t(c));
  } else {
    at::parallel_for(0, int64_t(nch), 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) write(c);
    });
  }
}

const char* isa() { return use_avx2() ? "avx2+fma" : "generic"; }

}  // namespace piece_optim::cpu
