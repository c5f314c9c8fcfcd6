"""Exact global top-k over many score tensors, without sorting.

Scores are >= 0, so their fp32 bits order like unsigned integers.  Two histogram passes
pin the k-th largest bit pattern exactly:

1. a 65536-bin histogram of the top 16 bits of every score; a prefix sum from the top
   finds the bin ``b`` holding the k-th largest value and how many lie above it;
2. a 65536-bin histogram of the low 16 bits of the scores whose top bits equal ``b``
   pins the threshold ``thr`` and the count strictly above it.

A compaction pass then writes, per tensor, the sorted indices of scores above ``thr``
plus as many scores equal to ``thr`` as are still needed, in global order (tensor order,
then flat index): the lower global position wins a tie, so masks are deterministic.
Exactly ``k`` entries are selected, for any k in [1, N], all-equal scores included.

Under FSDP2 each rank sums its histograms into the same buffers and one ``all_reduce``
per level (2 x 512 KiB of int64) gives every rank the same global threshold; see
``reduce_hist``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .backends import Backend, group_by_backend
from .backends.reference import BAD_SCORE_BIN, HIST_BINS, HIST_BITS


@dataclass
class ScoreSource:
    """One tensor's accumulators; its scores are computed on the fly by the backend."""

    sum_g: Tensor | None
    sum_g2: Tensor
    numel: int
    index_dtype: torch.dtype
    backend: Backend


