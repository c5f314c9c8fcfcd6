"""Histogram pass of the exact global top-k (see piece_optim/_select.py).

Scores are >= 0, so their fp32 bits order like unsigned integers.  One pass adds, for each
element whose bits ``b`` satisfy ``b >> (shift + 16) == prefix``, one count to bin
``(b >> shift) & 0xFFFF`` of an int64 histogram of 65536 bins: ``shift=16, prefix=0`` is
the histogram of the top 16 bits, ``shift=0, prefix=top`` the second level.  The scores
are read from an fp32 tensor or computed on the fly from the sums (the full score tensor
then never exists).  Bytes moved per element: the score's 4 B (or the sums': 4-8 B fp32,
2-4 B bf16) plus one atomic add on an 8 B counter (mostly cached: 65536 bins = 512 KiB).

The counts go straight to global memory with ``tl.atomic_add``: a per-block histogram of
65536 bins does not fit on chip.  At level 1 most scores share a few hundred bins, so the
atomics of all blocks on one histogram serialise: on an H200 a 1e8-entry selection took
19-20 ms, ten times ``torch.topk`` (benchmarks/gpu.py, docs/gpu.md).  ``hist`` may
therefore hold R replicas of 65536 bins (see ``_reference.histogram_``); program ``p``
adds to replica ``p % R`` and the caller sums them, which divides the contention by R.
The result stays exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import launch_opts, load_score, score_source, uint_bits

BLOCK = 1024


@triton.jit
def hist_add(hist_ptr, s, mask, shift, prefix):
    """Count the fp32 scores ``s`` (where ``mask``) into the histogram level (shift, prefix)."""
    b = uint_bits(s)
    keep = mask & ((b >> (shift + 16)) == prefix)
    bins = (b >> shift) & 0xFFFF
    ones = tl.full(bins.shape, 1, tl.int64)
    tl.atomic_add(hist_ptr + bins, ones, mask=keep, sem="relaxed")


@triton.jit
def _histogram_kernel(
    sc_ptr,
    g_ptr,
    g2_ptr,
    hist_ptr,
    replicas,
    n,
    eps,
    shift,
    prefix,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = load_score(sc_ptr, g_ptr, g2_ptr, offs, mask, eps, MODE)
    hist_add(hist_ptr + (pid % replicas).to(tl.int64) * 65536, s, mask, shift, prefix)


def _check_hist(hist: Tensor, device: torch.device) -> None:
    if (
        hist.dtype != torch.int64
        or hist.numel() == 0
        or hist.numel() % 65536
        or not hist.is_contiguous()
    ):
        raise ValueError(
            "hist must be a contiguous int64 tensor of 65536 bins (or R * 65536 for R "
            f"replicas), got {hist.dtype} with {hist.numel()} elements"
        )
    if hist.device != device:
        raise ValueError(f"hist is on {hist.device}, the scores on {device}: put both on one")


def histogram_triton(
    scores: Tensor | None,
    hist: Tensor,
    shift: int,
    prefix: int,
    *,
    sum_g: Tensor | None = None,
    sum_g2: Tensor | None = None,
    method: str | None = None,
    eps: float = 1.0,
) -> None:
    """Add one histogram pass into ``hist``: over ``scores``, or over the scores of
    ``(sum_g, sum_g2)`` with ``method`` computed on the fly."""
    mode, a, b, c = score_source(scores, sum_g, sum_g2, method)
    n = c.numel()
    _check_hist(hist, c.device)
    if n == 0:
        return
    _histogram_kernel[(triton.cdiv(n, BLOCK),)](
        a,
        b,
        c,
        hist,
        hist.numel() // 65536,
        n,
        float(eps),
        int(shift),
        int(prefix),
        MODE=mode,
        BLOCK=BLOCK,
        **launch_opts(c),
    )
