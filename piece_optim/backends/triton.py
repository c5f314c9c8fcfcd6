"""The ``"triton"`` backend: the five ops as Triton kernels (``piece_optim.kernels``).

CUDA tensors run the compiled kernels.  CPU tensors run them in Triton's interpreter, but
only when ``TRITON_INTERPRET=1`` was set before Triton was imported: that is how the
kernels are tested on machines without a GPU (slow; never chosen by ``"auto"``).

Selection is fused: ``score_histogram_many_`` and ``score_compact`` compute the scores
from the sums inside the kernels, so the global top-k never materialises an fp32 score
tensor.  The kernels live in the repository's ``kernels/``, installed as
``piece_optim.kernels`` (setup.py's one ``package_dir`` entry), one file per op.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from .._bounds import StepStatus
from .reference import AdamWScalars

_IO = (torch.float32, torch.bfloat16, torch.float16)
_ACC = (torch.float32, torch.bfloat16)


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: blocked, as if not installed
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class TritonBackend:
    """Triton kernels (see ``kernels/``): one launch per op, small tensors batched."""

    name = "triton"
    devices = ("cuda",)  # CPU tensors (the interpreter): only when asked for by name
    priority = 30
    select_chunk = None
    checks_indices = False
    advice = (
        "install triton (pip install triton); on CPU tensors also set TRITON_INTERPRET=1 "
        "before starting Python"
    )

    def __init__(self) -> None:
        # "triton is missing" and "the kernels were not installed" are different fixes
        if not _importable("triton"):
            raise ImportError("triton is not installed")
        if not _importable("piece_optim.kernels"):
            raise ImportError(
                "piece_optim.kernels is not installed (the package was installed without "
                "the repository's kernels/ folder, which setup.py maps to "
                "piece_optim.kernels); reinstall piece-optim"
            )
        from ..kernels import accumulate, adamw, compact, histogram, score

        self._acc = accumulate
        self._adamw = adamw
        self._compact = compact
        self._hist = histogram
        self._score = score
        self._status = StepStatus()

    def not_supported_reasons(self, op: str, device: torch.device, dtypes: tuple) -> list[str]:
        why = []
        if device.type == "cpu":
            if not _interpreting():
                why.append(
                    "Triton runs on CPU tensors only in its interpreter: set "
                    "TRITON_INTERPRET=1 before starting Python (for tests; it is slow), or "
                    "move the tensors to a GPU"
                )
        elif device.type != "cuda":
            why.append(f"Triton has no {device.type} target here; use a CUDA device")
        allowed = {"accumulate": (_IO, _ACC, _ACC), "select": (_ACC,), "adamw": (_IO, _IO)}
        what = {
            "accumulate": ("the gradient", "sum_g2", "sum_g"),
            "select": ("the sums",),
            "adamw": ("the parameter", "the gradient"),
        }
        if op not in allowed:
            return [*why, f"no op {op!r}"]
        for label, ok, dt in zip(what[op], allowed[op], dtypes, strict=False):
            if dt is not None and dt not in ok:
                names = ", ".join(_name(d) for d in ok)
                why.append(f"{label} is {_name(dt)}; the kernels take {names}")
        return why

    # -- importance ---------------------------------------------------------------------------
    def accumulate_many_(
        self,
        grads: Sequence[Tensor],
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
        keys: Sequence[int] | None = None,
    ) -> None:
        self._acc.accumulate_many_triton(grads, sum_gs, sum_g2s, keys)

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
        return self._score.score_triton(sum_g, sum_g2, method, eps)

    # -- selection ----------------------------------------------------------------------------
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
            self._hist.histogram_triton(
                None, hist, shift, prefix, sum_g=s1, sum_g2=s2, method=method, eps=eps
            )

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
        return self._compact.compact_triton(
            None, thr, take_eq, index_dtype, sum_g=sum_g, sum_g2=sum_g2, method=method, eps=eps
        )

    # -- optimizer ----------------------------------------------------------------------------
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
        """One batched launch per device and dtype combination; the caller checked the
        indices, the kernels skip and flag one changed behind that check
        (:mod:`piece_optim._bounds`)."""
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        for device, ids in by_device.items():
            err = self._status.flag(device)
            self._adamw.adamw_many_triton(
                *(
                    [seq[i] for i in ids]
                    for seq in (params, grads, idxs, exp_avgs, exp_avg_sqs, masters, scalars)
                ),
                grad_is_sparse=grad_is_sparse,
                err=err,
            )
            self._status.launched(device)
