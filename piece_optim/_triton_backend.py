"""The Triton backend: every op of :mod:`piece_optim._reference` as a Triton kernel.

CUDA tensors run the compiled kernels.  CPU tensors run them in Triton's interpreter, but
only when ``TRITON_INTERPRET=1`` was set before Triton was imported: that is how the
kernels are tested on machines without a GPU (slow; never chosen by ``"auto"``).

Selection is fused: ``score_histogram_`` and ``score_compact`` compute the scores from
the sums inside the kernels, so the global top-k never materialises an fp32 score tensor.
The kernels live in ``piece_optim.kernels`` (the repository's ``kernels/``), one file per op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ._backends import Backend
from ._bounds import StepStatus, check_step_indices


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    """Triton kernels (see ``kernels/``): one launch per op, small tensors batched."""

    name = "triton"

    def __init__(self) -> None:
        # Import here so a missing Triton makes the loader report this backend unavailable.
        from .kernels import accumulate, adamw, compact, histogram, score

        self._acc = accumulate
        self._adamw = adamw
        self._compact = compact
        self._hist = histogram
        self._score = score
        self._status = StepStatus()

    def supports(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu":
            if _interpreting():
                return True, ""
            return False, (
                "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before starting Python (for tests; it is slow), or move the tensors to a GPU"
            )
        return False, f"Triton has no {device.type} target here; use a CUDA device"

    # -- importance ---------------------------------------------------------------
    def accumulate_(self, grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor) -> None:
        self._acc.accumulate_triton(grad, sum_g, sum_g2)

    def accumulate_many_(
        self, grads: Sequence[Tensor], sum_gs: Sequence[Tensor | None], sum_g2s: Sequence[Tensor]
    ) -> None:
        self._acc.accumulate_many_triton(grads, sum_gs, sum_g2s)

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
        return self._score.score_triton(sum_g, sum_g2, method, eps)

    # -- selection ----------------------------------------------------------------
    def histogram_(self, scores: Tensor, hist: Tensor, shift: int, prefix: int) -> None:
        self._hist.histogram_triton(scores, hist, shift, prefix)

    def score_histogram_(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float,
                         hist: Tensor, shift: int, prefix: int) -> None:  # fmt: skip
        self._hist.histogram_triton(
            None, hist, shift, prefix, sum_g=sum_g, sum_g2=sum_g2, method=method, eps=eps
        )

    def compact(
        self, scores: Tensor, thr: int, take_eq: int, index_dtype: torch.dtype
    ) -> tuple[Tensor, int]:
        return self._compact.compact_triton(scores, thr, take_eq, index_dtype)

    def score_compact(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float,
                      thr: int, take_eq: int,
                      index_dtype: torch.dtype) -> tuple[Tensor, int]:  # fmt: skip
        return self._compact.compact_triton(
            None, thr, take_eq, index_dtype, sum_g=sum_g, sum_g2=sum_g2, method=method, eps=eps
        )

    # -- optimizer ----------------------------------------------------------------
    def adamw_step_(self, param: Tensor, grad: Tensor, idx: Tensor | None, exp_avg: Tensor,
                    exp_avg_sq: Tensor, master: Tensor | None, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, step: int,
                    grad_is_sparse: bool = False) -> None:  # fmt: skip
        self.adamw_step_many_(
            [param],
            [grad],
            [idx],
            [exp_avg],
            [exp_avg_sq],
            [master],
            [step],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            grad_is_sparse=grad_is_sparse,
        )

    def adamw_step_many_(self, params: Sequence[Tensor], grads: Sequence[Tensor],
                         idxs: Sequence[Tensor | None], exp_avgs: Sequence[Tensor],
                         exp_avg_sqs: Sequence[Tensor], masters: Sequence[Tensor | None],
                         steps: Sequence[int], *, lr: float, beta1: float, beta2: float,
                         eps: float, weight_decay: float,
                         grad_is_sparse: bool = False) -> None:  # fmt: skip
        """The kernel on fp32/bf16/fp16 params; float64 params (and moments) take the
        reference, which computes them in float64 as torch's AdamW does.  Indices are
        checked before anything is written (see :mod:`piece_optim._bounds`)."""
        check_step_indices(params, idxs)
        hyper = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            grad_is_sparse=grad_is_sparse,
        )
        by_device: dict[torch.device, list[int]] = {}
        wide = []
        for i, p in enumerate(params):
            (wide if p.dtype == torch.float64 else by_device.setdefault(p.device, [])).append(i)
        for device, ids in by_device.items():
            err = self._status.flag(device)
            self._adamw.adamw_many_triton(
                *(
                    [seq[i] for i in ids]
                    for seq in (params, grads, idxs, exp_avgs, exp_avg_sqs, masters, steps)
                ),
                err=err,
                **hyper,
            )
            self._status.launched(device)
        for i in wide:
            Backend.adamw_step_(
                self,
                params[i],
                grads[i],
                idxs[i],
                exp_avgs[i],
                exp_avg_sqs[i],
                masters[i],
                step=steps[i],
                **hyper,
            )
