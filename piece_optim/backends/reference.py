"""The pure-torch reference of every piece_optim op: the spec, the fallback and the test oracle.

Every backend (C++ CPU, CUDA, Triton) implements exactly these functions with exactly
these semantics; the conformance tests (``tests/test_backends.py``) compare each backend
against this file on fresh random inputs.  Written for clarity first; it is still
vectorised torch, so it is a usable fallback on any device (:class:`ReferenceBackend`,
backend name ``"torch"``).

Conventions shared by all backends
----------------------------------
* Accumulators ``sum_g`` / ``sum_g2`` are flat (1-D, contiguous) tensors of the
  accumulator dtype (fp32 by default, bf16 optional).  Math is fp32 whatever the storage.
* bf16 accumulators are rounded to nearest even, or stochastically (:func:`accumulate_`
  with a key from :func:`stochastic_key`): the 16 random bits of each entry come from a
  counter-based integer hash of (seed, term, tensor, flat index), :func:`hash32`, which
  torch (int64 ops here), C++, CUDA and Triton compute identically, so every backend gives
  the same bf16 sums bit for bit.
* Scores are flat fp32 tensors with values >= 0, so their IEEE-754 bit patterns,
  read as int32, order exactly like the values.  Selection works on those bits.
* Histograms are int64 tensors of ``HIST_BINS`` (65536) bins.  A histogram pass over
  scores counts each element whose bits satisfy ``bits >> (shift + 16) == prefix`` into
  bin ``(bits >> shift) & 0xFFFF``.  With ``shift=16, prefix=0`` that is the histogram of
  the top 16 bits of every element (non-negative fp32 bits are < 2**31); with
  ``shift=0, prefix=b`` it is the histogram of the low 16 bits of the elements in top
  bin ``b``.  A histogram of raw fp32 scores is the pass over ``(None, scores)`` with
  ``"piece-f"`` (whose score is ``sum_g2`` itself).  A histogram may hold R >= 1
  *replicas* (R * 65536 contiguous counters): a pass may add each count to any replica,
  and the histogram is their sum.  On a GPU the selection gives the kernels 64 replicas
  so that blocks spread their atomic adds (see ``_select._new_hist``); this reference
  adds to replica 0.
* ``compact(scores, thr, take_eq)`` returns the sorted flat indices of the elements
  with ``bits > thr`` plus the first ``take_eq`` elements (lowest flat index first)
  with ``bits == thr``, and how many of the latter it took.
* The AdamW step follows ``torch.optim.AdamW`` (single-tensor path) operation for
  operation, applied to the gathered entries ``idx`` (or to the whole tensor when
  ``idx`` is None).  Its scalars (decay factor, bias corrections, step size) are the
  Python doubles torch computes, made once per step by :func:`adamw_scalars`; every
  backend takes them as they are and rounds them where its kernel needs fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

HIST_BITS = 16
HIST_BINS = 1 << HIST_BITS
# Top-16-bit bins at or above this one hold +inf, NaN or negative scores (sign bit set).
BAD_SCORE_BIN = 0x7F80
METHODS = ("piece-f", "piece-s")
_M32 = 0xFFFFFFFF


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the AdamW math and moments: float64 for float64 params, else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


# -- the counter-based hash of stochastic rounding --------------------------------------------
def hash32(x: int) -> int:
    """A 32-bit integer hash (C. Wellons' "lowbias32": xor-shift-multiply, full avalanche).

    Every backend computes it on unsigned 32-bit integers; :func:`_hash32_t` is the same
    on int64 tensors holding values in [0, 2**32).
    """
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2**32 in two 16-bit halves of c: no int64 overflow for x < 2**32
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32_t(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stochastic_key(seed: int, term: int, tensor: int) -> int:
    """The 32-bit key of one accumulation: which term of the sums, into which tensor.

    Keys differ per term and per tensor, so no two accumulations share random bits;
    the same (seed, term, tensor) always gives the same bits, hence the same mask.
    """
    return hash32(hash32(hash32(seed) ^ (term & _M32)) ^ (tensor & _M32))


def stochastic_bits(key: int, start: int, n: int, device: torch.device | str) -> Tensor:
    """``hash32(lo ^ hash32(hi ^ key))`` of the flat indices ``start .. start + n - 1``
    (``lo``/``hi``: their low and high 32 bits), as int64 values in [0, 2**32).

    The high 16 bits round ``sum_g``, the low 16 bits ``sum_g2``.
    """
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return _hash32_t((i & _M32) ^ _hash32_t((i >> 32) ^ (key & _M32)))


def round_bf16_stochastic_(dst: Tensor, x: Tensor, noise16: Tensor) -> None:
    """Write fp32 ``x`` into the bf16 ``dst``, rounded stochastically with ``noise16``.

    Adding a uniform 16-bit integer to the fp32 bit pattern and clearing the low 16 bits
    rounds the magnitude up with probability (dropped bits) / 2**16, for either sign:
    unbiased.  Infinities stay (their low bits are zero), a finite value may round up to
    infinity as round-to-nearest would, and NaN stays NaN (tested before the add: a
    negative NaN's bits plus the noise could wrap around to +0).
    """
    bits = x.view(torch.int32).to(torch.int64) & _M32
    r = (bits + noise16) & 0xFFFF0000
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32).view(torch.float32)
    dst.copy_(torch.where(x.isnan(), x, r))  # exact: r has bf16 precision


# -- importance ---------------------------------------------------------------------------------
# fp32 temporaries of the stochastic path: 256K entries (~3 MiB) at a time, not a whole tensor
_SR_CHUNK = 1 << 18


def accumulate_(grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor, key: int | None = None) -> None:
    """Fold one gradient term into the sums: ``sum_g += g``, ``sum_g2 += g*g`` (fp32 math).

    bf16 sums are rounded to nearest even, or with ``key`` (:func:`stochastic_key`)
    stochastically (:func:`round_bf16_stochastic_`).  Why stochastic: with
    round-to-nearest a bf16 sum stops growing once a term is below half an ulp of it
    (2**-9 of the sum), so over hundreds of calibration batches sum g^2 of an entry with
    one large early term ignores every later one, a bias that moves entries across the
    top-k threshold; stochastic rounding is unbiased (each sum's expected value is the
    exact fp32 sum) and needs no extra storage.  fp32 sums ignore ``key`` (nothing to
    round).
    """
    g_all = grad.reshape(-1)
    if key is None or sum_g2.dtype != torch.bfloat16:
        g = g_all.float()
        if sum_g is not None:
            if sum_g.dtype == torch.float32:
                sum_g.add_(g)
            else:
                sum_g.copy_(sum_g.float().add_(g))
        if sum_g2.dtype == torch.float32:
            sum_g2.addcmul_(g, g)
        else:
            sum_g2.copy_(sum_g2.float().addcmul_(g, g))
        return
    n = g_all.numel()
    for start in range(0, n, _SR_CHUNK):
        stop = min(start + _SR_CHUNK, n)
        g = g_all[start:stop].float()
        h = stochastic_bits(key, start, stop - start, g.device)
        if sum_g is not None:
            s1 = sum_g[start:stop]
            round_bf16_stochastic_(s1, s1.float().add_(g), h >> 16)
        s2 = sum_g2[start:stop]
        round_bf16_stochastic_(s2, s2.float().addcmul_(g, g), h & 0xFFFF)


def score(sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
    """PIECE importance score, flat fp32.

    ``piece-f``: ``sum_g2``.  ``piece-s``: ``|sum_g| / sqrt(sum_g2 + eps)``.

    The scoring rule every backend implements, so that bad numbers reach selection, whose
    NaN/Inf check then refuses them, instead of turning into plausible scores:

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
    bits = bits & _M32  # uint32 view: a negative score lands in a "bad" top bin
    keep = (bits >> (shift + HIST_BITS)) == prefix
    bins = (bits[keep] >> shift) & (HIST_BINS - 1)
    counts = torch.bincount(bins, minlength=HIST_BINS).to(hist.device, torch.int64)
    hist.view(-1, HIST_BINS)[0].add_(counts)


def compact(scores: Tensor, thr: int, take_eq: int, index_dtype: torch.dtype) -> tuple[Tensor, int]:
    """Sorted indices with bits > thr, plus the first ``take_eq`` with bits == thr."""
    bits = _bits(scores) & _M32
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


# -- the AdamW step -----------------------------------------------------------------------------
class AdamWScalars(NamedTuple):
    """The scalars of one AdamW step, as the Python doubles torch's AdamW computes them.

    ``decay = 1 - lr * weight_decay``; ``lerp_weight = 1 - beta1``; ``beta2``;
    ``sq_weight = 1 - beta2``; ``eps``; ``step_size = lr / (1 - beta1**step)``;
    ``bc2_sqrt = sqrt(1 - beta2**step)``.  (A NamedTuple: made every step, and a tuple
    is made in a third of a frozen dataclass's time.)
    """

    decay: float
    lerp_weight: float
    beta2: float
    sq_weight: float
    eps: float
    step_size: float
    bc2_sqrt: float


def adamw_scalars(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> AdamWScalars:
    """The scalars of step ``step`` (>= 1), exactly the expressions of torch's single-tensor
    AdamW (``torch.optim.adamw._single_tensor_adamw``) with Python-number hyperparameters."""
    if step < 1:
        raise ValueError(f"step={step} must be >= 1 (the first step is 1)")
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return AdamWScalars(
        1 - lr * weight_decay,  # decay
        1 - beta1,  # lerp_weight
        beta2,
        1 - beta2,  # sq_weight
        eps,
        lr / bias_correction1,  # step_size
        math.sqrt(bias_correction2),  # bc2_sqrt
    )


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
    sc = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    adamw_apply_(param, grad, idx, exp_avg, exp_avg_sq, master, sc, grad_is_sparse)


def adamw_apply_(
    param: Tensor,
    grad: Tensor,
    idx: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Tensor | None,
    sc: AdamWScalars,
    grad_is_sparse: bool = False,
) -> None:
    """:func:`adamw_step_` with its scalars made already (:func:`adamw_scalars`)."""
    flat = param.view(-1)
    dt = compute_dtype(param.dtype)
    if exp_avg.dtype != dt or exp_avg_sq.dtype != dt:
        raise ValueError(
            f"exp_avg/exp_avg_sq are {exp_avg.dtype}/{exp_avg_sq.dtype}; a {param.dtype} "
            f"parameter needs {dt} moments"
        )
    g, w = gather_for_step(flat, grad, idx, master, dt, grad_is_sparse)
    m = exp_avg.view(-1)
    v = exp_avg_sq.view(-1)

    # Same operation order as torch.optim.adamw._single_tensor_adamw.
    w.mul_(sc.decay)
    m.lerp_(g, sc.lerp_weight)
    v.mul_(sc.beta2).addcmul_(g, g, value=sc.sq_weight)
    denom = (v.sqrt() / sc.bc2_sqrt).add_(sc.eps)
    w.addcdiv_(m, denom, value=-sc.step_size)
    write_back_step(flat, w, idx, master)


def gather_for_step(
    flat: Tensor,
    grad: Tensor,
    idx: Tensor | None,
    master: Tensor | None,
    dt: torch.dtype,
    grad_is_sparse: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(g, w)`` of one AdamW step in the compute dtype ``dt``: the gradient and the
    weights of the updated entries (all of ``flat``, the flat parameter, when ``idx`` is
    None; the fp32 master when there is one).  With ``grad_is_sparse`` the gradient holds
    the selected entries already.  Shared with :func:`piece_optim.functional.adamw_torch_`.
    """
    if idx is None:
        g = grad.reshape(-1)
        w = master.view(-1) if master is not None else flat
    else:
        g = grad.reshape(-1) if grad_is_sparse else grad.reshape(-1).index_select(0, idx)
        w = master.view(-1) if master is not None else flat.index_select(0, idx)
    g = g.to(dt)
    if w.dtype != dt:
        w = w.to(dt)
    return g, w


def write_back_step(flat: Tensor, w: Tensor, idx: Tensor | None, master: Tensor | None) -> None:
    """Store the stepped weights ``w`` (from :func:`gather_for_step`) into the master and
    the parameter's flat view ``flat``."""
    if master is not None and w.data_ptr() != master.data_ptr():
        master.copy_(w.view_as(master))
    if idx is None:
        if w is not flat:
            flat.copy_(w)
    else:
        flat.index_copy_(0, idx.to(torch.int64), w.to(flat.dtype))


# -- the backend --------------------------------------------------------------------------------
class ReferenceBackend:
    """The functions above as a backend (name ``"torch"``): any device, any dtype.

    ``select_chunk``: selection hands this backend tensors of at most 1M entries at a
    time: its histogram pass builds ~40 B of temporaries per entry it scores, so one
    6M-entry lm_head alone added ~170 MiB to the estimation peak.
    """

    name = "torch"
    devices = ("cpu", "cuda")  # and any other device torch runs on, when asked by name
    priority = 0
    select_chunk: int | None = 1 << 20
    checks_indices = False  # the caller checks (piece_optim.functional.sparse_adamw)
    advice = ""

    def not_supported_reasons(self, op: str, device: torch.device, dtypes: tuple) -> list[str]:
        return []

    def accumulate_many_(
        self,
        grads: Sequence[Tensor],
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
        keys: Sequence[int] | None = None,
    ) -> None:
        for i, (g, s1, s2) in enumerate(zip(grads, sum_gs, sum_g2s, strict=True)):
            accumulate_(g, s1, s2, None if keys is None else keys[i])

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
        return score(sum_g, sum_g2, method, eps)

    def score_histogram_many_(
        self,
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
        method: str,
        eps: float,
        hist: Tensor,
        shift: int,
        prefix: int,
    ) -> None:
        for s1, s2 in zip(sum_gs, sum_g2s, strict=True):
            histogram_(self.score(s1, s2, method, eps), hist, shift, prefix)

    def score_compact(
        self,
        sum_g: Tensor | None,
        sum_g2: Tensor,
        method: str,
        eps: float,
        thr: int,
        take_eq: int,
        index_dtype: torch.dtype,
    ) -> tuple[Tensor, int]:
        return compact(self.score(sum_g, sum_g2, method, eps), thr, take_eq, index_dtype)

    def adamw_step_many_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        idxs: Sequence[Tensor | None],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        masters: Sequence[Tensor | None],
        scalars: Sequence[AdamWScalars],
        grad_is_sparse: bool = False,
    ) -> None:
        """Indices are checked by the caller (:func:`piece_optim.functional.sparse_adamw`)
        before any backend writes; the index ops here would raise on a bad one too."""
        for p, g, i, m, v, w, sc in zip(
            params, grads, idxs, exp_avgs, exp_avg_sqs, masters, scalars, strict=True
        ):
            adamw_apply_(p, g, i, m, v, w, sc, grad_is_sparse)
