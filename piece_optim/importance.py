"""ImportanceEstimator: PIECE-F / PIECE-S importance and the global top-k mask."""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from . import _hook_owners
from ._backends import Backend, get_backend, validate_backend_name
from ._reference import index_dtype_for
from ._select import ScoreSource, global_topk
from ._sparse_grad import SparseGrad
from .distributed import estimator_group, gather_global_indices, local_tensor, topk_hooks
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
        by_backend: dict[int, tuple[Backend, list, list, list]] = {}
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
            s1, s2 = self._accumulators(name, p)
            backend = self._backend_for(p)
            entry = by_backend.setdefault(id(backend), (backend, [], [], []))
            entry[1].append(local_tensor(p.grad))
            entry[2].append(s1)
            entry[3].append(s2)
        if not by_backend:
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
            for backend, g, s1, s2 in by_backend.values():
                self._fold_many(backend, g, s1, s2)
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
                _check_not_reentrant_checkpoint()
                est._note_term(name)
                s1, s2 = est._accumulators(name, p)
                with torch.no_grad():
                    est._fold_many(est._backend_for(p), [p.grad], [s1], [s2])
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
                        self._backend_for(p),
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

    # -- memory: bf16 accumulation with stochastic rounding ---------------------------------
    _bf16_stochastic = True  # False: the backend's round-to-nearest (benchmarks compare)

    def _fold_many(
        self,
        backend: Backend,
        grads: Sequence[Tensor],
        sum_gs: Sequence[Tensor | None],
        sum_g2s: Sequence[Tensor],
    ) -> None:
        """Fold one term; fp32 accumulators go to the backend, bf16 ones are rounded
        stochastically here (see :func:`accumulate_bf16_sr_`)."""
        if self.accum_dtype != torch.bfloat16 or not self._bf16_stochastic:
            backend.accumulate_many_(grads, sum_gs, sum_g2s)
            return
        for g, s1, s2 in zip(grads, sum_gs, sum_g2s, strict=True):
            gen = self._sr_generators.get(g.device)
            if gen is None:
                gen = self._sr_generators[g.device] = torch.Generator(g.device)
                gen.manual_seed(_SR_SEED)
            accumulate_bf16_sr_(g, s1, s2, gen)

    @property
    def _sr_generators(self) -> dict[torch.device, torch.Generator]:
        gens = self.__dict__.get("_sr_gens")
        if gens is None:
            gens = self.__dict__["_sr_gens"] = {}
        return gens

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


# -- memory helpers (bf16 accumulators, reentrant checkpointing, chunked selection) --------
_SR_SEED = 0x5EED  # fixed: the same gradients give the same bf16 sums, hence the same mask
_SR_CHUNK = 1 << 18  # 256K entries: fp32 temporaries of ~3 MiB instead of a whole tensor
_SELECT_CHUNK = 1 << 20  # entries per score source in select(): bounds the histogram temps


def accumulate_bf16_sr_(
    grad: Tensor, sum_g: Tensor | None, sum_g2: Tensor, generator: torch.Generator
) -> None:
    """``sum_g += g``, ``sum_g2 += g*g`` into bf16 sums, fp32 math, stochastic rounding.

    Why: with round-to-nearest a bf16 sum stops growing once a term is below half an ulp
    of it (2**-9 of the sum): over hundreds of calibration batches sum g^2 of an entry
    with one large early term then ignores every later one, a bias that moves entries
    across the top-k threshold.  Stochastic rounding (add 16 random low bits to the fp32
    result, then truncate to bf16) is unbiased: each sum's expected value is the exact
    fp32 sum, at the cost of a little variance, and needs no extra storage (Kahan
    compensation would need a second bf16 buffer, i.e. fp32's memory).  The random bits
    come from a fixed-seed generator, so the same gradients give the same mask.  Work is
    done in chunks of ``_SR_CHUNK`` entries so the fp32 temporaries stay small.
    """
    g_all = grad.reshape(-1)
    n = g_all.numel()
    for start in range(0, n, _SR_CHUNK):
        stop = min(start + _SR_CHUNK, n)
        g = g_all[start:stop].float()
        if sum_g is not None:
            _sr_store_(sum_g[start:stop], sum_g[start:stop].float().add_(g), generator)
        _sr_store_(sum_g2[start:stop], sum_g2[start:stop].float().addcmul_(g, g), generator)


