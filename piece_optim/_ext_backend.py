"""Backends on the compiled extension: ``CpuBackend`` (csrc/cpu) and ``CudaBackend`` (csrc/cuda).

Both call the same ``torch.ops.piece_optim`` ops; torch's dispatcher picks the CPU or CUDA
kernel by device.  Inputs the kernels do not take (float64 gradients, fp16 accumulators,
sums of two different dtypes, non-contiguous state) go to the pure-torch reference, so a
backend never refuses work it was given; results are the reference's either way.

Selection without a third pass: the 2nd-level histogram pass (``shift=0``) also collects
the indices of the scores whose top 16 bits are >= the threshold's bin, i.e. a superset of
what the compaction will select; ``score_compact`` then filters those few candidates
instead of reading the scores again.  The candidates are cached per accumulator tensor
(weakref + version counter + method + eps + bin), so a changed tensor is never served from
the cache, and are dropped after use; when a bin is too crowded (more than
``numel // 8 + 4096`` candidates) the kernel keeps none and compaction reads the scores.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext
from ._backends import Backend
from ._bounds import StepStatus, check_step_indices

_ACC = (torch.float32, torch.bfloat16)
_IO = (torch.float32, torch.bfloat16, torch.float16)


def _bump(*ts: Tensor | None) -> None:
    # custom ops do not bump version counters; the candidate cache relies on them
    for t in ts:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    # "no tensor" in the ops' mutable lists is a 0-element tensor (see csrc/ops.cpp); a
    # fresh one each time: entries of a mutable list must not alias one another
    return t if t is not None else like.new_empty(0)


def _flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.view(-1)


def _flat_ok(t: Tensor | None, n: int, dtypes: tuple) -> bool:
    return t is None or (t.dtype in dtypes and t.is_contiguous() and t.numel() == n)


class _ExtBackend(Backend):
    """Shared code of the CPU and CUDA backends."""

    name = "ext"
    _dispatch_key = "CPU"
    _device_type = "cpu"

    def __init__(self) -> None:
        self.origin = _ext.load()
        if not _ext.has_kernel("score", self._dispatch_key):
            raise ImportError(
                f"piece_optim._C was built without {self._dispatch_key} kernels ({self.origin})"
            )
        self._ops = torch.ops.piece_optim
        self._cand: dict[int, tuple] = {}
        self._candidates = self._dispatch_key == "CPU"  # the CUDA kernels keep none
        self._status = StepStatus()

    def supports(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != self._device_type:
            return False, f"the {self.name} backend runs on {self._device_type} tensors only"
        return True, ""

    # -- importance ---------------------------------------------------------------
    def _acc_ok(self, g: Tensor, s1: Tensor | None, s2: Tensor) -> bool:
        n = s2.numel()
        return (
            g.dtype in _IO
            and g.numel() == n
            and _flat_ok(s2, n, _ACC)
            and (s1 is None or (_flat_ok(s1, n, _ACC) and s1.dtype == s2.dtype))
        )

    def accumulate_(self, grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor) -> None:
        self.accumulate_many_([grad], [sum_g], [sum_g2])

    def accumulate_many_(
        self, grads: Sequence[Tensor], sum_gs: Sequence[Tensor | None], sum_g2s: Sequence[Tensor]
    ) -> None:
        """All tensors in one kernel call: one parallel region over their concatenation."""
        ok_g, ok_1, ok_2 = [], [], []
        for g, s1, s2 in zip(grads, sum_gs, sum_g2s, strict=True):
            if self._acc_ok(g, s1, s2):
                ok_g.append(g)
                ok_1.append(s1)
                ok_2.append(s2)
            else:
                super().accumulate_(g, s1, s2)
        if ok_g:
            self._ops.accumulate_many_(
                ok_g, [_or_empty(t, s) for t, s in zip(ok_1, ok_2, strict=True)], ok_2
            )
            _bump(*ok_1, *ok_2)

    def _score_ok(self, sum_g: Tensor | None, sum_g2: Tensor, method: str) -> bool:
        n = sum_g2.numel()
        if not _flat_ok(sum_g2, n, _ACC):
            return False
        if method == "piece-s":
            return sum_g is not None and _flat_ok(sum_g, n, _ACC) and sum_g.dtype == sum_g2.dtype
        return method == "piece-f"

    def score(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float) -> Tensor:
        if not self._score_ok(sum_g, sum_g2, method):
            return super().score(sum_g, sum_g2, method, eps)
        return self._ops.score(sum_g if method == "piece-s" else None, sum_g2, method, eps)

    # -- selection ----------------------------------------------------------------
    def histogram_(self, scores: Tensor, hist: Tensor, shift: int, prefix: int) -> None:
        if scores.dtype != torch.float32 or hist.dtype != torch.int64 or not hist.is_contiguous():
            return super().histogram_(scores, hist, shift, prefix)
        self._ops.histogram_(scores, hist, shift, prefix)
        _bump(hist)

    @staticmethod
    def _key(sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float, prefix: int) -> tuple:
        ver = tuple(None if t is None else (t.data_ptr(), t._version) for t in (sum_g, sum_g2))
        return ver, method, float(eps), int(prefix)

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
        self.score_histogram_many_([sum_g], [sum_g2], method, eps, hist, shift, prefix)

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
        ok_1, ok_2 = [], []
        # CUDA kernels take R replicas of 65536 bins (see _reference.histogram_), CPU one
        hist_ok = (hist.dtype == torch.int64 and hist.is_contiguous()
                   and (hist.numel() == 65536
                        or (hist.is_cuda and hist.numel() % 65536 == 0)))  # fmt: skip
        for s1, s2 in zip(sum_gs, sum_g2s, strict=True):
            if s2.numel() == 0:
                continue  # nothing to count (the op would read an empty sum_g as "none")
            if hist_ok and self._score_ok(s1, s2, method):
                ok_1.append(s1 if method == "piece-s" else None)
                ok_2.append(s2)
            else:
                super().score_histogram_(s1, s2, method, eps, hist, shift, prefix)
        if not ok_2:
            return
        caps = [s2.numel() // 8 + 4096 for s2 in ok_2] if shift == 0 and self._candidates else []
        cands = self._ops.score_histogram_many_(
            [_or_empty(s1, s2) for s1, s2 in zip(ok_1, ok_2, strict=True)], ok_2, method, eps,
            hist, shift, prefix, caps,
        )  # fmt: skip
        _bump(hist)
        for s1, s2, cand in zip(ok_1, ok_2, cands, strict=False):
            if cand.dim() == 1:
                refs = tuple(None if t is None else weakref.ref(t) for t in (s1, s2))
                self._cand[id(s2)] = (refs, self._key(s1, s2, method, eps, prefix), cand)

    def _cached(self, sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float,
                thr: int) -> Tensor | None:  # fmt: skip
        entry = self._cand.pop(id(sum_g2), None)
        if entry is None:
            return None
        refs, key, cand = entry
        alive = tuple(None if r is None else r() for r in refs)
        if alive[1] is not sum_g2 or alive[0] is not sum_g:
            return None
        if key != self._key(sum_g, sum_g2, method, eps, thr >> 16):
            return None
        return cand

    def compact(
        self, scores: Tensor, thr: int, take_eq: int, index_dtype: torch.dtype
    ) -> tuple[Tensor, int]:
        if scores.dtype != torch.float32:
            return super().compact(scores, thr, take_eq, index_dtype)
        idx, n_eq = self._ops.compact(None, scores.reshape(-1), "piece-f", 0.0, thr, take_eq,
                                      index_dtype)  # fmt: skip
        return idx, int(n_eq)

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
        if not self._score_ok(sum_g, sum_g2, method):
            return super().score_compact(sum_g, sum_g2, method, eps, thr, take_eq, index_dtype)
        sum_g = sum_g if method == "piece-s" else None
        cand = self._cached(sum_g, sum_g2, method, eps, thr)
        idx, n_eq = self._ops.compact(sum_g, sum_g2, method, eps, thr, take_eq, index_dtype, cand)
        return idx, int(n_eq)

    # -- optimizer ----------------------------------------------------------------
    def adamw_step_(self, param: Tensor, grad: Tensor, idx: Tensor | None, exp_avg: Tensor,
                    exp_avg_sq: Tensor, master: Tensor | None, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, step: int,
                    grad_is_sparse: bool = False) -> None:  # fmt: skip
        self.adamw_step_many_(
            [param], [grad], [idx], [exp_avg], [exp_avg_sq], [master], [step], lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            grad_is_sparse=grad_is_sparse,
        )  # fmt: skip

    @staticmethod
    def _adam_ok(p: Tensor, g: Tensor, idx: Tensor | None, m: Tensor, v: Tensor,
                 w: Tensor | None, sparse: bool) -> bool:  # fmt: skip
        k = p.numel() if idx is None else idx.numel()
        return (
            p.dtype in _IO
            and p.is_contiguous()
            and g.dtype in _IO
            and g.numel() == (k if sparse and idx is not None else p.numel())
            and (idx is None or (idx.dtype in (torch.int32, torch.int64) and idx.dim() == 1))
            and _flat_ok(m, k, (torch.float32,))
            and _flat_ok(v, k, (torch.float32,))
            and _flat_ok(w, k, (torch.float32,))
        )

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
        """All tensors in one kernel call; bias corrections computed here as the reference does.

        Tensors the kernels do not take go to the reference.  Every index is checked before
        anything is written: the C++ CPU op checks its own (and raises before writing);
        the others (reference fallbacks, CUDA tensors) are checked here first, see
        :mod:`piece_optim._bounds`.
        """
        lists: tuple[list, ...] = ([], [], [], [], [], [], [], [])
        fallback = []
        for p, g, i, m, v, w, s in zip(
            params, grads, idxs, exp_avgs, exp_avg_sqs, masters, steps, strict=True
        ):
            if not self._adam_ok(p, g, i, m, v, w, grad_is_sparse):
                fallback.append((p, g, i, m, v, w, s))
                continue
            # the same double expressions as _reference.adamw_step_
            bias_correction1 = 1 - beta1**s
            bias_correction2 = 1 - beta2**s
            vals = (p, g, i, _flat(m), _flat(v), _flat(_or_empty(w, m)),
                    lr / bias_correction1, math.sqrt(bias_correction2))  # fmt: skip
            for lst, val in zip(lists, vals, strict=True):
                lst.append(val)
        check_step_indices([f[0] for f in fallback], [f[2] for f in fallback])
        if lists[0]:
            if self._dispatch_key == "CPU":
                self._ops.adamw_step_many_(*lists, lr, beta1, beta2, eps, weight_decay,
                                           grad_is_sparse)  # fmt: skip
            else:
                self._cuda_adamw(lists, lr, beta1, beta2, eps, weight_decay, grad_is_sparse)
            _bump(*lists[0], *lists[3], *lists[4], *lists[5])
        for p, g, i, m, v, w, s in fallback:
            super().adamw_step_(
                p,
                g,
                i,
                m,
                v,
                w,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                step=s,
                grad_is_sparse=grad_is_sparse,
            )

    def _cuda_adamw(self, lists: tuple[list, ...], *scalars: object) -> None:
        """CUDA: indices checked here first, then one op call per device, whose kernels skip
        (and flag) an index changed behind that check."""
        check_step_indices(lists[0], lists[2])
        by_device: dict[torch.device, list[int]] = {}
        for j, p in enumerate(lists[0]):
            by_device.setdefault(p.device, []).append(j)
        for device, ids in by_device.items():
            status = self._status.flag(device)
            self._ops.adamw_step_many_(*([lst[j] for j in ids] for lst in lists), *scalars, status)
            self._status.launched(device)


class CpuBackend(_ExtBackend):
    """The C++ CPU kernels (csrc/cpu): OpenMP through at::parallel_for, AVX2/FMA when present."""

    name = "cpu"
    _dispatch_key = "CPU"
    _device_type = "cpu"


class CudaBackend(_ExtBackend):
    """The CUDA kernels (csrc/cuda), built only when CUDA_HOME and a CUDA torch were there."""

    name = "cuda"
    _dispatch_key = "CUDA"
    _device_type = "cuda"

    def supports(self, device: torch.device) -> tuple[bool, str]:
        ok, why = super().supports(device)
        if ok and not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return ok, why
