"""ImportanceEstimator: PIECE-F / PIECE-S importance and the global top-k mask."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._backends import Backend, get_backend, validate_backend_name
from ._reference import index_dtype_for
from ._select import ScoreSource, global_topk
from .distributed import estimator_group, local_tensor, topk_hooks
from .mask import SparseMask

METHODS = {"piece-f": "piece-f", "fisher": "piece-f", "piece-s": "piece-s",
           "second-order": "piece-s"}  # fmt: skip
_ACCUM_DTYPES = (torch.float32, torch.bfloat16)


class ImportanceEstimator:
    r"""Estimate per-parameter importance on a task's data and select the top entries.

    Each :meth:`collect` (or, with ``in_backward=True``, each ``backward()``) is one term
    :math:`g_b` of the sums :math:`\sum_b g_b` and :math:`\sum_b g_b^2`, accumulated in
    ``accum_dtype`` with fp32 math.  Scores:

    * ``"piece-f"`` (alias ``"fisher"``): :math:`F_i = \sum_b g_{b,i}^2`
    * ``"piece-s"`` (alias ``"second-order"``):
      :math:`S_i = |\sum_b g_{b,i}| / \sqrt{\sum_b g_{b,i}^2 + \epsilon}`

    Args:
        model: the module whose parameters are scored.
        method: see above.
        eps: the :math:`\epsilon` of PIECE-S (>= 0; 1.0 as in the paper).
        exclude: substrings of parameter names never selected (default: embeddings, as in
            the paper).  Excluded parameters still count in the total that ``ratio`` is
            taken of.
        in_backward: fold each gradient into the sums from a post-accumulate-grad hook as
            soon as backward produces it, and drop the dense gradient, so no full set of
            gradients ever exists; every ``backward()`` is then one term.
        accum_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (half the memory).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Parameters with ``requires_grad=False`` and zero-size parameters are skipped (and do
    not count in the total).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "piece-s",
        eps: float = 1.0,
        exclude: Iterable[str] = ("embed",),
        in_backward: bool = False,
        accum_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(
                f"method={method!r} is unknown; choose 'piece-f' (alias 'fisher') or 'piece-s' "
                "(alias 'second-order')"
            )
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps={eps!r} must be a finite number >= 0 (the paper uses 1.0)")
        if isinstance(exclude, str):
            exclude = (exclude,)
        if accum_dtype not in _ACCUM_DTYPES:
            raise ValueError(
                f"accum_dtype={accum_dtype} is not supported; use torch.float32 or torch.bfloat16"
            )
        self.method = METHODS[method]
        self.eps = float(eps)
        self.exclude = tuple(exclude)
        self.in_backward = bool(in_backward)
        self.accum_dtype = accum_dtype
        self.backend = validate_backend_name(backend)
        self._backend_arg = backend
        self.model = model

        self._shapes: dict[str, tuple[int, ...]] = {}
        self._params: dict[str, nn.Parameter] = {}  # eligible: trainable, non-empty, kept
        self._others: list[nn.Parameter] = []  # trainable but excluded
        self._numel_total = 0
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            self._numel_total += p.numel()
            if p.numel() == 0:
                self._others.append(p)  # nothing to score; its grad is still dropped
                continue
            if any(s in name for s in self.exclude):
                self._others.append(p)
                continue
            self._params[name] = p
            self._shapes[name] = tuple(local_tensor(p).shape)  # FSDP2: the local shard's
        if not self._params:
            raise ValueError(
                "no parameter is eligible for selection: all are frozen, empty or excluded "
                f"(exclude={self.exclude!r})"
            )
        self._group = estimator_group(model, list(self._params.values()), self.in_backward)
        self._sum_g: dict[str, Tensor | None] = {}
        self._sum_g2: dict[str, Tensor] = {}
        self._terms = 0
        self._term_seen: set[str] = set()  # in_backward: params folded in the current term
        self._hooks: list = []
        self._closed = False
        if self.in_backward:
            self._install_hooks()

    # -- accumulation -------------------------------------------------------------------
    def _backend_for(self, t: Tensor) -> Backend:
        return get_backend(self._backend_arg, t.device)

    def _accumulators(self, name: str, p: Tensor) -> tuple[Tensor | None, Tensor]:
        if name not in self._sum_g2:
            n = local_tensor(p).numel()
            self._sum_g2[name] = torch.zeros(n, dtype=self.accum_dtype, device=p.device)
            self._sum_g[name] = (
                torch.zeros(n, dtype=self.accum_dtype, device=p.device)
                if self.method == "piece-s"
                else None
            )
        return self._sum_g[name], self._sum_g2[name]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ImportanceEstimator is closed; make a new one")

    def collect(self) -> None:
        """Fold every eligible parameter's ``.grad`` into the sums, then clear all grads.

        One call is one term :math:`g_b`.  With ``in_backward=True`` the hooks have already
        folded the gradients; ``collect()`` then only checks that a backward happened.
        """
        self._check_open()
        if self.in_backward:
            if self._terms == 0:
                raise RuntimeError(
                    "collect(): no backward() ran since the estimator was made; run "
                    "loss.backward() first (with in_backward=True each backward is one term)"
                )
            return
        by_backend: dict[int, tuple[Backend, list, list, list]] = {}
        for name, p in self._params.items():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"collect(): parameter {name!r} has a sparse .grad; not supported")
            s1, s2 = self._accumulators(name, p)
            backend = self._backend_for(p)
            entry = by_backend.setdefault(id(backend), (backend, [], [], []))
            entry[1].append(local_tensor(p.grad))
            entry[2].append(s1)
            entry[3].append(s2)
        if not by_backend:
            raise RuntimeError(
                "collect(): no eligible parameter has a .grad; call loss.backward() before "
                "collect()"
            )
        with torch.no_grad():
            for backend, g, s1, s2 in by_backend.values():
                backend.accumulate_many_(g, s1, s2)
        for p in self._params.values():
            p.grad = None
        for p in self._others:
            p.grad = None
        self._terms += 1

    def _install_hooks(self) -> None:
        def fold(name: str):
            def hook(p: Tensor) -> None:
                if p.grad is None:
                    return
                self._note_term(name)
                s1, s2 = self._accumulators(name, p)
                with torch.no_grad():
                    self._backend_for(p).accumulate_(p.grad, s1, s2)
                p.grad = None

            return hook

        def drop(p: Tensor) -> None:
            p.grad = None

        for name, p in self._params.items():
            self._hooks.append(p.register_post_accumulate_grad_hook(fold(name)))
        for p in self._others:
            self._hooks.append(p.register_post_accumulate_grad_hook(drop))

    def _note_term(self, name: str) -> None:
        # A post-accumulate-grad hook fires once per parameter per backward, so meeting a
        # parameter already folded in this term means a new backward (a new term) began.
        if not self._term_seen or name in self._term_seen:
            self._term_seen.clear()
            self._terms += 1
        self._term_seen.add(name)

    @property
    def num_terms(self) -> int:
        """How many gradient terms were folded (collect() calls, or backwards if in_backward)."""
        return self._terms

    # -- results ------------------------------------------------------------------------
    def _sources(self) -> list[tuple[str, ScoreSource]]:
        self._check_open()
        if not self._sum_g2:
            raise RuntimeError(
                "no gradients were collected yet: run backward() and collect() on the "
                "calibration batches first"
            )
        out = []
        for name, p in self._params.items():
            if name not in self._sum_g2:
                # a parameter that never received a gradient has importance 0
                self._accumulators(name, p)
            out.append(
                (
                    name,
                    ScoreSource(
                        self._sum_g.get(name),
                        self._sum_g2[name],
                        local_tensor(p).numel(),
                        index_dtype_for(local_tensor(p).numel()),
                        self._backend_for(p),
                    ),
                )
            )
        return out

    def scores(self) -> dict[str, Tensor]:
        """``{name: fp32 score tensor shaped like the param}``; excluded names are absent."""
        out = {}
        for name, src in self._sources():
            s = src.backend.score(src.sum_g, src.sum_g2, self.method, self.eps)
            out[name] = s.view(self._shapes[name])
        return out

    def select(self, ratio: float | None = None, *, k: int | None = None) -> SparseMask:
        """The global top-k mask: ``k = int(ratio * total trainable numel)``, or ``k`` given.

        Ties at the threshold go to the lower global position (parameter order, then flat
        index).  Exactly k entries are selected.
        """
        if (ratio is None) == (k is None):
            raise ValueError("select(): pass exactly one of ratio= (e.g. 1e-3) or k=")
        if k is None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise TypeError(f"select(): ratio must be a float in (0, 1], got {ratio!r}")
            if not (ratio == ratio) or not 0 < ratio <= 1:
                raise ValueError(f"select(): ratio={ratio!r} must be in (0, 1] (e.g. 1e-3)")
            k = int(ratio * self._numel_total)
            if k < 1:
                raise ValueError(
                    f"select(): ratio={ratio!r} of {self._numel_total} trainable entries selects "
                    "nothing; raise the ratio or pass k="
                )
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"select(): k={k!r} must be a positive int")
        sources = self._sources()
        eligible = sum(p.numel() for p in self._params.values())  # global under FSDP2
        if k > eligible:
            raise ValueError(
                f"select(): k={k} exceeds the {eligible} eligible entries (excluded tensors, "
                f"{self._numel_total - eligible} entries, are never selected); lower the ratio "
                "or the exclusions"
            )
        with torch.no_grad():
            idxs = global_topk(
                [s for _, s in sources], k, self.method, self.eps, **topk_hooks(self._group)
            )
        indices = {name: idx for (name, _), idx in zip(sources, idxs, strict=True) if idx.numel()}
        return SparseMask(indices, {n: self._shapes[n] for n in indices}, self._numel_total)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Remove hooks and free the accumulators."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._sum_g.clear()
        self._sum_g2.clear()
        self._closed = True

    def __enter__(self) -> ImportanceEstimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_bytes(self) -> int:
        """Bytes held by the accumulators."""
        n = sum(t.numel() * t.element_size() for t in self._sum_g2.values())
        n += sum(t.numel() * t.element_size() for t in self._sum_g.values() if t is not None)
        return n
