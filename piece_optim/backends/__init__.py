"""Backends: one protocol, one registry, one rule.

A backend implements the five ops the product uses (:class:`Backend`); the pure-torch
reference (:mod:`piece_optim.backends.reference`, name ``"torch"``) is their spec, the
fallback and the tests' oracle.  The others: ``"cpu"`` and ``"cuda"``
(:mod:`~piece_optim.backends.native`, one class over the compiled ``torch.ops.piece_optim``)
and ``"triton"`` (:mod:`~piece_optim.backends.triton`).

Choosing a backend
------------------
``backend=`` on :class:`~piece_optim.ImportanceEstimator` and
:class:`~piece_optim.SparseAdamW` (and on the :mod:`piece_optim.functional` entry points)
takes ``"auto"`` or a registered name.  The environment variable ``PIECE_OPTIM_BACKEND``
overrides it for the whole process (that is how the test suite runs on one backend).
The rule, owned by :func:`resolve` and nothing else (xformers' dispatch is the model):

* Each backend says, per op and input (device, dtypes), why it cannot take it
  (``not_supported_reasons``; empty: it can).
* A backend requested by name runs the op or raises :class:`BackendUnavailableError`
  naming the backend, the op, every reason and the fix.  It never hands the input to
  another backend behind the caller's back.
* ``"auto"`` takes, per op and input, the first backend by ``priority`` among those made
  for the device type (CUDA tensors: triton > cuda > torch; CPU tensors: cpu > torch;
  Triton on CPU tensors, i.e. its interpreter, is only ever an explicit choice) that
  loads and has no reason against the input.  The reference takes everything, so
  ``"auto"`` always runs.  When it passes over a backend that loaded because of the
  input (float64 parameters, say, which the kernels do not compute), it says so once per
  kind of input on the ``piece_optim`` logger (INFO), and :func:`explain` tells why at
  any time.

Decisions are cached per (name, op, device, dtypes), so the rule costs one dict lookup
per group of tensors on the hot path.

Adding a backend: a module with a class that has the five ops and ``name``,
``devices``, ``priority``, ``select_chunk``, ``advice``, ``not_supported_reasons``; one
:func:`register` line below; its tolerances, if it is not bit-exact, in ``tol_of`` of
``tests/helpers.py`` (``tests/test_backends.py`` then tests it); a stage in ``scripts/test.sh``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from .. import _env

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "explain",
    "get_backend",
    "group_by_backend",
    "load",
    "names",
    "register",
    "requested_backend",
    "resolve",
    "validate_backend_name",
]

log = logging.getLogger("piece_optim")
_ENV = "BACKEND"  # PIECE_OPTIM_BACKEND
OPS = ("accumulate", "select", "adamw")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (or cannot take this input)."""


