// Scores, histogram passes and compaction (the global top-k of _select.py) on CUDA.
#include <cub/device/device_scan.cuh>
#include <cub/device/device_select.cuh>
#include <thrust/iterator/counting_iterator.h>

#include "cuda/common.cuh"

namespace piece_optim::cuda {
namespace {

constexpr uint32_t kNoBin = 0xFFFFFFFFu;

template <class A, int M>
__global__ void score_kernel(ScoreArgs s, float* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < s.n; i += stride)
    out[i] = __uint_as_float(score_bits<A, M>(s, i));
}

// Warp-aggregated global atomics: lanes that hit the same bin add once (__match_any_sync),
// which matters at level 1 where most scores share a few hundred bins.  The loop bound is
// block-uniform, so every lane reaches __match_any_sync with the full mask.  Block b adds
// to replica b % replicas: with one histogram the blocks' atomics on those few hundred
// bins serialised (19 ms for 1e8 scores on an H200, ten times torch.topk).
template <class A, int M>
__global__ void hist_kernel(ScoreArgs s, unsigned long long* __restrict__ hist, int replicas,
                            int shift, uint64_t prefix) {
  hist += size_t(blockIdx.x % unsigned(replicas)) * 65536u;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < s.n; base += stride) {
    const int64_t i = base + threadIdx.x;
    uint32_t bin = kNoBin;
    if (i < s.n) {
      const uint32_t u = score_bits<A, M>(s, i);
      if ((uint64_t(u) >> (shift + 16)) == prefix) bin = (u >> shift) & 0xFFFFu;
    }
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
    if (bin != kNoBin && int(threadIdx.x & 31) == __ffs(peers) - 1)
      atomicAdd(hist + bin, (unsigned long long)__popc(peers));
  }
}

template <class A, int M>
__global__ void eq_flags_kernel(ScoreArgs s, uint32_t thr, int64_t* __restrict__ eq) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < s.n; i += stride)
    eq[i] = score_bits<A, M>(s, i) == thr ? 1 : 0;
}

// keep: bits > thr, or bits == thr among the first take_eq ties (rank = inclusive count)
template <class A, int M>
__global__ void keep_flags_kernel(ScoreArgs s, uint32_t thr, int64_t take_eq,
                                  const int64_t* __restrict__ rank, uint8_t* __restrict__ keep,
                                  int64_t* __restrict__ counts) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < s.n; i += stride) {
    const uint32_t u = score_bits<A, M>(s, i);
    keep[i] = (u > thr || (u == thr && rank[i] <= take_eq)) ? 1 : 0;
    if (i == s.n - 1) counts[1] = rank[i];
  }
}

// keep: bits >= thr, for a call that keeps every tie (take_eq >= n); n_eq counts the ties
// with one warp-aggregated atomic per warp.  This skips the tie flags and their scan:
// 4 of the 6 passes of n int64 words.
template <class A, int M>
__global__ void keep_all_ties_kernel(ScoreArgs s, uint32_t thr, uint8_t* __restrict__ keep,
                                     unsigned long long* __restrict__ n_eq) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < s.n; base += stride) {
    const int64_t i = base + threadIdx.x;
    bool eq = false;
    if (i < s.n) {
      const uint32_t u = score_bits<A, M>(s, i);
      keep[i] = u >= thr ? 1 : 0;
      eq = u == thr;
    }
    const unsigned ties = __ballot_sync(0xFFFFFFFFu, eq);
    if ((threadIdx.x & 31) == 0 && ties != 0) atomicAdd(n_eq, (unsigned long long)__popc(ties));
  }
}

__global__ void narrow_kernel(const int64_t* __restrict__ in, int32_t* __restrict__ out,
                              int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = int32_t(in[i]);
}

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

size_t cub_temp_bytes(int64_t n) {
  size_t scan = 0, sel = 0;
  cub::DeviceScan::InclusiveSum(nullptr, scan, static_cast<int64_t*>(nullptr),
                                static_cast<int64_t*>(nullptr), n);
  cub::DeviceSelect::Flagged(nullptr, sel, thrust::counting_iterator<int64_t>(0),
                             static_cast<uint8_t*>(nullptr), static_cast<int64_t*>(nullptr),
                             static_cast<int64_t*>(nullptr), n);
  return scan > sel ? scan : sel;
}

struct ScoreRun {
  const ScoreArgs& s;
  float* out;
  cudaStream_t st;
  template <class A, int M>
  cudaError_t run() {
    score_kernel<A, M><<<grid_for(s.n), kThreads, 0, st>>>(s, out);
    return cudaGetLastError();
  }
};

