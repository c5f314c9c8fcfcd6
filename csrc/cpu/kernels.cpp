// CPU kernels: one parallel job per pass over all tensors (a work-claiming pool, see Pool),
// per-thread histograms merged once per thread, scores computed on the fly and never
// stored.  A previous version with many small OpenMP regions per call spent its time in
// thread wake-ups and join barriers (0.7x torch on 2 shared cores).
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
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>

namespace piece_optim::cpu {
namespace {

constexpr int kBins = 1 << 16;
constexpr int64_t kBlock = 1024;               // scores per stack buffer (4 KiB)
constexpr int64_t kSerialHist = 1 << 15;       // below: no per-thread histograms to merge
constexpr int64_t kMinChunk = 1 << 16;         // smallest chunk worth a thread
constexpr int64_t kEqFlag = int64_t(1) << 62;  // marks "bits == thr" entries in compaction
constexpr int kSub = 4;  // interleaved per-thread level-1 histograms (kernels_impl.inc)

using AccFn = void (*)(const AccumItem&, int64_t, int64_t);
using ScoreFn = void (*)(const ScoreSrc&, float*, int64_t, int64_t);
using AdamFn = void (*)(const AdamItem&, int64_t, int64_t);
template <class C>
using HistFn = int64_t (*)(const ScoreSrc&, int64_t, int64_t, C*, int, int, uint64_t, int64_t,
                           std::vector<int64_t>*, int64_t);

// A work-claiming thread pool.  Chunks are claimed from one atomic counter tagged with the
// job's generation, and the caller returns as soon as every claimed chunk is done: a worker
// the OS has not scheduled yet finds nothing left and goes back to sleep.  OpenMP's
// fork/join (at::parallel_for) instead waits at the join barrier for every thread to
// arrive; on a loaded machine (CI: 2 shared cores) that cost up to a scheduler time slice,
// ~20 ms measured, per parallel region: more than the work itself at N = 20M.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads sleep until exit
    return *pool;
  }

  void run(int64_t nch, int threads, const std::function<void(int64_t)>& fn,
           const std::function<void()>& finish) {
    std::lock_guard<std::mutex> one_job(run_mu_);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (int(workers_.size()) < threads - 1) {
        workers_.emplace_back([this] { worker(); });
        workers_.back().detach();
      }
      gen = ++gen_;
      fn_ = &fn;
      finish_ = &finish;
      nch_ = nch;
      claim_.store((gen & kGenMask) << kGenShift, std::memory_order_release);
    }
    for (int i = 0; i < threads - 1; ++i) cv_.notify_one();
    std::exception_ptr err;
    try {
      participate(gen, nch, &fn, &finish);
    } catch (...) {  // e.g. bad_alloc: stop handing out chunks, wait, then rethrow
      err = std::current_exception();
      claim_.store(((gen & kGenMask) << kGenShift) | kIdxMask, std::memory_order_release);
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
    // wait only for chunks in flight; a worker that never started is not waited for
    for (int spin = 0; busy_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin > 256) std::this_thread::yield();
    }
    if (err) std::rethrow_exception(err);
  }

 private:
  static constexpr int kGenShift = 40;
  static constexpr uint64_t kGenMask = (uint64_t(1) << 24) - 1;
  static constexpr uint64_t kIdxMask = (uint64_t(1) << kGenShift) - 1;

  bool claim(uint64_t gen, int64_t nch, int64_t* c) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> kGenShift) != (gen & kGenMask) || int64_t(v & kIdxMask) >= nch) return false;
      if (claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
        *c = int64_t(v & kIdxMask);
        return true;
      }
    }
  }

  void participate(uint64_t gen, int64_t nch, const std::function<void(int64_t)>* fn,
                   const std::function<void()>* finish) {
    busy_.fetch_add(1, std::memory_order_acq_rel);
    bool any = false;
    int64_t c;
    while (claim(gen, nch, &c)) {
      (*fn)(c);
      any = true;
    }
    if (any) (*finish)();
    busy_.fetch_sub(1, std::memory_order_acq_rel);
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen;
      int64_t nch;
      const std::function<void(int64_t)>* fn;
      const std::function<void()>* finish;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen = gen_;
        nch = nch_;
        fn = fn_;
        finish = finish_;
      }
      participate(gen, nch, fn, finish);
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  uint64_t gen_ = 0;
  int64_t nch_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  const std::function<void()>* finish_ = nullptr;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int> busy_{0};
};

int num_threads() { return std::max(1, at::get_num_threads()); }

// Chunks of at least min_chunk elements, up to 32 per thread so a late thread's share is
// picked up by the others.
int64_t num_chunks_for(int64_t n, int64_t min_chunk, int64_t t) {
  if (t <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(32 * t, n / min_chunk));
}
int64_t num_chunks(int64_t n, int64_t min_chunk) {
  return num_chunks_for(n, min_chunk, num_threads());
}

// fn(chunk, lo, hi) for nch equal chunks of [0, n) in ONE pool job; finish() once per
// participating thread, after its last chunk.
template <class F, class G>
void run_chunks(int64_t n, int64_t nch, const F& fn, const G& finish) {
  auto body = [&](int64_t c) { fn(c, n * c / nch, n * (c + 1) / nch); };
  const int t = num_threads();
  if (nch == 1 || t == 1) {
    for (int64_t c = 0; c < nch; ++c) body(c);
    finish();
    return;
  }
  const std::function<void(int64_t)> f = body;
  const std::function<void()> fin = finish;
  Pool::get().run(nch, int(std::min<int64_t>(t, nch)), f, fin);
}