class Backend(Protocol):
    """What a backend provides.  Tensors are on one device per call.

    ``name``: what ``backend=`` calls it.  ``devices``: the device types ``"auto"``
    considers it for.  ``priority``: higher goes first under ``"auto"``.
    ``select_chunk``: the most entries selection hands it at a time (None: whole tensors;
    a backend whose passes build per-entry temporaries bounds them this way).
    ``advice``: how to make it available, for the error when it does not load.
    ``not_supported_reasons(op, device, dtypes)``: why it cannot take an input (empty:
    it can); ``op`` is one of ``"accumulate"`` (dtypes: grad, sum_g2), ``"select"``
    (the sums' dtype) and ``"adamw"`` (param, grad).  The ops:

    * ``accumulate_many_(grads, sum_gs, sum_g2s, keys=None)``: fold one term into each
      pair of sums (``keys``: per tensor, the stochastic-rounding key of bf16 sums).
    * ``score(sum_g, sum_g2, method, eps)``: flat fp32 scores.
    * ``score_histogram_many_(sum_gs, sum_g2s, method, eps, hist, shift, prefix)``: one
      histogram pass over the scores of all the tensors, computed on the fly.
    * ``score_compact(sum_g, sum_g2, method, eps, thr, take_eq, index_dtype)``:
      ``(sorted indices, ties taken)`` of one tensor's selected entries.
    * ``adamw_step_many_(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, scalars,
      grad_is_sparse=False)``: one AdamW step per tensor (``scalars``: per tensor, an
      :class:`~piece_optim.backends.reference.AdamWScalars`).

    Semantics: :mod:`piece_optim.backends.reference`.
    """

    name: str
    devices: tuple[str, ...]
    priority: int
    select_chunk: int | None
    advice: str
    checks_indices: bool

    def not_supported_reasons(self, op: str, device: torch.device, dtypes: tuple) -> list[str]: ...

    def accumulate_many_(
        self,
        grads: Sequence[Tensor],
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
        keys: Sequence[int] | None = None,
    ) -> None: ...

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor: ...

    def score_histogram_many_(
        self,
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
        method: str,
        eps: float,
        hist: Tensor,
        shift: int,
        prefix: int,
    ) -> None: ...

    def score_compact(
        self,
        sum_g: Tensor | None,
        sum_g2: Tensor,
        method: str,
        eps: float,
        thr: int,
        take_eq: int,
        index_dtype: torch.dtype,
    ) -> tuple[Tensor, int]: ...

    def adamw_step_many_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        idxs: Sequence[Tensor | None],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        masters: Sequence[Tensor | None],
        scalars: Sequence[Any],
        grad_is_sparse: bool = False,
    ) -> None: ...


# -- the registry -------------------------------------------------------------------------------
# name -> "module:attribute" of a zero-argument factory; loaded on first use, so a missing
# compiled part or a missing Triton never breaks ``import piece_optim``.
_FACTORIES: dict[str, str] = {}
_instances: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_decisions: dict[tuple, Backend] = {}
_said: set[tuple] = set()


def register(name: str, factory: str) -> None:
    """Register backend ``name``: ``factory`` is ``"module:attribute"``, a callable that
    makes the backend object (it may raise: the backend is then unavailable, and the
    error is kept for the message)."""
    _FACTORIES[name] = factory
    _instances.pop(name, None)
    _load_errors.pop(name, None)
    _decisions.clear()


register("torch", "piece_optim.backends.reference:ReferenceBackend")
register("cpu", "piece_optim.backends.native:cpu_backend")
register("cuda", "piece_optim.backends.native:cuda_backend")
register("triton", "piece_optim.backends.triton:TritonBackend")


def names() -> tuple[str, ...]:
    """The registered backend names."""
    return tuple(_FACTORIES)


def load(name: str) -> Backend | None:
    """The backend object of ``name``, or None if it does not load here (see :func:`explain`)."""
    be = _instances.get(name)
    if be is not None:
        return be
    if name in _load_errors:
        return None
    module, attr = _FACTORIES[name].split(":")
    try:
        be = getattr(importlib.import_module(module), attr)()
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"; kept for the error
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _instances[name] = be
    return be


def _advice(name: str) -> str:
    module, attr = _FACTORIES[name].split(":")
    try:
        return str(getattr(importlib.import_module(module), attr).advice)
    except Exception:  # noqa: BLE001 - the module itself did not import
        return f"check that {module} imports"


def requested_backend(name: str) -> str:
    """The backend name in force: ``PIECE_OPTIM_BACKEND`` wins over ``name``."""
    env = _env.get(_ENV).strip().lower()
    chosen = env or name
    if chosen != "auto" and chosen not in _FACTORIES:
        where = f"environment variable {_env.name(_ENV)}" if env else "backend="
        raise ValueError(
            f"unknown backend {chosen!r} (from {where}); choose one of 'auto', "
            + ", ".join(repr(b) for b in _FACTORIES)
        )
    return chosen


def validate_backend_name(name: str) -> str:
    """Check a ``backend=`` argument; returns the name in force (see :func:`requested_backend`)."""
    if not isinstance(name, str) or (name != "auto" and name not in _FACTORIES):
        raise ValueError(
            f"backend={name!r} is not a backend; choose one of 'auto', "
            + ", ".join(repr(b) for b in _FACTORIES)
        )
    return requested_backend(name)


