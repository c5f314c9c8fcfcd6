"""Fold one gradient term into the PIECE sums, optionally building the score histogram.

``sum_g += g`` (PIECE-S only) and ``sum_g2 = fma(g, g, sum_g2)`` in fp32, stored in the
accumulator dtype (fp32, or bf16 rounded to nearest even).  The fma is not a liberty: it
is what torch's ``addcmul_`` computes (its vectorised CPU kernels use fmadd), so the
result equals :func:`piece_optim._reference.accumulate_` bit for bit.

With ``hist=`` the same pass also computes each element's score from the sums just
stored and adds it to a histogram level (see ``histogram.py``): fused into the last
calibration term, selection then needs no separate first pass over the sums.

Bytes moved per element (fp32 accumulators): PIECE-F 4 B grad (2 B bf16/fp16) + 8 B
sum_g2 read/write = 12 B; PIECE-S adds 8 B for sum_g = 20 B.  bf16 accumulators halve
the sums' share (PIECE-F 8 B, PIECE-S 12 B with an fp32 grad).

Many tensors: tensors up to ``BATCH_NUMEL`` elements are batched into one launch per
dtype combination through a device table of pointers (one program per 1024-element
block, told its tensor and offset by two small int64 tables), so a model's many biases
and norms cost one launch, not hundreds.  Larger tensors get a launch each: their work
dwarfs a launch, and their block tables would not be small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import SCORE_MODES, from_f32, launch_opts, score_of, to_f32
from .histogram import _check_hist, hist_add

BLOCK = 1024
BATCH_NUMEL = 1 << 20
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _accumulate_block(g_ptr, s1_ptr, s2_ptr, hist_ptr, offs, mask, eps, shift, prefix,
                      HAS_SUM_G: tl.constexpr, HIST_MODE: tl.constexpr):  # fmt: skip
    g = to_f32(tl.load(g_ptr + offs, mask=mask, other=0.0))
    s1 = g
    if HAS_SUM_G:
        old1 = tl.load(s1_ptr + offs, mask=mask, other=0.0)
        new1 = from_f32(to_f32(old1) + g, old1.dtype)
        tl.store(s1_ptr + offs, new1, mask=mask)
        s1 = to_f32(new1)
    old2 = tl.load(s2_ptr + offs, mask=mask, other=0.0)
    new2 = from_f32(tl.fma(g, g, to_f32(old2)), old2.dtype)
    tl.store(s2_ptr + offs, new2, mask=mask)
    if HIST_MODE != 0:
        hist_add(hist_ptr, score_of(s1, to_f32(new2), eps, HIST_MODE), mask, shift, prefix)


@triton.jit(do_not_specialize=["shift", "prefix"])
def _accumulate_kernel(g_ptr, s1_ptr, s2_ptr, hist_ptr, n, eps, shift, prefix,
                       HAS_SUM_G: tl.constexpr, HIST_MODE: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _accumulate_block(g_ptr, s1_ptr, s2_ptr, hist_ptr, offs, offs < n, eps, shift, prefix,
                      HAS_SUM_G, HIST_MODE)  # fmt: skip


@triton.jit
def _accumulate_many_kernel(table_ptr, prog_tensor_ptr, prog_start_ptr, G_DTYPE: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, HAS_SUM_G: tl.constexpr,
                            BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    start = tl.load(prog_start_ptr + pid)
    row = table_ptr + t * 4  # [grad, sum_g, sum_g2, numel]
    g_ptr = tl.load(row).to(tl.pointer_type(G_DTYPE))
    s1_ptr = tl.load(row + 1).to(tl.pointer_type(ACC_DTYPE))
    s2_ptr = tl.load(row + 2).to(tl.pointer_type(ACC_DTYPE))
    n = tl.load(row + 3)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    _accumulate_block(g_ptr, s1_ptr, s2_ptr, g_ptr, offs, offs < n, 0.0, 0, 0, HAS_SUM_G, 0)


def _check(grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor) -> tuple[Tensor, Tensor]:
    if grad.dtype not in _TL:
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


def accumulate_triton(
    grad: Tensor,
    sum_g: Tensor | None,
    sum_g2: Tensor,
    *,
    hist: Tensor | None = None,
    method: str = "piece-s",
    eps: float = 1.0,
    shift: int = 16,
    prefix: int = 0,
) -> None:
    """``sum_g += g; sum_g2 += g*g`` (fp32 math); with ``hist``, also add the new scores
    (``method``, ``eps``) to the histogram level ``(shift, prefix)``."""
    g, s2 = _check(grad, sum_g, sum_g2)
    s1 = sum_g.view(-1) if sum_g is not None else s2
    hist_mode = 0
    if hist is not None:
        if method not in SCORE_MODES:
            raise ValueError(f"method={method!r}: use 'piece-f' or 'piece-s'")
        if method == "piece-s" and sum_g is None:
            raise ValueError("piece-s needs sum_g; the estimator was built without it")
        _check_hist(hist, g.device)
        hist_mode = SCORE_MODES[method]
    n = g.numel()
    if n == 0:
        return
    _accumulate_kernel[(triton.cdiv(n, BLOCK),)](
        g, s1, s2, hist if hist is not None else s2, n, float(eps), int(shift), int(prefix),
        HAS_SUM_G=sum_g is not None, HIST_MODE=hist_mode, BLOCK=BLOCK, **launch_opts(g),
    )  # fmt: skip


def accumulate_many_triton(
    grads: Sequence[Tensor], sum_gs: Sequence[Tensor | None], sum_g2s: Sequence[Tensor]
) -> None:
    """:func:`accumulate_triton` over many tensors; small ones share one launch."""
    groups: dict[tuple, list[tuple[Tensor, Tensor | None, Tensor]]] = {}
    for grad, s1, s2 in zip(grads, sum_gs, sum_g2s, strict=True):
        g, s2f = _check(grad, s1, s2)
        n = g.numel()
        if n == 0:
            continue
        if n > BATCH_NUMEL or (s1 is not None and s1.dtype != s2.dtype):
            accumulate_triton(g, s1, s2f)
            continue
        key = (g.device, g.dtype, s2.dtype, s1 is not None)
        groups.setdefault(key, []).append((g, None if s1 is None else s1.view(-1), s2f))
    for (device, gdt, adt, has_g), items in groups.items():
        if len(items) == 1:
            accumulate_triton(*items[0])
            continue
        table, prog_t, prog_s = [], [], []
        for t, (g, s1, s2) in enumerate(items):
            n = g.numel()
            table += [g.data_ptr(), (s1 if s1 is not None else s2).data_ptr(), s2.data_ptr(), n]
            starts = range(0, n, BLOCK)
            prog_t += [t] * len(starts)
            prog_s += list(starts)
        # Freeing these tables (and any contiguous() copies) right after the launch is safe:
        # the caching allocator hands their memory only to later work on the same stream.
        tab = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        pt = torch.tensor(prog_t, dtype=torch.int64).to(device, non_blocking=True)
        ps = torch.tensor(prog_s, dtype=torch.int64).to(device, non_blocking=True)
        _accumulate_many_kernel[(len(prog_t),)](
            tab, pt, ps, G_DTYPE=_TL[gdt], ACC_DTYPE=_TL[adt], HAS_SUM_G=has_g, BLOCK=BLOCK,
            **launch_opts(items[0][0]),
        )  # fmt: skip
