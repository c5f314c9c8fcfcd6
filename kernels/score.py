"""PIECE importance scores from the sums, as a flat fp32 tensor.

``piece-f``: ``sum_g2``; ``piece-s``: ``|sum_g| / sqrt(sum_g2 + eps)``, 0 where the
denominator is 0.  IEEE-rounded sqrt and division (``sqrt_rn``/``div_rn``), so the result
equals :func:`piece_optim.backends.reference.score` bit for bit.  Bytes per element: PIECE-F 8 B
(read sum_g2, write the score; 6 B from bf16), PIECE-S 12 B (8 B from bf16).
Selection never needs this tensor: the histogram and compaction kernels compute the
scores on the fly; ``score_triton`` serves ``ImportanceEstimator.scores()``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import SCORE_MODES, launch_opts, load_score

BLOCK = 1024


@triton.jit
def _score_kernel(g_ptr, g2_ptr, out_ptr, n, eps, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, load_score(g2_ptr, g_ptr, g2_ptr, offs, mask, eps, MODE), mask=mask)


def score_triton(
    sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float, *, out: Tensor | None = None
) -> Tensor:
    """Flat fp32 scores of ``method`` (``"piece-f"`` or ``"piece-s"``), into ``out`` if given."""
    if method not in SCORE_MODES:
        raise ValueError(f"unknown method {method!r}")
    if method == "piece-s" and sum_g is None:
        raise ValueError("piece-s needs sum_g; the estimator was built without it")
    s2 = sum_g2.reshape(-1).contiguous()
    s1 = sum_g.reshape(-1).contiguous() if sum_g is not None else s2
    n = s2.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=s2.device)
    elif out.dtype != torch.float32 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of {n} elements")
    if n:
        _score_kernel[(triton.cdiv(n, BLOCK),)](
            s1, s2, out, n, float(eps), MODE=SCORE_MODES[method], BLOCK=BLOCK, **launch_opts(s2)
        )
    return out