def _candidates(device: torch.device) -> list[str]:
    """Names ``"auto"`` considers for ``device``, by priority (ties: registration order);
    the reference closes every list (it runs wherever torch does)."""
    ranked = []
    for name in _FACTORIES:
        be = load(name)
        if be is not None and device.type in be.devices and name != "torch":
            ranked.append((-be.priority, len(ranked), name))
    return [name for *_, name in sorted(ranked)] + ["torch"]


def _reasons(name: str, op: str, device: torch.device, dtypes: tuple) -> list[str]:
    be = load(name)
    if be is None:
        return [f"it does not load here ({_load_errors.get(name, '?')}); to fix: {_advice(name)}"]
    return be.not_supported_reasons(op, device, dtypes)


def resolve(name: str, op: str, device: torch.device | str, dtypes: tuple = ()) -> Backend:
    """The backend that runs ``op`` on an input on ``device`` with ``dtypes`` (see the
    module doc for the rule).  ``name``: ``"auto"`` or a backend name (the environment
    variable wins)."""
    key = (_env.get(_ENV), name, op, device, dtypes)
    be = _decisions.get(key)
    if be is not None:
        return be
    device = torch.device(device)
    chosen = requested_backend(name)
    if chosen != "auto":
        why = _reasons(chosen, op, device, dtypes)
        if why:
            raise BackendUnavailableError(
                f"backend {chosen!r} was requested for {op} on {device.type} tensors "
                f"{_dtypes_text(dtypes)} but cannot run it: {'; '.join(why)}. Use "
                f"backend='auto' (or unset {_env.name(_ENV)}) to let piece_optim pick one "
                "that can (the pure-torch reference takes every input)"
            )
        be = load(chosen)
    else:
        skipped = []
        for cand in _candidates(device):
            why = _reasons(cand, op, device, dtypes)
            if not why:
                be = load(cand)
                break
            if load(cand) is not None:
                skipped.append(f"{cand}: {'; '.join(why)}")
        if skipped and (op, device.type, dtypes) not in _said:
            _said.add((op, device.type, dtypes))
            log.info(
                "piece_optim: %s on %s tensors %s runs on backend %r; passed over %s",
                op,
                device.type,
                _dtypes_text(dtypes),
                be.name,
                " | ".join(skipped),
            )
    _decisions[key] = be
    return be


def _dtypes_text(dtypes: tuple) -> str:
    return "(" + ", ".join(str(d).replace("torch.", "") for d in dtypes) + ")"


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend for ``device`` with no input in view: the one ``"auto"`` (or ``name``)
    gives an fp32 input.  Raises like :func:`resolve` when ``name`` cannot run there."""
    f32 = torch.float32
    return resolve(name, "adamw", torch.device(device), (f32, f32))


def explain(
    op: str, device: torch.device | str = "cpu", dtypes: tuple = ()
) -> dict[str, list[str]]:
    """Every registered backend's reasons against ``op`` on this input (empty: it can)."""
    device = torch.device(device)
    return {name: _reasons(name, op, device, dtypes) for name in _FACTORIES}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that load and can run on ``device`` (fp32 inputs)."""
    device = torch.device(device)
    f32 = (torch.float32, torch.float32)
    return [n for n in _FACTORIES if not _reasons(n, "adamw", device, f32)]


T = TypeVar("T")


def group_by_backend(
    items: Iterable[T], backend_of: Callable[[T], Backend]
) -> list[tuple[Backend, list[T]]]:
    """``items`` grouped by their backend, in order of first appearance: one batched call
    per backend (the one group-by of the functional layer)."""
    groups: dict[int, tuple[Backend, list[T]]] = {}
    for it in items:
        be = backend_of(it)
        entry = groups.get(id(be))
        if entry is None:
            groups[id(be)] = (be, [it])
        else:
            entry[1].append(it)
    return list(groups.values())
