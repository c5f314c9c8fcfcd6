"""Fold one gradient term into the PIECE sums.

``sum_g += g`` (PIECE-S only) and ``sum_g2 = fma(g, g, sum_g2)`` in fp32, stored in the
accumulator dtype: fp32, or bf16 rounded to nearest even or, with a key, stochastically
(the 16 random bits per entry from ``_jit_utils.stochastic_bits``: the reference's
counter-based hash, so the bf16 sums equal the reference's bit for bit).  The fma is not a
liberty: it is what torch's ``addcmul_`` computes (its vectorised CPU kernels use fmadd),
so the result equals :func:`piece_optim.backends.reference.accumulate_` bit for bit.

Bytes moved per element (fp32 accumulators): PIECE-F 4 B grad (2 B bf16/fp16) + 8 B
sum_g2 read/write = 12 B; PIECE-S adds 8 B for sum_g = 20 B.  bf16 accumulators halve
the sums' share (PIECE-F 8 B, PIECE-S 12 B with an fp32 grad).

Decision (issue 14): no fused accumulate + histogram.  A fused last term would save the
selection's first histogram pass, but the estimator cannot know which term is the last
one without a new public API, and measured (C++ CPU kernels, N = 20M, PIECE-F, 2 cores)
that pass is 16 ms against 16 ms per term and 68 ms for the two passes: 8% of an
estimation of 8 terms, 1.5% of 64; by bytes on a GPU (8 B of 20 B per term) less.

Many tensors: tensors up to ``BATCH_NUMEL`` elements are batched into one launch per
dtype combination through a device table of pointers (one program per 1024-element
block, told its tensor and offset by two small int64 tables; ``_jit_utils.batch_tables``),
so a model's many biases and norms cost one launch, not hundreds.  Larger tensors get a
launch each: their work dwarfs a launch, and their block tables would not be small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import (
    TL_DTYPES,
    batch_tables,
    from_f32,
    launch_opts,
    stochastic_bits,
    to_bf16_stochastic,
    to_f32,
)

BLOCK = 1024
BATCH_NUMEL = 1 << 20
_IO = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _store(ptr, offs, x, mask, noise16, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        tl.store(ptr + offs, to_bf16_stochastic(x, noise16), mask=mask)
    else:
        tl.store(ptr + offs, from_f32(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_block(
    g_ptr, s1_ptr, s2_ptr, offs, mask, key, HAS_SUM_G: tl.constexpr, STOCHASTIC: tl.constexpr
):
    g = to_f32(tl.load(g_ptr + offs, mask=mask, other=0.0))
    if STOCHASTIC:
        h = stochastic_bits(offs, key)
    else:
        h = offs.to(tl.uint32)  # unused
    if HAS_SUM_G:
        old1 = to_f32(tl.load(s1_ptr + offs, mask=mask, other=0.0))
        _store(s1_ptr, offs, old1 + g, mask, h >> 16, STOCHASTIC)
    old2 = to_f32(tl.load(s2_ptr + offs, mask=mask, other=0.0))
    _store(s2_ptr, offs, tl.fma(g, g, old2), mask, h & 0xFFFF, STOCHASTIC)


@triton.jit(do_not_specialize=["key"])  # a new term's key must not recompile
def _accumulate_kernel(
    g_ptr,
    s1_ptr,
    s2_ptr,
    n,
    key,
    HAS_SUM_G: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _accumulate_block(g_ptr, s1_ptr, s2_ptr, offs, offs < n, key, HAS_SUM_G, STOCHASTIC)


@triton.jit
def _accumulate_many_kernel(
    table_ptr,
    prog_tensor_ptr,
    prog_start_ptr,
    G_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    HAS_SUM_G: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    start = tl.load(prog_start_ptr + pid)
    row = table_ptr + t * 5  # [grad, sum_g, sum_g2, numel, key]
    g_ptr = tl.load(row).to(tl.pointer_type(G_DTYPE))
    s1_ptr = tl.load(row + 1).to(tl.pointer_type(ACC_DTYPE))
    s2_ptr = tl.load(row + 2).to(tl.pointer_type(ACC_DTYPE))
    n = tl.load(row + 3)
    key = tl.load(row + 4)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    _accumulate_block(g_ptr, s1_ptr, s2_ptr, offs, offs < n, key, HAS_SUM_G, STOCHASTIC)


def _check(grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor) -> tuple[Tensor, Tensor]:
    if grad.dtype not in _IO:
        raise ValueError(f"grad dtype {grad.dtype} is not supported: use fp32, bf16 or fp16")
    accs = [sum_g2] if sum_g is None else [sum_g, sum_g2]
    for a in accs:
        if a.dtype not in (torch.float32, torch.bfloat16) or not a.is_contiguous():
            raise ValueError("accumulators must be contiguous fp32 or bf16 tensors")
        if a.numel() != grad.numel() or a.device != grad.device:
            raise ValueError(
                f"accumulator of {a.numel()} elements on {a.device} does not match the grad "
                f"({grad.numel()} elements on {grad.device})"
            )
    return grad.reshape(-1).contiguous(), sum_g2.view(-1)


def _stochastic(sum_g: Tensor | None, sum_g2: Tensor, key: int | None) -> bool:
    """Stochastic rounding: a key, and bf16 sums (fp32 sums hold the exact fp32 result)."""
    dtypes = {sum_g2.dtype} | ({sum_g.dtype} if sum_g is not None else set())
    if key is not None and len(dtypes) > 1:
        raise ValueError("stochastic rounding needs sum_g and sum_g2 of one dtype")
    return key is not None and sum_g2.dtype == torch.bfloat16


def accumulate_triton(
    grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor, key: int | None = None
) -> None:
    """``sum_g += g; sum_g2 += g*g`` (fp32 math); bf16 sums rounded stochastically under
    ``key`` (``piece_optim.backends.reference.stochastic_key``), else to nearest even."""
    g, s2 = _check(grad, sum_g, sum_g2)
    s1 = sum_g.view(-1) if sum_g is not None else s2
    n = g.numel()
    if n == 0:
        return
    sr = _stochastic(sum_g, sum_g2, key)
    _accumulate_kernel[(triton.cdiv(n, BLOCK),)](
        g,
        s1,
        s2,
        n,
        int(key or 0),
        HAS_SUM_G=sum_g is not None,
        STOCHASTIC=sr,
        BLOCK=BLOCK,
        **launch_opts(g),
    )


def accumulate_many_triton(
    grads: Sequence[Tensor],
    sum_gs: Sequence[Tensor | None],
    sum_g2s: Sequence[Tensor],
    keys: Sequence[int] | None = None,
) -> None:
    """:func:`accumulate_triton` over many tensors (``keys``: one per tensor, or None);
    small ones share one launch."""
    groups: dict[tuple, list[tuple]] = {}
    for i, (grad, s1, s2) in enumerate(zip(grads, sum_gs, sum_g2s, strict=True)):
        g, s2f = _check(grad, s1, s2)
        key = None if keys is None else keys[i]
        n = g.numel()
        if n == 0:
            continue
        if n > BATCH_NUMEL or (s1 is not None and s1.dtype != s2.dtype):
            accumulate_triton(g, s1, s2f, key)
            continue
        sr = _stochastic(s1, s2, key)
        group = (g.device, g.dtype, s2.dtype, s1 is not None, sr)
        groups.setdefault(group, []).append((g, None if s1 is None else s1.view(-1), s2f, key))
    for (device, gdt, adt, has_g, sr), items in groups.items():
        if len(items) == 1:
            accumulate_triton(*items[0])
            continue
        rows = [
            [
                g.data_ptr(),
                (s1 if s1 is not None else s2).data_ptr(),
                s2.data_ptr(),
                g.numel(),
                int(key or 0),
            ]
            for g, s1, s2, key in items
        ]
        tab, pt, ps = batch_tables(rows, [it[0].numel() for it in items], BLOCK, device)
        _accumulate_many_kernel[(pt.numel(),)](
            tab,
            pt,
            ps,
            G_DTYPE=TL_DTYPES[gdt],
            ACC_DTYPE=TL_DTYPES[adt],
            HAS_SUM_G=has_g,
            STOCHASTIC=sr,
            BLOCK=BLOCK,
            **launch_opts(items[0][0]),
        )
