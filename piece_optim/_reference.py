"""Pure-torch reference of every piece_optim op: the spec, the fallback and the test oracle.

Every backend (Triton, C++ CPU, CUDA) implements exactly these functions with exactly
these semantics; the tests compare each backend against this file on fresh random
inputs.  Everything here is written for clarity first; it is still vectorised torch,
so it is a usable fallback on any device.

Conventions shared by all backends
----------------------------------
* Accumulators ``sum_g`` / ``sum_g2`` are flat (1-D, contiguous) tensors of the
  accumulator dtype (fp32 by default, bf16 optional).  Math is fp32 whatever the storage.
* Scores are flat fp32 tensors with values >= 0, so their IEEE-754 bit patterns,
  read as int32, order exactly like the values.  Selection works on those bits.
* Histograms are int64 tensors of ``HIST_BINS`` (65536) bins.  A histogram pass
  ``histogram_(scores, hist, shift, prefix)`` counts each element whose bits satisfy
  ``bits >> (shift + 16) == prefix`` into bin ``(bits >> shift) & 0xFFFF``.  With
  ``shift=16, prefix=0`` that is the histogram of the top 16 bits of every element
  (non-negative fp32 bits are < 2**31); with ``shift=0, prefix=b`` it is the histogram
  of the low 16 bits of the elements in top bin ``b``.  A histogram may hold R >= 1
  *replicas* (R * 65536 contiguous counters): a pass may add each count to any replica,
  and the histogram is their sum.  On a GPU the selection gives the kernels 64 replicas
  so that blocks spread their atomic adds (see ``_select._new_hist``); this reference
  adds to replica 0.
* ``compact(scores, thr, take_eq)`` returns the sorted flat indices of the elements
  with ``bits > thr`` plus the first ``take_eq`` elements (lowest flat index first)
  with ``bits == thr``, and how many of the latter it took.
* The AdamW step follows ``torch.optim.AdamW`` (single-tensor path) operation for
  operation, applied to the gathered entries ``idx`` (or to the whole tensor when
  ``idx`` is None).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HIST_BITS = 16
HIST_BINS = 1 << HIST_BITS
# Top-16-bit bins at or above this one hold +inf, NaN or negative scores (sign bit set).
BAD_SCORE_BIN = 0x7F80


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices unless the tensor is too large to address with them."""
    return torch.int64 if numel >= 2**31 else torch.int32


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the AdamW math and moments: float64 for float64 params, else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def accumulate_(grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor) -> None:
    """Fold one gradient term into the sums: ``sum_g += g``, ``sum_g2 += g*g`` (fp32 math)."""
    g = grad.reshape(-1).float()
    if sum_g is not None:
        if sum_g.dtype == torch.float32:
            sum_g.add_(g)
        else:
            sum_g.copy_(sum_g.float().add_(g))
    if sum_g2.dtype == torch.float32:
        sum_g2.addcmul_(g, g)
    else:
        sum_g2.copy_(sum_g2.float().addcmul_(g, g))