def _sr_store_(dst: Tensor, x: Tensor, generator: torch.Generator) -> None:
    """Round fp32 ``x`` to bf16 stochastically and write it into ``dst``.

    Adding a uniform 16-bit integer to the fp32 bit pattern and clearing the low 16 bits
    rounds the magnitude up with probability (dropped bits) / 2**16, for either sign.
    Inf stays inf (its low bits are zero); NaN stays NaN.
    """
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device,
                          generator=generator)  # fmt: skip
    bits.add_(noise).bitwise_and_(-65536)
    dst.copy_(bits.view(torch.float32))  # exact: the value has bf16 precision


def _check_not_reentrant_checkpoint() -> None:
    """Raise if this in_backward hook runs inside a reentrant checkpoint's backward.

    ``torch.utils.checkpoint(use_reentrant=True)`` recomputes a segment and runs a nested
    backward for it, so a parameter used both inside and outside that segment (tied
    embeddings, a block applied twice) gets two post-accumulate-grad hook calls in one
    ``backward()``: its term would be split in two, counting g1^2 + g2^2 instead of
    (g1 + g2)^2 and starting a spurious new term.  The non-reentrant checkpoint has one
    backward and is exact.  Checked by looking for the checkpoint's backward frame (a few
    frames up the stack, cheap next to the accumulation).
    """
    f = sys._getframe(1)
    for _ in range(64):
        if f is None:
            return
        code = f.f_code
        if code.co_name == "backward" and code.co_filename.replace("\\", "/").endswith(
            "torch/utils/checkpoint.py"
        ):
            raise RuntimeError(
                "ImportanceEstimator(in_backward=True) cannot run under reentrant activation "
                "checkpointing (torch.utils.checkpoint(..., use_reentrant=True)): its nested "
                "backward splits a gradient term in two.  Use use_reentrant=False (HF: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})), or in_backward=False with collect()"
            )
        f = f.f_back


def _chunked_topk(sources: list[ScoreSource], k: int, method: str, eps: float) -> list[Tensor]:
    """:func:`global_topk` over sources split into chunks of ``_SELECT_CHUNK`` entries.

    Why: a backend's histogram pass may build temporaries proportional to the tensor it
    scores (the pure-torch one: ~40 B per entry), so one 6M-entry lm_head alone added
    ~170 MiB to the estimation peak.  Chunks keep the global order (tensor, then flat
    index), so ties and the result are unchanged; indices are shifted back per tensor.
    """
    pieces: list[ScoreSource] = []
    owners: list[tuple[int, int]] = []  # (source number, offset)
    for i, s in enumerate(sources):
        if s.numel <= _SELECT_CHUNK:
            pieces.append(s)
            owners.append((i, 0))
            continue
        for start in range(0, s.numel, _SELECT_CHUNK):
            stop = min(start + _SELECT_CHUNK, s.numel)
            pieces.append(ScoreSource(None if s.sum_g is None else s.sum_g[start:stop],
                                      s.sum_g2[start:stop], stop - start, s.index_dtype,
                                      s.backend))  # fmt: skip
            owners.append((i, start))
    idxs = global_topk(pieces, k, method, eps)
    parts: list[list[Tensor]] = [[] for _ in sources]
    for (i, start), idx in zip(owners, idxs, strict=True):
        if idx.numel():
            parts[i].append(idx.to(sources[i].index_dtype) + start if start else idx)
    return [
        torch.cat(p) if len(p) > 1 else p[0] if p else
        torch.empty(0, dtype=s.index_dtype, device=s.sum_g2.device)
        for p, s in zip(parts, sources, strict=True)
    ]  # fmt: skip
