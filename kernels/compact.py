"""Compaction: the sorted indices of the selected scores of one tensor.

Selected: bits > ``thr``, plus the first ``take_eq`` elements (lowest flat index first)
with bits == ``thr`` (the tie rule: the lower global position wins).  Two passes over the
scores (read, or computed on the fly from the sums), no sort and no atomics, so the output
is sorted and deterministic:

1. ``_compact_count_kernel``: per 1024-element block, how many scores are > thr and == thr;
2. on the host side of the stream, a cumsum over the few block counts gives each block
   its first equal-rank and its output offset (one device->host read: the total size);
3. ``_compact_kernel``: each block recomputes its flags, ranks them with ``tl.cumsum``
   and writes its indices (int32, or int64 for tensors of 2**31+ elements).

Bytes per element: 2 x 4 B of scores read (2 x 4-8 B of sums when computed on the fly),
plus 4 B (int32) per selected index written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import launch_opts, load_score, score_source, uint_bits

BLOCK = 1024


@triton.jit(do_not_specialize=["thr"])
def _compact_count_kernel(
    sc_ptr, g_ptr, g2_ptr, gt_ptr, eq_ptr, n, eps, thr, MODE: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = uint_bits(load_score(sc_ptr, g_ptr, g2_ptr, offs, mask, eps, MODE))
    tl.store(gt_ptr + pid, tl.sum((mask & (b > thr)).to(tl.int64), axis=0))
    tl.store(eq_ptr + pid, tl.sum((mask & (b == thr)).to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["thr", "take_eq"])
def _compact_kernel(
    sc_ptr,
    g_ptr,
    g2_ptr,
    eq_before_ptr,
    out_off_ptr,
    out_ptr,
    n,
    eps,
    thr,
    take_eq,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = uint_bits(load_score(sc_ptr, g_ptr, g2_ptr, offs, mask, eps, MODE))
    eq = mask & (b == thr)
    eq_rank = tl.load(eq_before_ptr + pid) + tl.cumsum(eq.to(tl.int64), axis=0)
    keep = (mask & (b > thr)) | (eq & (eq_rank <= take_eq))
    pos = tl.load(out_off_ptr + pid) + tl.cumsum(keep.to(tl.int64), axis=0) - 1
    tl.store(out_ptr + pos, offs.to(out_ptr.dtype.element_ty), mask=keep)


def compact_triton(
    scores: Tensor | None,
    thr: int,
    take_eq: int,
    index_dtype: torch.dtype,
    *,
    sum_g: Tensor | None = None,
    sum_g2: Tensor | None = None,
    method: str | None = None,
    eps: float = 1.0,
) -> tuple[Tensor, int]:
    """``(sorted indices, n_eq)`` as :func:`piece_optim.backends.reference.compact`; the scores are
    ``scores`` or those of ``(sum_g, sum_g2)`` under ``method``."""
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    mode, a, b, c = score_source(scores, sum_g, sum_g2, method)
    n = c.numel()
    if index_dtype == torch.int32 and n > 2**31:
        raise ValueError(f"{n} elements cannot be addressed with int32 indices; use int64")
    if n == 0:
        return torch.empty(0, dtype=index_dtype, device=c.device), 0
    nblocks = triton.cdiv(n, BLOCK)
    opts = launch_opts(c)
    counts = torch.empty(2, nblocks, dtype=torch.int64, device=c.device)
    _compact_count_kernel[(nblocks,)](
        a, b, c, counts[0], counts[1], n, float(eps), int(thr), MODE=mode, BLOCK=BLOCK, **opts
    )
    gt, eq = counts[0], counts[1]
    take_eq = max(int(take_eq), 0)
    eq_incl = eq.cumsum(0)
    eq_before = eq_incl - eq
    taken = (take_eq - eq_before).clamp_(min=0).minimum(eq)
    out_incl = (gt + taken).cumsum(0)
    total, n_eq = (int(v) for v in torch.stack([out_incl[-1], taken.sum()]).tolist())
    out = torch.empty(total, dtype=index_dtype, device=c.device)
    if total:
        _compact_kernel[(nblocks,)](
            a,
            b,
            c,
            eq_before,
            out_incl - (gt + taken),
            out,
            n,
            float(eps),
            int(thr),
            take_eq,
            MODE=mode,
            BLOCK=BLOCK,
            **opts,
        )
    return out, n_eq
