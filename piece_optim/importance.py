"""ImportanceEstimator: PIECE-F / PIECE-S importance and the global top-k mask."""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import _hook_owners
from . import functional as F
from ._dtensor import estimator_group, gather_global_indices, local_tensor, topk_hooks
from ._indices import index_dtype_for
from ._select import ScoreSource, TopkInfo, _chunked_topk_info, global_topk_info, kth_largest
from ._sparse_grad import SparseGrad
from .backends import resolve, validate_backend_name
from .backends.reference import stochastic_key
from .mask import SparseMask

METHODS = {"piece-f": "piece-f", "fisher": "piece-f", "piece-s": "piece-s",
           "second-order": "piece-s"}  # fmt: skip
_ACCUM_DTYPES = (torch.float32, torch.bfloat16)

# eps="auto" = EPS_AUTO_FRACTION x the EPS_AUTO_QUANTILE-quantile of the eligible entries'
# nonzero sum g^2 (with a reference: of the whole denominator).  See ImportanceEstimator.
EPS_AUTO_QUANTILE = 0.5
EPS_AUTO_FRACTION = 1.0
# select() calls PIECE-S saturated when its threshold is within this fraction of the
# score's ceiling sqrt(T): then the top-k is decided by fp32 rounding, not importance.
_SATURATION_TOL = 1e-3
# select() warns when more than this fraction of k was picked by position among equal scores.
_POSITION_WARN_FRACTION = 0.01


class SelectionWarning(UserWarning):
    """select() found a mask decided by something other than importance (see the message)."""


@dataclass(frozen=True)
class SelectionInfo(TopkInfo):
    """:class:`~piece_optim._select.TopkInfo` plus the eps used and the saturation flag.

    ``saturated`` (PIECE-S): the k-th largest score is within 0.1% of the ceiling
    ``sqrt(T)`` (T = terms collected), which every entry whose T gradient terms are equal
    approaches when eps is far below its sum of squares.  ``reference_scale``: the factor
    c the reference Fisher was rescaled by; ``pool_threshold``: the largest reference
    Fisher inside the pool (both None when not used).
    """

    eps: float = 0.0
    saturated: bool = False
    reference_scale: float | None = None
    pool_threshold: float | None = None


