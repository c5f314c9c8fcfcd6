"""The compiled backends, ``"cpu"`` (csrc/cpu) and ``"cuda"`` (csrc/cuda): one class.

Both call the same ``torch.ops.piece_optim`` ops (csrc/ops.cpp declares them; the CPU and
CUDA bindings implement them); torch's dispatcher picks the kernel by device.  An input
the kernels do not take (float64 parameters or gradients, fp16 or mixed-dtype
accumulators) is refused with its reason (:meth:`NativeBackend.not_supported_reasons`);
the registry then routes it elsewhere under ``"auto"`` or raises for an explicit request.

Selection without a third pass (CPU): the 2nd-level histogram pass (``shift=0``) also
collects the indices of the scores whose top 16 bits are >= the threshold's bin, i.e. a
superset of what the compaction will select; ``score_compact`` then filters those few
candidates instead of reading the scores again.  The candidates are cached per
accumulator tensor (weakref + version counter + method + eps + bin), so a changed tensor
is never served from the cache, and are dropped after use; when a bin is too crowded
(more than ``numel // 8 + 4096`` candidates) the kernel keeps none and compaction reads
the scores.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .._bounds import StepStatus
from . import _native_ops
from .reference import AdamWScalars

_ACC = (torch.float32, torch.bfloat16)
_IO = (torch.float32, torch.bfloat16, torch.float16)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    # "no tensor" in the ops' mutable lists is a 0-element tensor (see csrc/ops.cpp); a
    # fresh one each time: entries of a mutable list must not alias one another
    return t if t is not None else like.new_empty(0)


def _flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.view(-1)


def _dtype_reasons(what: str, dtype: torch.dtype | None, allowed: tuple) -> list[str]:
    if dtype is None or dtype in allowed:
        return []
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return [f"{what} is {str(dtype).replace('torch.', '')}; the kernels take {names}"]


class NativeBackend:
    """The C++ (csrc/cpu) or CUDA (csrc/cuda) kernels behind ``torch.ops.piece_optim``."""

    priority = 20
    select_chunk = None
    advice = (
        "build the extension: pip install --no-build-isolation -e . (a C++ compiler and "
        "ninja; for the CUDA kernels CUDA_HOME and a CUDA build of torch)"
    )

    def __init__(self, device_type: str) -> None:
        self.name = device_type
        self.devices = (device_type,)
        self._key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
        self.origin = _native_ops.load()
        if not _native_ops.has_kernel("score", self._key):
            raise ImportError(
                f"piece_optim._C was built without {self._key} kernels ({self.origin})"
            )
        self._ops = torch.ops.piece_optim
        # CPU: the op checks every index before writing; CUDA: the caller checks, the
        # kernels skip and flag an index changed behind that check (piece_optim._bounds)
        self.checks_indices = device_type == "cpu"
        self._candidates = device_type == "cpu"  # the CUDA kernels keep none
        self._cand: dict[int, tuple] = {}
        self._status = StepStatus()
        self._empty: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return f"NativeBackend({self.name!r}, {self.origin})"

    def _no_master(self, like: Tensor) -> Tensor:
        """The 0-element tensor that says "no master" in the op's list (see csrc/binding.h);
        one per device, made once: the op is called eagerly only (under torch.compile the
        step runs as torch ops), where entries of the list may alias."""
        t = self._empty.get(like.device)
        if t is None:
            t = self._empty[like.device] = like.new_empty(0)
        return t

    def not_supported_reasons(self, op: str, device: torch.device, dtypes: tuple) -> list[str]:
        if device.type != self.name:
            return [f"it runs on {self.name} tensors only"]
        if self.name == "cuda" and not torch.cuda.is_available():
            return ["no CUDA device is available"]
        if op == "accumulate":
            g, s2, s1 = (*dtypes, None, None, None)[:3]  # grad, sum_g2, sum_g (None: none)
            why = _dtype_reasons("the gradient", g, _IO) + _dtype_reasons("the sums", s2, _ACC)
            if s1 is not None and s1 != s2:
                why.append("sum_g and sum_g2 differ in dtype; the kernels take one")
            return why
        if op == "select":
            return _dtype_reasons("the sums", dtypes[0] if dtypes else None, _ACC)
        if op == "adamw":
            p, g = (*dtypes, None, None)[:2]
            return _dtype_reasons("the parameter", p, _IO) + _dtype_reasons("the gradient", g, _IO)
        return [f"no op {op!r}"]

    # -- importance ---------------------------------------------------------------------------
    def accumulate_many_(
        self,
        grads: Sequence[Tensor],
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
        keys: Sequence[int] | None = None,
    ) -> None:
        """All tensors in one kernel call: one parallel region over their concatenation."""
        self._ops.accumulate_many_(
            list(grads),
            [_or_empty(s1, s2) for s1, s2 in zip(sum_gs, sum_g2s, strict=True)],
            list(sum_g2s),
            list(keys) if keys is not None else [],
        )
        torch.autograd.graph.increment_version([t for t in (*sum_gs, *sum_g2s) if t is not None])

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
        return self._ops.score(sum_g if method == "piece-s" else None, sum_g2, method, eps)

    # -- selection ----------------------------------------------------------------------------
    @staticmethod
    def _key_of(
        sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float, prefix: int
    ) -> tuple:
        ver = tuple(None if t is None else (t.data_ptr(), t._version) for t in (sum_g, sum_g2))
        return ver, method, float(eps), int(prefix)

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
        """All tensors in one kernel call (one parallel region); keeps candidates at level 2."""
        if shift != 0:  # a new selection begins: stale candidates go
            self._cand.clear()
        s1s, s2s = [], []
        for s1, s2 in zip(sum_gs, sum_g2s, strict=True):
            if s2.numel():  # nothing to count (the op would read an empty sum_g as "none")
                s1s.append(s1 if method == "piece-s" else None)
                s2s.append(s2)
        if not s2s:
            return
        caps = [s2.numel() // 8 + 4096 for s2 in s2s] if shift == 0 and self._candidates else []
        cands = self._ops.score_histogram_many_(
            [_or_empty(s1, s2) for s1, s2 in zip(s1s, s2s, strict=True)],
            s2s,
            method,
            eps,
            hist,
            shift,
            prefix,
            caps,
        )
        torch.autograd.graph.increment_version(hist)
        for s1, s2, cand in zip(s1s, s2s, cands, strict=False):
            if cand.dim() == 1:
                refs = tuple(None if t is None else weakref.ref(t) for t in (s1, s2))
                self._cand[id(s2)] = (refs, self._key_of(s1, s2, method, eps, prefix), cand)

    def _cached(
        self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float, thr: int
    ) -> Tensor | None:
        entry = self._cand.pop(id(sum_g2), None)
        if entry is None:
            return None
        refs, key, cand = entry
        alive = tuple(None if r is None else r() for r in refs)
        if alive[1] is not sum_g2 or alive[0] is not sum_g:
            return None
        if key != self._key_of(sum_g, sum_g2, method, eps, thr >> 16):
            return None
        return cand

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
        sum_g = sum_g if method == "piece-s" else None
        cand = self._cached(sum_g, sum_g2, method, eps, thr)
        idx, n_eq = self._ops.compact(sum_g, sum_g2, method, eps, thr, take_eq, index_dtype, cand)
        return idx, int(n_eq)

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
        """All tensors in one kernel call (per device on CUDA).  One call holds one param
        group: the scalars differ only in the step-dependent ``step_size``/``bc2_sqrt``."""
        sc = scalars[0]
        m = [t if t.dim() == 1 else t.view(-1) for t in exp_avgs]
        v = [t if t.dim() == 1 else t.view(-1) for t in exp_avg_sqs]
        w = [
            self._no_master(mm) if t is None else _flat(t) for t, mm in zip(masters, m, strict=True)
        ]
        shared = (sc.decay, sc.lerp_weight, sc.beta2, sc.sq_weight, sc.eps, grad_is_sparse)
        if self.name == "cpu":
            self._ops.adamw_step_many_(
                params,
                grads,
                idxs,
                m,
                v,
                w,
                [s.step_size for s in scalars],
                [s.bc2_sqrt for s in scalars],
                *shared,
            )
        else:
            by_device: dict[torch.device, list[int]] = {}
            for j, p in enumerate(params):
                by_device.setdefault(p.device, []).append(j)
            for device, ids in by_device.items():
                status = self._status.flag(device)
                self._ops.adamw_step_many_(
                    [params[j] for j in ids],
                    [grads[j] for j in ids],
                    [idxs[j] for j in ids],
                    [m[j] for j in ids],
                    [v[j] for j in ids],
                    [w[j] for j in ids],
                    [scalars[j].step_size for j in ids],
                    [scalars[j].bc2_sqrt for j in ids],
                    *shared,
                    status,
                )
                self._status.launched(device)
        torch.autograd.graph.increment_version([*params, *m, *v, *(t for t in w if t.numel())])


def cpu_backend() -> NativeBackend:
    """The ``"cpu"`` backend (registered in :mod:`piece_optim.backends`)."""
    return NativeBackend("cpu")


def cuda_backend() -> NativeBackend:
    """The ``"cuda"`` backend: the same class on the CUDA kernels, built only when CUDA_HOME
    and a CUDA torch were there."""
    return NativeBackend("cuda")


cpu_backend.advice = cuda_backend.advice = NativeBackend.advice  # type: ignore[attr-defined]
