"""Helpers shared by the op files: exact dtype conversions, the score formula, the
stochastic-rounding hash and the pointer-table batching of many small tensors.

Why hand-written conversions: the bf16 <-> fp32 casts are done on the bit patterns, so
they are exact and round-to-nearest-even (NaN -> 0x7FC0) exactly like ``c10::BFloat16``
on every target, the Triton interpreter included (its default fp32 -> bf16 cast
truncates).  fp16 uses Triton's own casts (IEEE round-to-nearest-even everywhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Encodes how a kernel obtains the score of an element (a ``tl.constexpr``):
SCORE_RAW = 0  # read an fp32 score tensor
SCORE_F = 1  # piece-f: sum_g2
SCORE_S = 2  # piece-s: |sum_g| / sqrt(sum_g2 + eps), 0 where the denominator is 0
SCORE_MODES = {"piece-f": SCORE_F, "piece-s": SCORE_S}
TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int32: tl.int32,
    torch.int64: tl.int64,
}


@triton.jit
def to_f32(x):
    """Exact widening of an fp32/bf16/fp16 block to fp32."""
    if x.dtype == tl.bfloat16:
        u = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def from_f32(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even (torch's ``.to(dtype)``)."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def hash32(x):
    """``piece_optim.backends.reference.hash32`` on a uint32 block (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def stochastic_bits(offs, key):
    """The 32 random bits of the flat indices ``offs`` (int64) under ``key``: as
    ``reference.stochastic_bits``, ``hash32(lo ^ hash32(hi ^ key))``."""
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    return hash32(lo ^ hash32(hi ^ key.to(tl.uint32)))


@triton.jit
def to_bf16_stochastic(x, noise16):
    """fp32 -> bf16 rounded stochastically with 16-bit ``noise16`` (uint32), as
    ``reference.round_bf16_stochastic_``: add to the bits, clear the low 16; NaN stays NaN."""
    b = x.to(tl.uint32, bitcast=True)
    r = ((b + noise16) >> 16).to(tl.uint16)
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.bfloat16, bitcast=True)


@triton.jit
def score_of(s1, s2, eps, MODE: tl.constexpr):
    """The PIECE score from fp32 sums (``s1`` unused for piece-f); same ops as the reference.

    ``sqrt_rn`` / ``div_rn`` are the IEEE round-to-nearest operations torch uses; Triton's
    plain ``tl.sqrt`` and ``/`` may be approximate on GPUs.  The special cases follow
    :func:`piece_optim.backends.reference.score`: NaN in, NaN out; a denominator of +inf (``g*g``
    overflowed) gives +inf; a denominator of 0 gives 0.
    """
    if MODE == 2:
        num = tl.abs(s1)
        den = tl.sqrt_rn(s2 + eps)
        zero = num * 0.0  # 0, or NaN where the numerator is NaN/inf
        s = tl.where(den == 0.0, zero, tl.div_rn(num, den))
        # den > FLT_MAX <=> den == +inf (NaN compares false and keeps its NaN)
        return tl.where(den > 3.4028234663852886e38, zero + float("inf"), s)
    else:
        return s2


@triton.jit
def load_score(sc_ptr, g_ptr, g2_ptr, offs, mask, eps, MODE: tl.constexpr):
    """fp32 scores of the block ``offs``: read them (MODE 0) or compute them from the sums."""
    if MODE == 0:
        return tl.load(sc_ptr + offs, mask=mask, other=0.0)
    elif MODE == 1:
        return to_f32(tl.load(g2_ptr + offs, mask=mask, other=0.0))
    else:
        s1 = to_f32(tl.load(g_ptr + offs, mask=mask, other=0.0))
        s2 = to_f32(tl.load(g2_ptr + offs, mask=mask, other=0.0))
        return score_of(s1, s2, eps, MODE)


@triton.jit
def uint_bits(s):
    """The fp32 bit pattern as a non-negative int64 (the uint32 view used by selection)."""
    return s.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF


def batch_tables(
    rows: list[list[int]], lengths: list[int], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device tables of a batched launch over many small tensors: ``rows`` (one list
    of int64 fields per tensor: pointers, sizes, keys), and per program (one per ``block``
    entries of each tensor, ``lengths[t]`` entries) the tensor it serves and its first
    entry.  The kernel reads row ``t`` at ``table + t * len(rows[0])``.

    Freeing these tables (and any contiguous() copies) right after the launch is safe: the
    caching allocator hands their memory only to later work on the same stream.
    """
    prog_t: list[int] = []
    prog_s: list[int] = []
    for t, n in enumerate(lengths):
        starts = range(0, n, block)
        prog_t += [t] * len(starts)
        prog_s += list(starts)
    flat = [v for row in rows for v in row]
    tab = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
    pt = torch.tensor(prog_t, dtype=torch.int64).to(device, non_blocking=True)
    ps = torch.tensor(prog_s, dtype=torch.int64).to(device, non_blocking=True)
    return tab, pt, ps


def launch_opts(t: torch.Tensor) -> dict:
    """Launch options: on GPUs forbid the compiler's own mul+add -> fma contraction, so the
    only fmas are the explicit ``tl.fma`` calls that mirror torch's kernels."""
    return {"enable_fp_fusion": False} if t.device.type == "cuda" else {}


def score_source(
    scores: torch.Tensor | None,
    sum_g: torch.Tensor | None,
    sum_g2: torch.Tensor | None,
    method: str | None,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(MODE, sc, g, g2)`` pointers for :func:`load_score`: an fp32 ``scores`` tensor, or
    the sums with ``method`` (the unused pointers alias a used one)."""
    if scores is not None:
        x = scores.reshape(-1).contiguous()
        if x.dtype != torch.float32:
            raise ValueError(f"scores must be fp32, got {x.dtype}")
        return SCORE_RAW, x, x, x
    if sum_g2 is None or method not in SCORE_MODES:
        raise ValueError("pass scores, or sum_g2 (and sum_g for piece-s) with method=")
    if method == "piece-s" and sum_g is None:
        raise ValueError("piece-s needs sum_g; the estimator was built without it")
    c = sum_g2.reshape(-1).contiguous()
    b = sum_g.reshape(-1).contiguous() if sum_g is not None else c
    return SCORE_MODES[method], c, b, c