class ImportanceEstimator:
    r"""Estimate per-parameter importance on a task's data and select the top entries.

    Each :meth:`collect` (or, with ``in_backward=True``, each ``backward()``) is one term
    :math:`g_b` of the sums :math:`\sum_b g_b` and :math:`\sum_b g_b^2`, accumulated in
    ``accum_dtype`` with fp32 math.  Scores:

    * ``"piece-f"`` (alias ``"fisher"``): :math:`F_i = \sum_b g_{b,i}^2`
    * ``"piece-s"`` (alias ``"second-order"``):
      :math:`S_i = |\sum_b g_{b,i}| / \sqrt{\sum_b g_{b,i}^2 + \epsilon}`

    What eps means.  :math:`S_i \le \sqrt{T}` (T terms), and the score has two degenerate
    limits.  eps far above :math:`\sum g^2` (the paper's 1.0 with the tiny gradient sums of
    most models): :math:`S \approx |\sum g| / \sqrt{\epsilon}`, a first-moment magnitude
    that ranks like :math:`|\sum g|`.  eps far below it: S is a signal-to-noise ratio that
    every entry with consistent gradients pushes to :math:`\sqrt{T}`, so the top-k is
    decided by fp32 rounding (measured on the demo's 0.9M LLaMA, T = 16, eps = 1e-8: the
    1% threshold was 3.998 of a ceiling of 4, and the mask shared 7% of its entries with
    the top :math:`|\sum g|`).  ``eps="auto"`` puts eps on the scale of the sums:
    ``EPS_AUTO_FRACTION`` (1.0) x the ``EPS_AUTO_QUANTILE`` (0.5) quantile of the eligible
    entries' nonzero :math:`\sum g^2`, found exactly by the selection's histogram passes
    (no sort, no copy) every time scores or a mask are computed; an entry whose
    :math:`\sum g^2` is below that is ranked by magnitude, one above it by consistency.
    :meth:`resolved_eps` gives the value.  See the demo's docs for the measurements.

    Args:
        model: the module whose parameters are scored.
        method: see above.
        eps: the :math:`\epsilon` of PIECE-S: a float >= 0 (1.0 as in the paper) or
            ``"auto"`` (see above).  Unused by PIECE-F.
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
        if not (isinstance(eps, str) and eps == "auto") and (
            isinstance(eps, bool)
            or not isinstance(eps, numbers.Real)
            or not math.isfinite(eps)
            or eps < 0
        ):
            raise ValueError(
                f"eps={eps!r} must be a finite number >= 0 (the paper uses 1.0) or 'auto'"
            )
        if isinstance(exclude, str):
            exclude = (exclude,)
        if accum_dtype not in _ACCUM_DTYPES:
            raise ValueError(
                f"accum_dtype={accum_dtype} is not supported; use torch.float32 or torch.bfloat16"
            )
        self.method = METHODS[method]
        self.eps: float | str = eps if eps == "auto" else float(eps)
        self.last_selection: SelectionInfo | None = None
        self._reference_scale: float | None = None
        self._pool_threshold: float | None = None
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
    def _sources(
        self,
        where: str,
        reference: ImportanceEstimator | Mapping[str, Tensor] | None = None,
        weight: float | None = None,
        pool: float | None = None,
        k: int | None = None,
    ) -> list[tuple[str, ScoreSource]]:
        self._check_open(where)
        if not self._sum_g2:
            raise RuntimeError(
                "no gradients were collected yet: run backward() and collect() on the "
                "calibration batches first"
            )
        ref = self._reference_fisher(reference, weight, pool)
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
        self._reference_scale = self._pool_threshold = None
        if ref is None:
            return out
        refs = [replace(s, sum_g=None, sum_g2=ref[n]) for n, s in out]
        if pool is not None:
            # the pool: the ceil(pool * k) entries with the lowest reference Fisher (all of
            # those tied at the boundary).  Outside it both sums read as 0, so the score is 0
            # and eps="auto" sees the pool only.  Two temporaries per eligible entry.
            n_pool = math.ceil(pool * (k if k is not None else 1))
            v = kth_largest(
                refs,
                lambda h: max(1, int(h.sum()) - n_pool + 1),
                "piece-f",
                0.0,
                **_reduce_only(self._group),
            )
            self._pool_threshold = v
            pooled = []
            for n, s in out:
                inside = ref[n] <= v
                s1 = None if s.sum_g is None else torch.where(inside, s.sum_g, 0)
                pooled.append((n, replace(s, sum_g=s1, sum_g2=torch.where(inside, s.sum_g2, 0))))
            return pooled
        # the reference rescaled so that its median nonzero entry equals the task sums'
        med_ref = self._quantile_nonzero(refs, 0.5)
        scale = self._quantile_nonzero([s for _, s in out], 0.5) / med_ref if med_ref else 0.0
        self._reference_scale = scale
        w = 1.0 if weight is None else weight
        # one fp32 temporary per eligible entry while scores / select() run
        return [
            (n, replace(s, sum_g2=torch.add(s.sum_g2.float(), ref[n], alpha=w * scale)))
            for n, s in out
        ]

    def _reference_fisher(
        self,
        reference: ImportanceEstimator | Mapping[str, Tensor] | None,
        weight: float | None,
        pool: float | None,
    ) -> dict[str, Tensor] | None:
        """Flat fp32 per-term Fisher of the reference for every eligible name, or None."""
        if reference is None:
            if weight is not None or pool is not None:
                raise ValueError("reference_weight / reference_pool need reference=")
            return None
        if pool is not None:
            if weight is not None:
                raise ValueError(
                    "pass reference_weight (the reference joins the denominator) or "
                    "reference_pool (selection among the least reference-important entries), "
                    "not both"
                )
            if isinstance(pool, bool) or not isinstance(pool, (int, float)):
                raise TypeError(f"reference_pool must be a number >= 1, got {pool!r}")
            if not math.isfinite(pool) or pool < 1:
                raise ValueError(f"reference_pool={pool!r} must be a finite number >= 1 (x k)")
        elif self.method != "piece-s":
            raise ValueError(
                "reference= with reference_weight needs method='piece-s': the reference Fisher "
                "joins the denominator of the PIECE-S score (PIECE-F has none); "
                "reference_pool= works with either"
            )
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"reference_weight must be a float >= 0, got {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"reference_weight={weight!r} must be a finite number >= 0")
        if isinstance(reference, ImportanceEstimator):
            if reference is self:
                raise ValueError("reference= must be another estimator (or a Fisher dict)")
            reference = reference.fisher()
        if not isinstance(reference, Mapping):
            raise TypeError(
                "reference must be an ImportanceEstimator or a {name: tensor} Fisher dict "
                f"(e.g. est.fisher()), got {type(reference).__name__}"
            )
        out = {}
        for name, p in self._params.items():
            if name not in reference:
                raise KeyError(
                    f"reference has no Fisher for parameter {name!r}; estimate it on the same "
                    "model with exclude= no wider than this estimator's"
                )
            f = reference[name]
            n = local_tensor(p).numel()
            if f.numel() != n:
                raise ValueError(
                    f"reference Fisher for {name!r} has {f.numel()} entries, the parameter "
                    f"{n} (local shard under FSDP2)"
                )
            f = local_tensor(f).detach().reshape(-1).to(p.device, torch.float32)
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValueError(
                    f"reference Fisher for {name!r} has negative, NaN or infinite entries; "
                    "a Fisher is a mean of squared gradients (>= 0)"
                )
            out[name] = f
        return out

    def fisher(self) -> dict[str, Tensor]:
        r"""``{name: fp32 tensor shaped like the param}``: the per-term empirical Fisher
        :math:`\sum_b g_b^2 / T`, e.g. to keep as the ``reference=`` of later selections."""
        if self._terms == 0:
            raise RuntimeError("fisher(): no gradients were collected yet")
        out = {}
        for name, p in self._params.items():
            s2 = self._accumulators(name, p)[1]
            out[name] = (s2.float() / self._terms).view(local_tensor(p).shape)  # FSDP2: shard
        return out

    def _quantile_nonzero(self, sources: list[ScoreSource], q: float) -> float:
        """The exact q-quantile of the sources' nonzero sum_g2 (0.0 if all are zero)."""

        def k_of(h) -> int:
            # top-16-bit bin 0 holds zeros (and denormals < 2**-119): no gradient signal
            n_pos = int(h.sum()) - int(h[0])
            return max(1, math.ceil((1 - q) * n_pos)) if n_pos else 1

        return kth_largest(sources, k_of, "piece-f", 0.0, **_reduce_only(self._group))

    def _resolve_eps(self, sources: list[ScoreSource]) -> float:
        if self.eps != "auto":
            return float(self.eps)
        value = self._quantile_nonzero(sources, EPS_AUTO_QUANTILE)
        # all sums zero: every score is 0 whatever eps is; 1.0 keeps the division defined
        return EPS_AUTO_FRACTION * value if value > 0 else 1.0

    def resolved_eps(
        self,
        reference: ImportanceEstimator | Mapping[str, Tensor] | None = None,
        reference_weight: float | None = None,
    ) -> float:
        """The eps PIECE-S uses now: ``eps`` itself, or the value ``"auto"`` resolves to
        for the sums collected so far (and the reference, if given; see :meth:`select`)."""
        return self._resolve_eps(
            [s for _, s in self._sources("resolved_eps()", reference, reference_weight)]
        )

    def scores(
        self,
        reference: ImportanceEstimator | Mapping[str, Tensor] | None = None,
        reference_weight: float | None = None,
    ) -> dict[str, Tensor]:
        """``{name: fp32 score tensor shaped like the param}``; excluded names are absent.

        Under FSDP2 each rank gets the scores of its own shard (shaped like
        ``param.to_local()``); :meth:`select` returns the global mask.
        ``reference``, ``reference_weight``: the protective score, see :meth:`select`.
        """
        sources = self._sources("scores()", reference, reference_weight)
        eps = self._resolve_eps([s for _, s in sources])
        out = {}
        for name, src in sources:
            s = src.backend.score(src.sum_g, src.sum_g2, self.method, eps)
            out[name] = s.view(local_tensor(self._params[name]).shape)  # FSDP2: local shard
        return out

    def select(
        self,
        ratio: float | None = None,
        *,
        k: int | None = None,
        tie_break: str = "magnitude",
        reference: ImportanceEstimator | Mapping[str, Tensor] | None = None,
        reference_weight: float | None = None,
        reference_pool: float | None = None,
    ) -> SparseMask:
        r"""The global top-k mask: ``k = int(ratio * total trainable numel)``, or ``k`` given.

        Exactly k entries are selected.  Ties at the threshold: ``tie_break="magnitude"``
        (default) keeps, for PIECE-S, the larger :math:`|\sum g|` first (a tie there means
        equal consistency, so the stronger signal wins); equal on that too, or PIECE-F, or
        ``tie_break="position"``: the lower global position (parameter order, then flat
        index).  Masks are deterministic and the same on every backend.
        :attr:`last_selection` (a :class:`SelectionInfo`) says how the mask was decided;
        a :class:`SelectionWarning` is raised when PIECE-S is saturated or when more than
        1% of k was picked by position among equal scores.

        Protective selection (``reference``, PIECE-S only; beyond the paper): importance
        on reference data, i.e. data the model should keep doing well on (held-out
        general text, or text sampled from the model itself: see
        :func:`piece_optim.protect.sample_tokens`), joins the denominator:

        .. math:: S_i = |\sum_b g_{b,i}| / \sqrt{\sum_b g_{b,i}^2 + w\,c\,F^{ref}_i + \epsilon}

        with :math:`F^{ref} = \sum g_{ref}^2 / T_{ref}` (``reference.fisher()``; pass the
        estimator or such a dict), ``w = reference_weight`` and
        :math:`c = \mathrm{median}(\sum g^2) / \mathrm{median}(F^{ref})` over nonzero
        entries: the reference is rescaled so that its median entry equals the task sums'.
        Why rescale: the two scales are unrelated (on the demo's model the task's per-term
        Fisher had median 1e-5, general text's 2e-7), so a raw weight would need retuning
        for every model and task; rescaled, ``w = 1`` lets a typical reference entry count
        as much as a typical task entry.  Squared, S is the loss decrease of a Newton step
        on the task loss plus a quadratic (EWC-like) penalty
        :math:`\tfrac{\lambda}{2} \sum_i F^{ref}_i \delta_i^2` on the change
        (:math:`\lambda = w c / T`), curvature taken as the Fisher: entries that the
        reference data are sensitive to score low.  With ``eps="auto"`` the quantile is
        taken of the whole denominator.  :attr:`SelectionInfo.reference_scale` reports c.
        Costs one fp32 temporary per eligible entry while the selection runs.

        ``reference_pool=P`` instead (PIECE-F or PIECE-S): a hard rule.  Only the
        ``ceil(P * k)`` eligible entries with the lowest reference Fisher (all those tied at
        the boundary included) can be selected, and among them the task's own score
        ranks (``eps="auto"`` is then the quantile over the pool).  It is the task-aware
        form of drawing k entries at random from that pool; see docs/demo.md for how the
        two compare.  Costs two temporaries per eligible entry.
        """
        if (ratio is None) == (k is None):
            raise ValueError("select(): pass exactly one of ratio= (e.g. 1e-3) or k=")
        if tie_break not in ("magnitude", "position"):
            raise ValueError(f"select(): tie_break={tie_break!r} must be 'magnitude' or 'position'")
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
        sources = self._sources("select()", reference, reference_weight, reference_pool, k)
        eligible = sum(p.numel() for p in self._params.values())  # global under FSDP2
        if k > eligible:
            raise ValueError(
                f"select(): k={k} exceeds the {eligible} eligible entries (excluded tensors, "
                f"{self._numel_total - eligible} entries, are never selected); lower the ratio "
                "or the exclusions"
            )
        with torch.no_grad():
            srcs = [s for _, s in sources]
            eps = self._resolve_eps(srcs)
            hooks = topk_hooks(self._group)
            if hooks:  # FSDP2: ranks' shards differ in size, so pieces must match tensors
                idxs, info = global_topk_info(
                    srcs, k, self.method, eps, tie_break=tie_break, **hooks
                )
                # local shard positions -> the global mask, the same on every rank
                idxs = gather_global_indices(list(self._params.values()), idxs, self._group)
            else:
                idxs, info = _chunked_topk_info(srcs, k, self.method, eps, tie_break)
        self.last_selection = self._report(info, eps)
        indices = {name: idx for (name, _), idx in zip(sources, idxs, strict=True) if idx.numel()}
        return SparseMask(indices, {n: self._shapes[n] for n in indices}, self._numel_total)

    def _report(self, info: TopkInfo, eps: float) -> SelectionInfo:
        ceiling = math.sqrt(self._terms)
        saturated = self.method == "piece-s" and info.threshold >= (1 - _SATURATION_TOL) * ceiling
        sel = SelectionInfo(
            **vars(info),
            eps=eps,
            saturated=saturated,
            reference_scale=self._reference_scale,
            pool_threshold=self._pool_threshold,
        )
        if saturated:
            warnings.warn(
                f"PIECE-S is saturated: the k-th largest score {info.threshold:.6g} is within "
                f"{_SATURATION_TOL:.1%} of the ceiling sqrt(T) = {ceiling:.6g} (T = "
                f"{self._terms} terms, eps = {eps:.3g}), so the mask is decided by rounding, "
                "not importance. eps is far below the sums of squares: use eps='auto' (or an "
                "eps on the scale of sum g^2)",
                SelectionWarning,
                stacklevel=3,
            )
        if info.n_by_position > _POSITION_WARN_FRACTION * info.k:
            warnings.warn(
                f"{info.n_by_position} of the k={info.k} selected entries were picked by "
                f"position among {info.n_tied} equal scores ({info.threshold:.6g}): the mask "
                "there reflects parameter order, not importance",
                SelectionWarning,
                stacklevel=3,
            )
        return sel

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


def _reduce_only(group) -> dict:
    hooks = topk_hooks(group)
    return {"reduce_hist": hooks["reduce_hist"]} if hooks else {}