template <class F>
void run_chunks(int64_t n, int64_t nch, const F& fn) {
  run_chunks(n, nch, fn, [] {});
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

// Per-thread uint32 histogram, kSub interleaved copies of kBins (level 1 uses them all,
// other levels the first); all zero between jobs (finish() merges and clears it).
struct TlsHist {
  std::vector<uint32_t> h = std::vector<uint32_t>(kSub * kBins, 0u);
  int64_t count = 0;  // elements counted since the last merge (kept < 2**31: no wrap)
};
TlsHist& tls_hist() {
  thread_local TlsHist h;
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
  // ~40 flops and 2 cache-missing random accesses per entry: a second thread pays off from
  // ~4K entries (measured: N = 20M, k = 20K, 2 cores: 228 -> ~205 us with the prefetch)
  if (use_avx2()) {
#if PIECE_HAVE_AVX2
    run_many<AdamItem, AdamFn>(items, [](const AdamItem& it) { return avx2::adam_fn(it); },
                               1 << 12);
#endif
  } else {
    run_many<AdamItem, AdamFn>(items, [](const AdamItem& it) { return generic::adam_fn(it); },
                               1 << 12);
  }
}

namespace {
// One sequential read of the indices, no branch in the loop so it vectorises: measured
// (2-core AMD EPYC, plain x86-64 build) 1.8 us per 20K int32 indices, next to the step's
// ~210 us for them; comparing int32 indices as uint32 was 6x faster than as uint64 there.
template <class I, class U>
int64_t first_out_of_range_t(const I* idx, int64_t k, U n) {
  constexpr int64_t B = 4096;
  for (int64_t lo = 0; lo < k; lo += B) {
    const int64_t hi = std::min(k, lo + B);
    unsigned bad = 0;
    // a negative index is a huge unsigned one: one compare covers both ends
    for (int64_t j = lo; j < hi; ++j) bad |= U(idx[j]) >= n;
    if (bad) {
      for (int64_t j = lo; j < hi; ++j) {
        if (U(idx[j]) >= n) return j;
      }
    }
  }
  return -1;
}
}  // namespace

int64_t first_out_of_range(const void* idx, bool idx64, int64_t k, int64_t numel) {
  if (idx64) {
    return first_out_of_range_t(static_cast<const int64_t*>(idx), k, uint64_t(numel));
  }
  // int32 indices: with numel >= 2**31 only the negative ones (>= 2**31 as uint32) are out
  const uint32_t n = uint32_t(std::min<int64_t>(numel, int64_t(1) << 31));
  return first_out_of_range_t(static_cast<const int32_t*>(idx), k, n);
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

// Per-thread histograms count in uint32 and are merged into the int64 result before a
// thread's count since the last merge could reach 2**31 (TlsHist::count); that check runs
// between chunks, so no chunk may hold 2**31 elements or more: with one thread (or a few
// very large tensors) the pass is split into chunks of at most kMaxHistChunk.  Without it,
// one thread counting 2**32 equal scores (e.g. billions of exactly-zero ones) in one chunk
// wrapped its bin to 0.
constexpr int64_t kMaxHistChunk = int64_t(1) << 30;

int64_t hist_num_chunks(int64_t total, int64_t threads) {
  const int64_t need = (total + kMaxHistChunk - 1) / kMaxHistChunk;
  return std::max(num_chunks_for(total, kMinChunk, threads), need);
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
      const int64_t seen = f64[i](items[i], 0, items[i].n, hist, 1, shift, pre,
                                  want ? caps[i] : 0, want ? &(*cands)[i] : nullptr, 0);
      if (want && seen > caps[i]) {
        (*cands)[i].clear();
        (*ok)[i] = 0;
      }
    }
    return;
  }
  const int64_t nch = hist_num_chunks(total, num_threads());
  std::vector<std::vector<int64_t>> parts(want ? nch : 0);  // global indices, sorted
  std::vector<int64_t> seen(nch, 0);
  std::mutex mu;
  const bool level1 = shift == 16 && prefix == 0 && !want;
  auto merge = [&] {
    TlsHist& local = tls_hist();
    std::lock_guard<std::mutex> g(mu);
    const int nsub = level1 ? kSub : 1;
    const uint32_t* h = local.h.data();
    for (int c = 0; c < nsub; ++c, h += kBins) {
      for (int j = 0; j < kBins; ++j) hist[j] += h[j];
    }
    std::fill(local.h.begin(), local.h.begin() + int64_t(nsub) * kBins, 0u);
    local.count = 0;
  };
  run_chunks(
      total, nch,
      [&](int64_t c, int64_t lo, int64_t hi) {
        TlsHist& local = tls_hist();
        if (local.count + (hi - lo) >= (int64_t(1) << 31)) merge();
        local.count += hi - lo;
        for_segments(off, lo, hi, [&](size_t i, int64_t x, int64_t y) {
          seen[c] += f32[i](items[i], x, y, local.h.data(), level1 ? kSub : 1, shift, pre,
                            cap_total,
                            want ? &parts[c] : nullptr, off[i]);
        });
      },
      merge);
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
    run_chunks(int64_t(nch), int64_t(nch), [&](int64_t c, int64_t, int64_t) { write(c); });
  }
}

const char* isa() { return use_avx2() ? "avx2+fma" : "generic"; }

}  // namespace piece_optim::cpu