def _find_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest element (1-based k) and the count in higher bins."""
    counts = np.cumsum(hist[::-1])  # counts[j] = elements in bins >= HIST_BINS-1-j
    j = int(np.searchsorted(counts, k))
    above = int(counts[j - 1]) if j > 0 else 0
    return HIST_BINS - 1 - j, above


# On a GPU the kernels count into GPU_HIST_REPLICAS copies of the histogram (block b into
# copy b % R; see _reference.histogram_), summed after the pass: with one copy the
# atomics of all blocks on the few hundred bins that hold most scores serialised, and a
# 1e8-entry selection took 19-20 ms on an H200, 10x torch.topk (docs/gpu.md).  64 copies
# are 32 MiB of int64, zeroed and summed in well under 0.1 ms.
GPU_HIST_REPLICAS = 64


def _new_hist(device: torch.device) -> Tensor:
    # The 65536-bin bookkeeping runs in numpy, single-threaded: each torch op on a CPU
    # tensor this size opens an OpenMP region, and on a loaded machine each region cost up
    # to a scheduler time slice (~20 ms measured on the 2 shared cores of CI, x9 per
    # selection), more than the histogram passes over 20M scores themselves.
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(HIST_BINS, dtype=np.int64))
    return torch.zeros(GPU_HIST_REPLICAS * HIST_BINS, dtype=torch.int64, device=device)


def _summed(hist: Tensor) -> Tensor:
    """The histogram a pass built: the sum of its replicas (one on CPU)."""
    return hist if hist.numel() == HIST_BINS else hist.view(-1, HIST_BINS).sum(0)


def _histogram_pass(
    sources: Sequence[ScoreSource], method: str, eps: float, hist: Tensor, shift: int, prefix: int
) -> None:
    """One pass over all sources, one batched call per backend (one parallel region)."""
    for be, srcs in group_by_backend(sources, lambda s: s.backend):
        be.score_histogram_many_(
            [s.sum_g for s in srcs], [s.sum_g2 for s in srcs], method, eps, hist, shift, prefix
        )


@dataclass(frozen=True)
class TopkInfo:
    """How a global top-k was decided (all counts are global, over every rank).

    ``threshold`` is the k-th largest score; ``n_above`` scores lie strictly above it and
    ``n_tied`` are equal to it, of which ``k - n_above`` were kept.  When the tie is cut
    (``n_tied > k - n_above``) ``tie_break`` says what decided it: ``"magnitude"`` (PIECE-S:
    larger ``|sum g|`` first) or ``"position"``; ``n_by_position`` entries were finally
    picked by position alone (equal on every key).  ``tie_break`` is ``"none"`` when every
    tied score was kept.
    """

    k: int
    threshold: float
    n_above: int
    n_tied: int
    tie_break: str
    n_by_position: int


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _threshold(
    sources: Sequence[ScoreSource],
    k_of: Callable[[np.ndarray], int] | int,
    method: str,
    eps: float,
    reduce_hist: Callable[[Tensor], None] | None,
) -> tuple[int, int, int, int]:
    """``(thr, k, n_above, n_eq)``: the bit pattern of the k-th largest score, k, and the
    global counts of scores above / equal to it.  ``k_of`` may be a function of the first
    (top-16-bit) histogram, so a quantile can be asked for without knowing N."""
    if not sources:
        raise ValueError("nothing to select from: no eligible parameter has importance scores")
    device = sources[0].sum_g2.device
    hist = _new_hist(device)
    _histogram_pass(sources, method, eps, hist, HIST_BITS, 0)
    hist = _summed(hist)
    if reduce_hist is not None:
        reduce_hist(hist)
    h = hist.cpu().numpy()
    n_total = int(h.sum())
    k = k_of(h) if callable(k_of) else k_of
    if not 1 <= k <= n_total:
        raise ValueError(f"k={k} must be in [1, {n_total}] (the number of eligible entries)")
    n_bad = int(h[BAD_SCORE_BIN:].sum())
    if n_bad:
        raise FloatingPointError(
            f"{n_bad} importance scores are NaN, infinite or negative: the gradients "
            "collected contained NaN/Inf, or a gradient so large (|g| > ~1.8e19) that g*g "
            "overflowed fp32. Check the loss of the calibration batches (or lower the "
            "learning rate / use fp32) and collect again."
        )
    top, above = _find_bin(h, k)

    hist = _new_hist(device)
    _histogram_pass(sources, method, eps, hist, 0, top)
    hist = _summed(hist)
    if reduce_hist is not None:
        reduce_hist(hist)
    h2 = hist.cpu().numpy()
    low, above2 = _find_bin(h2, k - above)
    return (top << HIST_BITS) | low, k, above + above2, int(h2[low])


def kth_largest(
    sources: Sequence[ScoreSource],
    k_of: Callable[[np.ndarray], int] | int,
    method: str,
    eps: float,
    *,
    reduce_hist: Callable[[Tensor], None] | None = None,
) -> float:
    """The exact k-th largest score over all sources (two histogram passes, no sort)."""
    return _bits_to_float(_threshold(sources, k_of, method, eps, reduce_hist)[0])


def global_topk(
    sources: Sequence[ScoreSource],
    k: int,
    method: str,
    eps: float,
    *,
    reduce_hist: Callable[[Tensor], None] | None = None,
    share_ties: Callable[[list[int], int], list[int]] | None = None,
    tie_break: str = "position",
) -> list[Tensor]:
    """Indices of the global top-k scores, one sorted index tensor per source.

    See :func:`global_topk_info` (which also says how ties were decided).
    """
    return global_topk_info(
        sources, k, method, eps, reduce_hist=reduce_hist, share_ties=share_ties, tie_break=tie_break
    )[0]


def global_topk_info(
    sources: Sequence[ScoreSource],
    k: int,
    method: str,
    eps: float,
    *,
    reduce_hist: Callable[[Tensor], None] | None = None,
    share_ties: Callable[[list[int], int], list[int]] | None = None,
    tie_break: str = "position",
) -> tuple[list[Tensor], TopkInfo]:
    """Indices of the global top-k scores (one sorted index tensor per source) and a
    :class:`TopkInfo`.

    ``reduce_hist`` (distributed) sums a histogram across ranks in place.
    ``share_ties(local_eq, take_eq)`` (distributed) gets this rank's count of
    threshold-equal scores per source and returns how many of them this rank keeps, per
    source; it is called only when the tie at the threshold is cut (see
    :func:`piece_optim.distributed.topk_hooks`).

    ``tie_break`` decides a cut tie at the threshold: ``"position"`` keeps the lower global
    position (tensor order, then flat index); ``"magnitude"`` (PIECE-S only; PIECE-F's
    score already is the magnitude) keeps the larger ``|sum g|`` first, then the lower
    position.  The secondary key is read from the accumulators in torch, so every backend
    gives the same mask; it costs two extra compactions per source, and only when a tie
    is cut.
    """
    if tie_break not in ("position", "magnitude"):
        raise ValueError(f"tie_break={tie_break!r} must be 'magnitude' or 'position'")
    thr, k, n_above, n_eq = _threshold(sources, k, method, eps, reduce_hist)
    take_eq = k - n_above  # how many threshold-equal scores to keep, globally
    # Every threshold-equal score kept (the usual case: continuous scores rarely tie): each
    # source is told "keep all" (take_eq = its size), which lets the CUDA compaction skip
    # ranking the ties (4 of its 6 passes over n int64 words).  Same result by definition.
    keep_all = take_eq >= n_eq
    info = dict(k=k, threshold=_bits_to_float(thr), n_above=n_above, n_tied=n_eq)
    if keep_all:
        info.update(tie_break="none", n_by_position=0)
    elif tie_break == "magnitude" and method == "piece-s":
        out, n_pos = _magnitude_ties(
            sources, method, eps, thr, take_eq, n_eq, reduce_hist, share_ties
        )
        return out, TopkInfo(**info, tie_break="magnitude", n_by_position=n_pos)
    else:
        info.update(tie_break="position", n_by_position=take_eq)
    quota = None if keep_all else _tie_quota(sources, method, eps, thr, take_eq, n_eq, share_ties)
    out = []
    for i, s in enumerate(sources):
        take = s.numel if keep_all else (take_eq if quota is None else quota[i])
        idx, n_taken = s.backend.score_compact(
            s.sum_g, s.sum_g2, method, eps, thr, take, s.index_dtype
        )
        take_eq -= n_taken
        out.append(idx)
    return out, TopkInfo(**info)


# Tied entries cached between the passes of the magnitude tie-break up to this many
# (~12 B each: index + key); beyond, they are recomputed per pass (two compactions).
_TIE_CACHE_MAX = 1 << 22


def _magnitude_ties(sources, method, eps, thr, take_eq, n_eq, reduce_hist, share_ties):
    """Keep the ``take_eq`` threshold-tied entries with the largest ``|sum g|``.

    The same exact two-level histogram selection as the main one, run on the tied
    entries' secondary keys (fp32 ``|sum g|``, >= 0) with the reference ops; entries equal
    on that key too go by position (``share_ties`` splits them across ranks).
    """
    from .backends import reference as ref

    cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def tied(i: int) -> tuple[Tensor, Tensor, Tensor]:
        if i in cache:
            return cache[i]
        s = sources[i]
        gt, _ = s.backend.score_compact(s.sum_g, s.sum_g2, method, eps, thr, 0, s.index_dtype)
        ge, _ = s.backend.score_compact(s.sum_g, s.sum_g2, method, eps, thr, s.numel, s.index_dtype)
        eq = ge[~torch.isin(ge, gt)]
        keys = s.sum_g.reshape(-1)[eq.long()].float().abs()
        if n_eq <= _TIE_CACHE_MAX:
            cache[i] = (gt, eq, keys)
        return gt, eq, keys

    def key_hist(shift: int, prefix: int) -> np.ndarray:
        hist = _new_hist(sources[0].sum_g2.device)
        for i in range(len(sources)):
            ref.histogram_(tied(i)[2], hist, shift, prefix)
        hist = _summed(hist)  # GPU: the replicas (the reference op fills the first)
        if reduce_hist is not None:
            reduce_hist(hist)
        return hist.cpu().numpy()

    top, above = _find_bin(key_hist(HIST_BITS, 0), take_eq)
    h2 = key_hist(0, top)
    low, above2 = _find_bin(h2, take_eq - above)
    thr2 = (top << HIST_BITS) | low
    take2 = take_eq - above - above2  # entries equal on the key too, still needed globally
    n_by_position = take2 if take2 < int(h2[low]) else 0
    quota = None
    if share_ties is not None and n_by_position:
        local = [int((ref._bits(tied(i)[2]) == thr2).sum()) for i in range(len(sources))]
        quota = share_ties(local, take2)
    out = []
    for i, s in enumerate(sources):
        gt, eq, keys = tied(i)
        pos, n_taken = ref.compact(keys, thr2, take2 if quota is None else quota[i], torch.int64)
        take2 -= n_taken
        out.append(torch.cat([gt, eq[pos]]).sort().values.to(s.index_dtype))
    return out, n_by_position


def _tie_quota(sources, method, eps, thr, take_eq, n_eq_global, share_ties):
    """Per-source count of threshold-equal scores to keep on this rank, or None.

    None (the running count decides) for one process, or when every tied score is kept.
    """
    if share_ties is None or take_eq >= n_eq_global:
        return None
    local_eq = [
        s.backend.score_compact(s.sum_g, s.sum_g2, method, eps, thr, s.numel, s.index_dtype)[1]
        for s in sources
    ]
    return share_ties(local_eq, take_eq)


def _chunked_topk(sources: list[ScoreSource], k: int, method: str, eps: float) -> list[Tensor]:
    """The indices of :func:`_chunked_topk_info` (position tie-break)."""
    return _chunked_topk_info(sources, k, method, eps)[0]


def _chunked_topk_info(
    sources: list[ScoreSource], k: int, method: str, eps: float, tie_break: str = "position"
) -> tuple[list[Tensor], TopkInfo]:
    """:func:`global_topk_info`, handing each source to its backend in pieces of at most its
    ``select_chunk`` entries (sources whose backend has none stay whole).

    Why: a backend's histogram pass may build temporaries proportional to the tensor it
    scores (the pure-torch one: ~40 B per entry), so one 6M-entry lm_head alone added
    ~170 MiB to the estimation peak.  The kernels build none, and each piece costs a
    compaction call with one host sync on a GPU (~950 of them for 1e9 entries), so they
    take whole tensors.  Pieces keep the global order (tensor, then flat index), so ties
    and the result are unchanged; indices are shifted back per tensor.
    """
    pieces: list[ScoreSource] = []
    owners: list[tuple[int, int]] = []  # (source number, offset)
    for i, s in enumerate(sources):
        chunk = s.backend.select_chunk
        if chunk is None or s.numel <= chunk:
            pieces.append(s)
            owners.append((i, 0))
            continue
        for start in range(0, s.numel, chunk):
            stop = min(start + chunk, s.numel)
            s1 = None if s.sum_g is None else s.sum_g[start:stop]
            pieces.append(
                ScoreSource(s1, s.sum_g2[start:stop], stop - start, s.index_dtype, s.backend)
            )
            owners.append((i, start))
    if len(pieces) == len(sources):
        return global_topk_info(sources, k, method, eps, tie_break=tie_break)
    idxs, info = global_topk_info(pieces, k, method, eps, tie_break=tie_break)
    parts: list[list[Tensor]] = [[] for _ in sources]
    for (i, start), idx in zip(owners, idxs, strict=True):
        if idx.numel():
            parts[i].append(idx.to(sources[i].index_dtype) + start if start else idx)
    empty = [torch.empty(0, dtype=s.index_dtype, device=s.sum_g2.device) for s in sources]
    return [
        torch.cat(p) if len(p) > 1 else p[0] if p else e for p, e in zip(parts, empty, strict=True)
    ], info