struct HistRun {
  const ScoreArgs& s;
  unsigned long long* hist;
  int replicas;
  int shift;
  uint64_t prefix;
  cudaStream_t st;
  template <class A, int M>
  cudaError_t run() {
    hist_kernel<A, M><<<grid_for(s.n), kThreads, 0, st>>>(s, hist, replicas, shift, prefix);
    return cudaGetLastError();
  }
};

struct EqRun {
  const ScoreArgs& s;
  uint32_t thr;
  int64_t* eq;
  cudaStream_t st;
  template <class A, int M>
  cudaError_t run() {
    eq_flags_kernel<A, M><<<grid_for(s.n), kThreads, 0, st>>>(s, thr, eq);
    return cudaGetLastError();
  }
};

struct KeepRun {
  const ScoreArgs& s;
  uint32_t thr;
  int64_t take_eq;
  const int64_t* rank;
  uint8_t* keep;
  int64_t* counts;
  cudaStream_t st;
  template <class A, int M>
  cudaError_t run() {
    keep_flags_kernel<A, M><<<grid_for(s.n), kThreads, 0, st>>>(s, thr, take_eq, rank, keep,
                                                                 counts);
    return cudaGetLastError();
  }
};

struct KeepAllRun {
  const ScoreArgs& s;
  uint32_t thr;
  uint8_t* keep;
  unsigned long long* n_eq;
  cudaStream_t st;
  template <class A, int M>
  cudaError_t run() {
    keep_all_ties_kernel<A, M><<<grid_for(s.n), kThreads, 0, st>>>(s, thr, keep, n_eq);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t score(const ScoreArgs& s, float* out, cudaStream_t stream) {
  if (s.n == 0) return cudaSuccess;
  ScoreRun r{s, out, stream};
  return dispatch_score(s, r);
}

cudaError_t score_histogram(const ScoreArgs& s, int64_t* hist, int replicas, int shift,
                            int64_t prefix, cudaStream_t stream) {
  if (s.n == 0) return cudaSuccess;
  if (replicas < 1) return cudaErrorInvalidValue;
  HistRun r{s, reinterpret_cast<unsigned long long*>(hist), replicas, shift, uint64_t(prefix),
            stream};
  return dispatch_score(s, r);
}

size_t compact_workspace_bytes(int64_t n) {
  return 2 * align256(size_t(n) * 8) + align256(size_t(n)) + align256(cub_temp_bytes(n));
}

cudaError_t compact(const ScoreArgs& s, uint32_t thr, int64_t take_eq, void* workspace,
                    size_t workspace_bytes, int64_t* out, int64_t* counts, cudaStream_t stream) {
  if (s.n == 0) return cudaMemsetAsync(counts, 0, 2 * sizeof(int64_t), stream);
  char* ws = static_cast<char*>(workspace);
  int64_t* eq = reinterpret_cast<int64_t*>(ws);
  int64_t* rank = reinterpret_cast<int64_t*>(ws + align256(size_t(s.n) * 8));
  uint8_t* keep = reinterpret_cast<uint8_t*>(ws + 2 * align256(size_t(s.n) * 8));
  char* temp = ws + 2 * align256(size_t(s.n) * 8) + align256(size_t(s.n));
  size_t temp_bytes = workspace_bytes - size_t(temp - ws);
  if (workspace_bytes < compact_workspace_bytes(s.n)) return cudaErrorInvalidValue;

  cudaError_t err;
  if (take_eq >= s.n) {  // every tie is kept (the usual case: see _select.global_topk)
    err = cudaMemsetAsync(counts + 1, 0, sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
    KeepAllRun ka{s, thr, keep, reinterpret_cast<unsigned long long*>(counts + 1), stream};
    err = dispatch_score(s, ka);
    if (err != cudaSuccess) return err;
    return cub::DeviceSelect::Flagged(temp, temp_bytes, thrust::counting_iterator<int64_t>(0),
                                      keep, out, counts, s.n, stream);
  }
  EqRun f{s, thr, eq, stream};
  err = dispatch_score(s, f);
  if (err != cudaSuccess) return err;
  err = cub::DeviceScan::InclusiveSum(temp, temp_bytes, eq, rank, s.n, stream);
  if (err != cudaSuccess) return err;
  KeepRun k{s, thr, take_eq, rank, keep, counts, stream};
  err = dispatch_score(s, k);
  if (err != cudaSuccess) return err;
  return cub::DeviceSelect::Flagged(temp, temp_bytes, thrust::counting_iterator<int64_t>(0), keep,
                                    out, counts, s.n, stream);
}

cudaError_t narrow_indices(const int64_t* in, int32_t* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  narrow_kernel<<<grid_for(n), kThreads, 0, stream>>>(in, out, n);
  return cudaGetLastError();
}

}  // namespace piece_optim::cuda
