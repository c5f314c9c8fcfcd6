"""ImportanceEstimator: PIECE-F / PIECE-S importance and the global top-k mask."""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from . import _hook_owners
from . import functional as F
from ._dtensor import estimator_group, gather_global_indices, local_tensor, topk_hooks
from ._indices import index_dtype_for
from ._select import ScoreSource, _chunked_topk, global_topk
from ._sparse_grad import SparseGrad
from .backends import resolve, validate_backend_name
from .backends.reference import stochastic_key
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
        accum_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (half the memory;
            the sums are rounded stochastically, unbiased: see
            :func:`piece_optim.backends.reference.accumulate_`).
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
        if (
            isinstance(eps, bool)
            or not isinstance(eps, numbers.Real)
            or not math.isfinite(eps)
            or eps < 0
        ):
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
        self._trainable: dict[str, int] = {}  # name -> id(param): what select() was made for
        for name, p in model.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            self._trainable[name] = id(p)
            if p.device.type == "meta":
                raise ValueError(
                    f"parameter {name!r} is on the meta device: it has no values (e.g. made "
                    "under torch.device('meta') or init_empty_weights()). Materialise the "
                    "model first (model.to_empty(device=...) and load or initialise the "
                    "weights), then make the ImportanceEstimator"
                )
            self._numel_total += p.numel()
            if p.numel() == 0:
                self._others.append(p)  # nothing to score; its grad is still dropped
                continue
            if any(s in name for s in self.exclude):
                self._others.append(p)
                continue
            self._params[name] = p
            self._shapes[name] = tuple(p.shape)  # FSDP2: the full parameter's (masks are global)
        if not self._params:
            raise ValueError(
                "no parameter is eligible for selection: all are frozen, empty or excluded "
                f"(exclude={self.exclude!r})"
            )
        self._number = {name: i for i, name in enumerate(self._params)}  # keys of the rounding
        self._group = estimator_group(model, list(self._params.values()), self.in_backward)
        self._sum_g: dict[str, Tensor | None] = {}
        self._sum_g2: dict[str, Tensor] = {}
        self._terms = 0
        self._term_seen: set[str] = set()  # in_backward: params folded in the current term
        self._hooks: list = []
        self._closed = False
        named = [*self._params.items(), *((None, p) for p in self._others)]
        _hook_owners.check_free(named, "ImportanceEstimator", self)
        self._desc = (
            f"ImportanceEstimator(in_backward={self.in_backward}) on {type(model).__name__} "
            f"made at {_hook_owners.creation_site()}"
        )
        _hook_owners.note_reader(self, self._params.values(), self._desc)
        if self.in_backward:
            self._install_hooks()

    # -- accumulation -------------------------------------------------------------------
    def _fold(self, names: Sequence[str], grads: Sequence[Tensor]) -> None:
        """Fold one term: each named param's gradient into its sums (one batched call per
        backend).  bf16 sums are rounded stochastically, keyed by (seed, term, tensor), so
        the same gradients give the same sums, hence the same mask, on every backend."""
        sums = [self._accumulators(n, self._params[n]) for n in names]
        keys = None
        if self.accum_dtype == torch.bfloat16:
            keys = [stochastic_key(_SR_SEED, self._terms, self._number[n]) for n in names]
        F.accumulate_(
            grads, [s[0] for s in sums], [s[1] for s in sums], keys=keys, backend=self._backend_arg
        )

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

    def _check_open(self, where: str) -> None:
        if self._closed:
            raise RuntimeError("this ImportanceEstimator is closed; make a new one")
        self._check_model_unchanged(where)

    def _check_model_unchanged(self, where: str) -> None:
        """Raise if the model's parameters changed since the estimator was made.

        The sums cover the parameters seen at construction; a layer replaced, a parameter
        added or unfrozen afterwards would be ignored by the mask (or given the old
        tensor's scores) without a word.  Freezing one is harmless (it scores 0).
        """
        now: dict[str, int] = {}
        trainable: dict[str, int] = {}
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            now[name] = id(p)
            if p.requires_grad:
                trainable[name] = id(p)
        known = set(self._trainable.values())
        replaced = [n for n, i in self._trainable.items() if n in now and now[n] != i]
        removed = [n for n in self._trainable if n not in now]
        added = [n for n, i in trainable.items() if n not in self._trainable and i not in known]
        if not (replaced or removed or added):
            return
        parts = []
        for label, names in (
            ("replaced by a new tensor", replaced),
            ("removed", removed),
            ("added or unfrozen", added),
        ):
            if names:
                shown = ", ".join(repr(n) for n in names[:3])
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                parts.append(f"{label}: {shown}{more}")
        raise RuntimeError(
            f"{where}: the model's parameters changed since this ImportanceEstimator was made "
            f"({'; '.join(parts)}). Its sums cover the parameters it was made with; make a "
            "new ImportanceEstimator after changing the model (replacing layers, wrapping, "
            "unfreezing)"
        )

    def collect(self) -> None:
        """Fold every eligible parameter's ``.grad`` into the sums, then clear all grads.

        One call is one term :math:`g_b`.  With ``in_backward=True`` the hooks have already
        folded the gradients; ``collect()`` then only checks that a backward happened.
        """
        self._check_open("collect()")
        if self.in_backward:
            if self._terms == 0:
                raise RuntimeError(
                    "collect(): no backward() ran since the estimator was made; run "
                    "loss.backward() first (with in_backward=True each backward is one term)"
                )
            return
        names: list[str] = []
        grads: list[Tensor] = []
        for name, p in self._params.items():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"collect(): parameter {name!r} has a sparse .grad; not supported")
            if isinstance(p.grad, SparseGrad):
                other = _hook_owners.consumer_of([p], exclude=self) or "a SparseAdamW"
                raise RuntimeError(
                    f"collect(): parameter {name!r} holds only the selected entries of its "
                    f"gradient (a SparseGrad): the sparse_grads hooks of {other} replaced it. "
                    "Call close() on that optimizer and model.zero_grad() before estimating "
                    "with this model"
                )
            names.append(name)
            grads.append(local_tensor(p.grad))
        if not names:
            other = _hook_owners.consumer_of(self._params.values(), exclude=self)
            if other is not None:
                raise RuntimeError(
                    f"collect(): no eligible parameter has a .grad: the gradient hooks of "
                    f"{other} took them. Call close() on it before estimating with this model"
                )
            other = _hook_owners.other_reader(self._params.values(), exclude=self)
            if other is not None:
                raise RuntimeError(
                    "collect(): no eligible parameter has a .grad. Another estimator on these "
                    f"parameters is open, {other}, and its collect() clears the gradients it "
                    "folds: run loss.backward() before each estimator's collect(), or close() "
                    "the other one"
                )
            raise RuntimeError(
                "collect(): no eligible parameter has a .grad; call loss.backward() before "
                "collect()"
            )
        with torch.no_grad():
            self._fold(names, grads)
        for p in self._params.values():
            p.grad = None
        for p in self._others:
            p.grad = None
        self._terms += 1

    def _install_hooks(self) -> None:
        # The hooks hold the estimator weakly: one dropped without close() stops consuming
        # gradients once it is collected, and _hooks' finalizer then removes the hooks and
        # warns, naming it (a strong reference kept it, and the hooks, alive for good).
        ref = weakref.ref(self)

        def fold(name: str):
            def hook(p: Tensor) -> None:
                est = ref()
                if est is None or p.grad is None:
                    return
                _hook_owners.check_not_reentrant_checkpoint()
                est._note_term(name)
                with torch.no_grad():
                    est._fold([name], [p.grad])
                p.grad = None

            return hook

        def drop(p: Tensor) -> None:
            if ref() is not None:
                p.grad = None

        for name, p in self._params.items():
            self._hooks.append(p.register_post_accumulate_grad_hook(fold(name)))
        for p in self._others:
            self._hooks.append(p.register_post_accumulate_grad_hook(drop))
        _hook_owners.register(
            self, [*self._params.values(), *self._others], self._hooks, self._desc
        )

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
    def _sources(self, where: str) -> list[tuple[str, ScoreSource]]:
        self._check_open(where)
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
                        resolve(self._backend_arg, "select", p.device, (self.accum_dtype,)),
                    ),
                )
            )
        return out

    def scores(self) -> dict[str, Tensor]:
        """``{name: fp32 score tensor shaped like the param}``; excluded names are absent.

        Under FSDP2 each rank gets the scores of its own shard (shaped like
        ``param.to_local()``); :meth:`select` returns the global mask.
        """
        out = {}
        for name, src in self._sources("scores()"):
            s = src.backend.score(src.sum_g, src.sum_g2, self.method, self.eps)
            out[name] = s.view(local_tensor(self._params[name]).shape)  # FSDP2: local shard
        return out

    def select(self, ratio: float | None = None, *, k: int | None = None) -> SparseMask:
        """The global top-k mask: ``k = int(ratio * total trainable numel)``, or ``k`` given.

        Ties at the threshold go to the lower global position (parameter order, then flat
        index).  Exactly k entries are selected.
        """
        if (ratio is None) == (k is None):
            raise ValueError("select(): pass exactly one of ratio= (e.g. 1e-3) or k=")
        if k is None:
            # any real number (numpy scalars included), taken as a Python float: k is the
            # same for np.float32(r) as for float(np.float32(r))
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
                raise TypeError(f"select(): ratio must be a float in (0, 1], got {ratio!r}")
            ratio = float(ratio)
            if not (ratio == ratio) or not 0 < ratio <= 1:
                raise ValueError(f"select(): ratio={ratio!r} must be in (0, 1] (e.g. 1e-3)")
            k = int(ratio * self._numel_total)
            if k < 1:
                raise ValueError(
                    f"select(): ratio={ratio!r} of {self._numel_total} trainable entries selects "
                    "nothing; raise the ratio or pass k="
                )
        elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"select(): k={k!r} must be a positive int")
        k = int(k)  # numpy integers included
        sources = self._sources("select()")
        eligible = sum(p.numel() for p in self._params.values())  # global under FSDP2
        if k > eligible:
            raise ValueError(
                f"select(): k={k} exceeds the {eligible} eligible entries (excluded tensors, "
                f"{self._numel_total - eligible} entries, are never selected); lower the ratio "
                "or the exclusions"
            )
        with torch.no_grad():
            hooks = topk_hooks(self._group)
            if hooks:  # FSDP2: ranks' shards differ in size, so pieces must match tensors
                idxs = global_topk([s for _, s in sources], k, self.method, self.eps, **hooks)
                # local shard positions -> the global mask, the same on every rank
                idxs = gather_global_indices(list(self._params.values()), idxs, self._group)
            else:
                idxs = _chunked_topk([s for _, s in sources], k, self.method, self.eps)
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


# fixed: the same gradients give the same bf16 sums, hence the same mask
_SR_SEED = 0x5EED
