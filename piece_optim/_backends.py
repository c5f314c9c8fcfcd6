"""Backend dispatch.

A backend is an object with the ops of :mod:`piece_optim._reference` as methods.  The
public classes never call a kernel directly: they call the functional layer, which asks
:func:`get_backend` for the backend of a tensor's device and calls its ops.

Choosing a backend
------------------
``backend=`` on :class:`~piece_optim.ImportanceEstimator` and
:class:`~piece_optim.SparseAdamW` takes ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or
``"triton"``.  The environment variable ``PIECE_OPTIM_BACKEND`` overrides it for the
whole process (handy to run a test suite on one backend).

* An explicit choice fails loudly, with advice, when that backend is unavailable or
  cannot handle the tensor's device.
* ``"auto"`` falls back quietly: CUDA tensors use triton > cuda > torch, CPU tensors
  use cpu > torch.  Triton on CPU tensors (``TRITON_INTERPRET=1``) is only ever an
  explicit choice: the interpreter is for testing, never fast.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _reference as ref
from ._bounds import check_step_indices

BACKENDS = ("torch", "cpu", "cuda", "triton")
_ENV = "PIECE_OPTIM_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


class Backend:
    """Base class: every op defaults to the pure-torch reference.

    Subclasses override what they implement natively.  The ``*_many`` methods exist so a
    backend can batch many tensors into one launch; by default they loop.
    """

    name = "torch"

    def supports(self, device: torch.device) -> tuple[bool, str]:
        """Whether this backend can run on ``device``, and if not, why (advice)."""
        return True, ""

    # -- importance ---------------------------------------------------------------
    def accumulate_(self, grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor) -> None:
        ref.accumulate_(grad, sum_g, sum_g2)

    def accumulate_many_(
        self, grads: Sequence[Tensor], sum_gs: Sequence[Tensor | None], sum_g2s: Sequence[Tensor]
    ) -> None:
        for g, s1, s2 in zip(grads, sum_gs, sum_g2s, strict=True):
            self.accumulate_(g, s1, s2)

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
        return ref.score(sum_g, sum_g2, method, eps)

    # -- selection ----------------------------------------------------------------
    def histogram_(self, scores: Tensor, hist: Tensor, shift: int, prefix: int) -> None:
        ref.histogram_(scores, hist, shift, prefix)

    def score_histogram_(
        self,
        sum_g: Tensor | None,
        sum_g2: Tensor,
        method: str,
        eps: float,
        hist: Tensor,
        shift: int,
        prefix: int,
    ) -> None:
        """Histogram pass over the scores of one tensor, computing them on the fly.

        Backends fuse this so the full fp32 score tensor never exists.
        """
        self.histogram_(self.score(sum_g, sum_g2, method, eps), hist, shift, prefix)

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
        """One histogram pass over many tensors; backends batch it into one launch."""
        for s1, s2 in zip(sum_gs, sum_g2s, strict=True):
            self.score_histogram_(s1, s2, method, eps, hist, shift, prefix)

    def compact(
        self, scores: Tensor, thr: int, take_eq: int, index_dtype: torch.dtype
    ) -> tuple[Tensor, int]:
        return ref.compact(scores, thr, take_eq, index_dtype)

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
        return self.compact(self.score(sum_g, sum_g2, method, eps), thr, take_eq, index_dtype)

    # -- optimizer ----------------------------------------------------------------
    def adamw_step_(self, param: Tensor, grad: Tensor, idx: Tensor | None, exp_avg: Tensor,
                    exp_avg_sq: Tensor, master: Tensor | None, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, step: int,
                    grad_is_sparse: bool = False) -> None:  # fmt: skip
        ref.adamw_step_(param, grad, idx, exp_avg, exp_avg_sq, master, lr=lr, beta1=beta1,
                        beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                        grad_is_sparse=grad_is_sparse)  # fmt: skip

    def adamw_step_many_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        idxs: Sequence[Tensor | None],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        masters: Sequence[Tensor | None],
        steps: Sequence[int],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        grad_is_sparse: bool = False,
    ) -> None:
        check_step_indices(params, idxs)  # all tensors before any is written
        for p, g, i, m, v, w, s in zip(
            params, grads, idxs, exp_avgs, exp_avg_sqs, masters, steps, strict=True
        ):
            self.adamw_step_(
                p, g, i, m, v, w, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=s, grad_is_sparse=grad_is_sparse,
            )  # fmt: skip


class TorchBackend(Backend):
    """The pure-torch reference, on any device."""

    name = "torch"


# name -> (module, attribute): imported lazily, so a missing compiled part or a missing
# Triton never breaks ``import piece_optim``.
_LOADERS: dict[str, tuple[str, str]] = {
    "triton": ("piece_optim._triton_backend", "TritonBackend"),
    "cpu": ("piece_optim._ext_backend", "CpuBackend"),
    "cuda": ("piece_optim._ext_backend", "CudaBackend"),
}
_ADVICE = {
    "triton": "install triton (pip install triton); on CPU tensors also set TRITON_INTERPRET=1",
    "cpu": "build the C++ extension: pip install --no-build-isolation -e . (needs a C++ compiler "
    "and ninja)",
    "cuda": "build the CUDA extension on a machine with CUDA_HOME set and a CUDA build of torch",
}
_instances: dict[str, Backend] = {"torch": TorchBackend()}
_load_errors: dict[str, str] = {}


def _load(name: str) -> Backend | None:
    if name in _instances:
        return _instances[name]
    if name in _load_errors:
        return None
    module, attr = _LOADERS[name]
    try:
        cls: Callable[[], Backend] = getattr(importlib.import_module(module), attr)
        inst = cls()
    except Exception as exc:  # noqa: BLE001  - any failure means "unavailable"; kept for the error
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _instances[name] = inst
    return inst


def requested_backend(name: str) -> str:
    """The backend name in force: ``PIECE_OPTIM_BACKEND`` wins over ``name``."""
    env = os.environ.get(_ENV, "").strip().lower()
    chosen = env or name
    if chosen != "auto" and chosen not in BACKENDS:
        where = f"environment variable {_ENV}" if env else "backend="
        raise ValueError(
            f"unknown backend {chosen!r} (from {where}); choose one of 'auto', "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    return chosen


def validate_backend_name(name: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(
            f"backend={name!r} is not a backend; choose one of 'auto', "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    return requested_backend(name)


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend to use for tensors on ``device`` (see the module doc for the rules)."""
    device = torch.device(device)
    chosen = requested_backend(name)
    if chosen == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for cand in order:
            be = _load(cand)
            if be is not None and be.supports(device)[0]:
                return be
        return _instances["torch"]
    be = _load(chosen)
    if be is None:
        raise BackendUnavailableError(
            f"backend {chosen!r} was requested but is unavailable "
            f"({_load_errors.get(chosen, 'not loaded')}). To fix: {_ADVICE[chosen]}; "
            f"or use backend='auto' (or unset {_ENV}) to fall back automatically."
        )
    ok, why = be.supports(device)
    if not ok:
        raise BackendUnavailableError(
            f"backend {chosen!r} cannot run on {device.type} tensors: {why}. "
            f"Use backend='auto' to pick one that can."
        )
    return be


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that load and can run on ``device``."""
    out = []
    for name in BACKENDS:
        be = _load(name)
        if be is not None and be.supports(torch.device(device))[0]:
            out.append(name)
    return out