def score(sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
    """PIECE importance score, flat fp32.

    ``piece-f``: ``sum_g2``.  ``piece-s``: ``|sum_g| / sqrt(sum_g2 + eps)``.

    The scoring rule every backend implements (reference, C++, Triton, CUDA), so that bad
    numbers reach selection, whose NaN/Inf check then refuses them, instead of turning
    into plausible scores:

    * NaN in, NaN out: a NaN in either sum gives a NaN score.
    * Overflow stays visible: where ``sqrt(sum_g2 + eps)`` is +inf (``g*g`` or the sum
      overflowed fp32, e.g. one gradient of 1e20) the score is +inf, not ``finite/inf = 0``.
    * Where ``sqrt(sum_g2 + eps)`` is 0 (eps == 0 and every ``g*g`` was 0 or underflowed
      below fp32's smallest denormal) the score is 0: nothing measurable.

    Both special cases are computed as ``|sum_g| * 0`` (+ inf), which is 0 for a finite
    numerator and NaN for a NaN one, so the first rule holds in every branch.
    """
    if method == "piece-f":
        return sum_g2.float().reshape(-1).clone()
    if method == "piece-s":
        if sum_g is None:
            raise ValueError("piece-s needs sum_g; the estimator was built without it")
        num = sum_g.float().reshape(-1).abs()
        den = (sum_g2.float().reshape(-1) + eps).sqrt()
        zero = num * 0.0  # 0, or NaN where the numerator is NaN/inf
        s = torch.where(den == 0, zero, num / den)
        return torch.where(den == math.inf, zero + math.inf, s)
    raise ValueError(f"unknown method {method!r}")


def _bits(scores: Tensor) -> Tensor:
    return scores.reshape(-1).contiguous().view(torch.int32).to(torch.int64)


def histogram_(scores: Tensor, hist: Tensor, shift: int, prefix: int) -> None:
    """Add the counts of one histogram pass over ``scores`` into ``hist`` (see module doc)."""
    if hist.numel() % HIST_BINS or hist.numel() == 0 or not hist.is_contiguous():
        raise ValueError(
            f"hist must be a contiguous int64 tensor of {HIST_BINS} bins (or R * {HIST_BINS} "
            f"for R replicas), got {hist.numel()} elements"
        )
    bits = _bits(scores)
    if bits.numel() == 0:
        return
    bits = bits & 0xFFFFFFFF  # uint32 view: a negative score lands in a "bad" top bin
    keep = (bits >> (shift + HIST_BITS)) == prefix
    bins = (bits[keep] >> shift) & (HIST_BINS - 1)
    counts = torch.bincount(bins, minlength=HIST_BINS).to(hist.device, torch.int64)
    hist.view(-1, HIST_BINS)[0].add_(counts)


def compact(scores: Tensor, thr: int, take_eq: int, index_dtype: torch.dtype) -> tuple[Tensor, int]:
    """Sorted indices with bits > thr, plus the first ``take_eq`` with bits == thr."""
    bits = _bits(scores) & 0xFFFFFFFF
    gt = bits > thr
    eq = bits == thr
    if take_eq > 0:
        eq_rank = torch.cumsum(eq.to(torch.int64), 0)
        take = eq & (eq_rank <= take_eq)
        n_eq = int(min(take_eq, int(eq.sum())))
    else:
        take = torch.zeros_like(eq)
        n_eq = 0
    idx = torch.nonzero(gt | take).reshape(-1).to(index_dtype)
    return idx, n_eq


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    idx: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_is_sparse: bool = False,
) -> None:
    """One AdamW step on the entries ``idx`` of ``param`` (all entries when idx is None).

    ``grad`` is dense (shaped like ``param``) or, with ``grad_is_sparse``, the k values
    aligned with ``idx``.  ``exp_avg``/``exp_avg_sq`` (and ``master``, the fp32 copy of
    the selected entries kept for bf16/fp16 params) are fp32 of length k (or shaped like
    the param when dense).  Entries outside ``idx`` are never read or written.

    Math is fp32, except for float64 params: those are computed in float64 with float64
    moments, as ``torch.optim.AdamW`` does (rounding them through fp32 every step would
    be a silent loss of precision).
    """
    flat = param.view(-1)
    dt = compute_dtype(param.dtype)
    if exp_avg.dtype != dt or exp_avg_sq.dtype != dt:
        raise ValueError(
            f"exp_avg/exp_avg_sq are {exp_avg.dtype}/{exp_avg_sq.dtype}; a {param.dtype} "
            f"parameter needs {dt} moments"
        )
    if idx is None:
        g = grad.reshape(-1)
        w = master.view(-1) if master is not None else flat
    else:
        g = grad.reshape(-1) if grad_is_sparse else grad.reshape(-1)[idx]
        w = master.view(-1) if master is not None else flat[idx]
    g = g.to(dt)
    if w.dtype != dt:
        w = w.to(dt)
    m = exp_avg.view(-1)
    v = exp_avg_sq.view(-1)

    # Same operation order as torch.optim.adamw._single_tensor_adamw.
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    w.addcdiv_(m, denom, value=-step_size)

    if master is not None and w.data_ptr() != master.data_ptr():
        master.copy_(w.view_as(master))
    if idx is None:
        if w is not flat:
            flat.copy_(w)
    else:
        flat.index_copy_(0, idx.to(torch.int64), w.to(flat.dtype))
