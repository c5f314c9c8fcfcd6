"""SparseAdamW: AdamW that keeps optimizer state for the selected entries only."""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from . import _hook_owners
from ._bounds import check_step_indices
from ._dtensor import local_tensor, refuse_sparse_grads, shard_indices
from ._indices import union_indices, validate_indices
from ._sparse_grad import SparseGrad
from .backends import validate_backend_name
from .backends.reference import compute_dtype
from .functional import refuse_foreign_adam_flags, sparse_adamw
from .mask import SparseMask, canonical_name, mask_spec

__all__ = ["SparseAdamW", "SparseGrad"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_FLOAT_KEYS = ("exp_avg", "exp_avg_sq", "master")
_UNSUPPORTED = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused")
# state_dict() key holding the whole mask: {"indices": {param id: idx or None}, "numel_total"}
MASK_KEY = "piece_mask"


class _MaskFromStateDict:
    """Sentinel mask: the selection comes from the next ``load_state_dict`` (Trainer resume)."""

    def __repr__(self) -> str:
        return "MASK_FROM_STATE_DICT"

    def __reduce__(self) -> str:
        return "MASK_FROM_STATE_DICT"


MASK_FROM_STATE_DICT = _MaskFromStateDict()


def _scalar_dtype() -> torch.dtype:
    # torch.optim's rule for step counters (float64 under a float64 default dtype)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class SparseAdamW(Optimizer):
    r"""AdamW on a sparse set of entries, with optimizer state for those entries only.

    A drop-in replacement for :class:`torch.optim.AdamW`: the positional arguments are
    AdamW's, ``mask`` is keyword-only.  With ``mask=None`` every element trains and the
    update is torch's AdamW, operation for operation.  With a mask, each parameter's
    selected flat indices ``idx`` train; every other entry, and every parameter the mask
    does not name, is frozen: never read, never written (weight decay included), and holds
    no state.

    Per selected entry the state is an index (int32), ``exp_avg`` and ``exp_avg_sq``
    (fp32), plus an fp32 ``master`` copy for bf16/fp16 params (``master_weights``), so
    updates smaller than the storage precision accumulate instead of being rounded away.

    Args:
        params: what torch optimizers accept: tensors, dicts of param groups, or
            ``(name, param)`` pairs (e.g. ``model.named_parameters()``).  Every param passed
            belongs to the optimizer, frozen (``requires_grad=False``) ones included: as in
            AdamW, whether a param has a gradient is decided at :meth:`step`, so a param
            unfrozen later trains.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`; weight decay is
            decoupled and touches the selected entries only.  ``lr`` (and ``betas``) may be
            a one-element Tensor, treated as AdamW treats it (see "torch.compile").
        mask: keyword-only. ``None`` (dense AdamW), a :class:`SparseMask` / mapping of
            parameter name to indices (needs named params), or a mapping of parameter
            tensor to indices (``mask.bind(model)``).  Indices are sorted unique flat
            positions in the full parameter, under FSDP2 too (each rank keeps the part in
            its shard).  A mask that leaves nothing to train raises ``ValueError`` naming the
            cause (names it does not match, e.g. after a wrapper such as PEFT renamed them:
            see :meth:`SparseMask.for_model`; or selected parameters all frozen).
        sparse_grads: keep each gradient at the selected entries only (see below).
        master_weights: ``"auto"`` (fp32 master for bf16/fp16 params), ``True`` or ``False``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    ``amsgrad``, ``maximize``, ``foreach``, ``capturable``, ``differentiable`` and ``fused``
    exist only to fail loudly when set (also in a param group): they are not supported.

    Sparse gradients (``sparse_grads=True``)
        A post-accumulate-grad hook replaces each dense gradient, as soon as autograd has
        accumulated it, by a :class:`SparseGrad` on ``param.grad``: a tensor with the
        param's shape and dtype and no dense storage, holding the gradient at the selected
        entries (``grad.selected_values``).  At most one dense gradient exists at a time,
        and only while backward produces it.  Everything that uses ``param.grad`` keeps
        working: a further backward adds into it (gradient accumulation), ``zero_grad``
        (optimizer's or module's) clears it, and ``torch.nn.utils.clip_grad_norm_`` /
        ``clip_grad_value_`` and ``torch.amp.GradScaler`` act on it, so Hugging Face
        Trainer's ``max_grad_norm``, ``accelerator.clip_grad_norm_`` and Lightning's
        ``gradient_clip_val`` clip it.  Norms are over the selected entries (the ones the
        step uses; the others were dropped), so with a mask they are smaller than the
        dense gradient's norm; ``mask=None`` gives the dense norm exactly (dense-trained
        params keep their dense gradient).  GradScaler likewise checks the selected entries
        for inf/NaN only.  Any other operation on a SparseGrad raises.
        Params frozen by the mask get their gradient dropped.  A param unfrozen after the
        optimizer was made gets its hook at the next eager :meth:`step` or
        :meth:`zero_grad` (until then its gradient stays dense, and is used as such).
        :meth:`close` removes the hooks.  Single-process only (DDP/FSDP2 refused, see
        below).

    bf16/fp16 master weights
        The fp32 master is the weight the step updates; the param holds it rounded.  When a
        param is changed outside the optimizer (``load_state_dict`` of the model,
        re-initialisation, ``p.zero_()``, ...), the master follows: at each step, every
        selected entry whose low-precision value differs from the master rounded to that
        precision (the value the last step wrote) is re-read from the param.  Costs one more
        read of the k param entries and of the master per step; no extra memory.

    torch.compile
        Under ``torch.compile``, and whenever ``lr`` or a beta is a Tensor, the update runs
        as torch ops written like torch's single-tensor AdamW (step counters stay tensors:
        no ``.item()`` graph break), on every backend; otherwise the backend's fused kernel.

    What still differs from AdamW, and why: ``docs/adamw_parity.md``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        mask: SparseMask | Mapping[Any, Tensor] | None = None,
        sparse_grads: bool = False,
        master_weights: bool | str = "auto",
        backend: str = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        flags = dict(
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        for flag, value in flags.items():
            if value:
                raise ValueError(
                    f"SparseAdamW does not support {flag}={value!r}; leave it at its default "
                    "(the sparse step is already one batched kernel per backend)"
                )
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("lr as a Tensor must have one element")
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate lr={lr}: must be >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps={eps}: must be >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas={betas}: each must be in [0, 1)")
        if any(isinstance(b, Tensor) and b.numel() != 1 for b in betas):
            raise ValueError("betas as Tensors must have one element each")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay={weight_decay}: must be >= 0")
        if master_weights not in ("auto", True, False):
            raise ValueError(f"master_weights={master_weights!r} must be 'auto', True or False")
        self.sparse_grads = bool(sparse_grads)
        self.master_weights = master_weights
        self.backend = validate_backend_name(backend)
        self._backend_arg = backend
        self._hooks: dict[Tensor, Any] = {}
        self._closed = False
        self._sharded = False

        # Resolve the mask before torch's __init__ calls add_param_group.
        spec = mask_spec(mask, pending=mask is MASK_FROM_STATE_DICT)
        self._mask_kind: str = spec.kind
        self._mask_by_name: dict[str, Tensor] = spec.by_name
        self._mask_by_param: dict[Tensor, Tensor] = spec.by_param
        self._mask_param_names: dict[Tensor, str] = spec.param_names
        self._mask_shapes: dict[str, tuple[int, ...]] = spec.shapes
        self._mask_total: int | None = spec.numel_total
        self._matched: set[Any] = set()
        self._mask_params: list[Tensor] = []  # params with selected entries (on any rank)
        self._selection: dict[Tensor, Tensor | None] = {}  # param -> idx (None: dense)
        self._names: dict[Tensor, str] = {}

        # differentiable=False: read by torch's step decorator (below), as in AdamW's defaults
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, differentiable=False
        )
        super().__init__(params, defaults)
        self._check_mask_trains()

    # -- param groups and the mask ---------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for flag in _UNSUPPORTED:
            if param_group.get(flag):
                raise ValueError(
                    f"SparseAdamW does not support {flag}={param_group[flag]!r} in a param "
                    "group; leave it out"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        _hook_owners.check_free(zip(names, group["params"], strict=True), "SparseAdamW", self)
        for p, name in zip(group["params"], names, strict=True):
            self._register_param(p, name)
        _drop_duplicates(group)  # one Parameter under two names: one entry, masks merged
        if self.sparse_grads:
            refuse_sparse_grads(group["params"])  # DDP / FSDP2: see piece_optim.distributed
            self._install_hooks(group["params"])

    def _what(self, p: Tensor) -> str:
        name = self._names.get(p) or self._mask_param_names.get(p)
        return repr(name) if name is not None else f"parameter of shape {tuple(p.shape)}"

    def _register_param(self, p: Tensor, name: str | None) -> None:
        lp = local_tensor(p)  # FSDP2: the mask is global; the step runs on the local shard
        if lp is not p:
            self._sharded = True  # step() unwraps local shards only when there are any
        if name is not None:
            self._names.setdefault(p, name)  # the first name of a Parameter listed twice
        if self._mask_kind in ("dense", "pending"):
            if self._mask_kind == "pending":
                return
            idx = None
        elif self._mask_kind == "names":
            if name is None:
                raise ValueError(
                    "the mask is keyed by parameter names but the params carry no names; pass "
                    "model.named_parameters() or mask=mask.bind(model)"
                )
            if name not in self._mask_by_name:
                return  # frozen by the mask
            self._matched.add(name)
            if name in self._mask_shapes and tuple(p.shape) != self._mask_shapes[name]:
                raise ValueError(
                    f"mask entry {name!r} was made for shape {self._mask_shapes[name]}, the "
                    f"parameter has shape {tuple(p.shape)}"
                )
            idx = self._mask_by_name[name]
        else:
            if p not in self._mask_by_param:
                return
            self._matched.add(p)
            idx = self._mask_by_param[p]
        what = self._what(p)
        if not lp.is_contiguous():
            raise ValueError(f"{what}: SparseAdamW needs contiguous parameters")
        if p.is_complex():
            raise ValueError(f"{what}: complex parameters are not supported")
        if idx is not None:
            # global positions (FSDP2: this rank's part, as local positions); they stay
            # on their device until step() moves them to the param's
            idx = validate_indices(idx, p.numel(), f"mask[{what}]")
            if idx.numel():
                self._mask_params.append(p)
            idx = shard_indices(p, idx)
            if idx.numel() == 0:
                return  # nothing selected (FSDP2: nothing in this rank's shard)
        if p in self._selection:  # the same Parameter under a second name: both names' entries
            prev = self._selection[p]
            idx = None if prev is None or idx is None else union_indices(prev, idx, lp.numel())
        self._selection[p] = idx

    def _check_mask_trains(self) -> None:
        """Raise when the mask leaves nothing to train, naming the cause and the fix."""
        if self._mask_kind in ("dense", "pending"):
            return
        if self._mask_kind == "names":
            unmatched = [n for n in self._mask_by_name if n not in self._matched]
        else:
            unmatched = [p for p in self._mask_by_param if p not in self._matched]
        if unmatched:
            raise ValueError(self._unmatched_message(unmatched))
        if not self._mask_params:
            raise ValueError("the mask selects no entry: there is nothing to train")
        if not any(p.requires_grad for p in self._mask_params):
            shown = [self._what(p) for p in self._mask_params[:3]]
            raise ValueError(
                f"the mask leaves nothing to train: every parameter it selects is frozen "
                f"(requires_grad=False), e.g. {', '.join(shown)}. Wrappers such as PEFT freeze "
                "the base model's weights; unfreeze the selected ones before making the "
                "optimizer (for n in mask.names(): model.get_parameter(n).requires_grad_(True)), "
                "or use a mask of the parameters that train"
            )

    def _unmatched_message(self, unmatched: list[Any]) -> str:
        if self._mask_kind == "names":
            held = list(self._names.values())
            held_canon = {canonical_name(n) for n in held}
            renamed = [n for n in unmatched if canonical_name(n) in held_canon]
            msg = (
                f"mask names {len(unmatched)} parameter(s) this optimizer does not hold "
                f"(e.g. {unmatched[:3]}; it holds e.g. {held[:3]})"
            )
            if renamed:
                return msg + (
                    ". The names differ by a wrapper's renaming (PEFT's 'base_model.model.' "
                    "prefix and '.base_layer' infix, DDP's 'module.', torch.compile's "
                    "'_orig_mod.'): re-map the mask with mask.for_model(model)"
                )
            return msg + (
                "; pass every parameter the mask selects, or a mask made for this model "
                "(mask.for_model(model) follows names changed by PEFT, DDP or torch.compile)"
            )
        names = [
            self._mask_param_names.get(p, f"<unnamed, shape {tuple(p.shape)}>") for p in unmatched
        ]
        msg = (
            f"mask selects {len(unmatched)} parameter(s) this optimizer does not hold "
            f"(e.g. {names[:3]})"
        )
        frozen = [p for p in unmatched if not p.requires_grad]
        if frozen:
            return msg + (
                f"; {len(frozen)} of them frozen (requires_grad=False): Trainer (like "
                "most training code) passes only trainable parameters to the optimizer. "
                "Wrappers such as PEFT freeze the base model's weights: unfreeze the selected "
                "ones before the optimizer is made (for n in mask.names(): "
                "model.get_parameter(n).requires_grad_(True)), or use a mask of the parameters "
                "that train"
            )
        return msg + "; pass every parameter the mask selects (a mask bound to this model)"

    def _idx_on(self, p: Tensor) -> Tensor | None:
        """``p``'s indices, on ``p``'s device: they follow the param if it moved (lazily)."""
        idx = self._selection[p]
        if idx is not None:
            device = local_tensor(p).device
            if idx.device != device:
                idx = idx.to(device)
                self._selection[p] = idx
                st = self.state.get(p)
                if st and "idx" in st:
                    st["idx"] = idx
        return idx

    # -- state ---------------------------------------------------------------------------
    def _use_master(self, p: Tensor) -> bool:
        return p.dtype in _LOW_PRECISION and self.master_weights in ("auto", True)

    def ensure_state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s optimizer state, made now (zero moments, step 0) if it has none yet.

        torch optimizers make state lazily at the first step; code that needs the state
        before (a checkpoint loader filling it in place, e.g. torch.distributed.checkpoint)
        calls this.  ``p`` must be one this optimizer trains (see :meth:`selected_params`).
        """
        if p not in self._selection:
            raise KeyError(
                f"ensure_state: {self._what(p)} is not trained by this optimizer (frozen by "
                "the mask, or not one of its params)"
            )
        state = self.state[p]
        if state:
            return state
        idx = self._idx_on(p)
        lp = local_tensor(p)
        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        mdt = compute_dtype(lp.dtype)  # float64 params: float64 moments and math, as AdamW
        if idx is None:
            shape: Any = lp.shape
            state["exp_avg"] = torch.zeros(shape, dtype=mdt, device=lp.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=mdt, device=lp.device)
            if self._use_master(p):
                state["master"] = lp.detach().float().clone()
        else:
            state["idx"] = idx
            k = idx.numel()
            state["exp_avg"] = torch.zeros(k, dtype=mdt, device=lp.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=mdt, device=lp.device)
            if self._use_master(p):
                state["master"] = lp.detach().view(-1)[idx.long()].float()
        return state

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (indices, moments, master copies, step counters)."""
        n = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    n += v.numel() * v.element_size()
        return n

    def trainable_numel(self) -> int:
        """How many entries this optimizer updates (of params that require grad; on this
        rank under FSDP2)."""
        return sum(
            local_tensor(p).numel() if i is None else i.numel()
            for p, i in self._selection.items()
            if p.requires_grad
        )

    def selected_params(self) -> list[Tensor]:
        """The parameters this optimizer trains (in param-group order)."""
        return [p for p in self._ordered_params() if p in self._selection]

    def mask_indices(self) -> dict[str, Tensor | None]:
        """``{param name: sorted flat indices}`` of the trained entries (None: dense).

        Under FSDP2 the indices are into the local shard.  Params passed without names
        are keyed ``"#<position>"`` (their position in the param groups).  The tensors are
        copies: the optimizer's own indices cannot be edited through them.
        """
        out: dict[str, Tensor | None] = {}
        for i, p in enumerate(self._ordered_params()):
            if p in self._selection:
                idx = self._selection[p]
                out[self._names.get(p, f"#{i}")] = None if idx is None else idx.clone()
        return out

    # -- step ----------------------------------------------------------------------------
    # torch's own step decorator (no grad, and under torch.compile the two graph breaks torch
    # puts around every optimizer step so AOT sees an inference graph: pytorch#104053)
    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self._closed:
            raise RuntimeError("step(): this optimizer was closed (sparse_grads hooks removed)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sparse_grads and not torch.compiler.is_compiling():
            self._install_hooks(self._ordered_params())  # params unfrozen since
        selection = self._selection
        for group in self.param_groups:
            # [dense-grad tensors, sparse-grad tensors]: params, grads, idxs, m, v, masters, steps
            lists: tuple[tuple[list, ...], ...] = tuple(tuple([] for _ in range(7)) for _ in "ds")
            for p in group["params"]:
                grad = p.grad
                if grad is None or p not in selection:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SparseAdamW does not take torch.sparse gradients")
                state = self.state[p]
                if not state:
                    state = self.ensure_state(p)
                lp = local_tensor(p) if self._sharded else p
                idx = selection[p]
                if idx is not None and idx.device != lp.device:
                    idx = self._idx_on(p)  # the param moved: its indices follow
                if type(grad) is SparseGrad:
                    if grad._idx is not idx and not torch.equal(grad._idx, idx):
                        raise RuntimeError(
                            f"{self._what(p)}: its SparseGrad holds other indices than the "
                            "optimizer's mask (the mask changed after backward); zero_grad() "
                            "first"
                        )
                    g, out = grad._values, lists[1]
                else:
                    g, out = (local_tensor(grad) if self._sharded else grad), lists[0]
                master = state.get("master")
                if master is not None:
                    check_step_indices([lp], [idx])  # the re-sync reads at idx first
                    _resync_master(lp, idx, master)
                out[0].append(lp)
                out[1].append(g)
                out[2].append(idx)
                out[3].append(state["exp_avg"])
                out[4].append(state["exp_avg_sq"])
                out[5].append(master)
                out[6].append(state["step"])
            step_ts = lists[0][6] + lists[1][6]
            if not step_ts:
                continue
            # one call for every counter (as torch's foreach/fused AdamW do), not one per param
            _add_to_counters(step_ts, 1)
            beta1, beta2 = group["betas"]
            done = []
            try:
                for is_sparse, tensors in enumerate(lists):
                    if tensors[0]:
                        sparse_adamw(
                            *tensors,
                            lr=group["lr"],
                            beta1=beta1,
                            beta2=beta2,
                            eps=group["eps"],
                            weight_decay=group["weight_decay"],
                            grad_is_sparse=bool(is_sparse),
                            backend=self._backend_arg,
                        )
                    done.append(is_sparse)
            except BaseException:
                # a backend that raises has written nothing (piece_optim._bounds): the
                # counters of the tensors it did not step go back
                undo = [t for i, lst in enumerate(lists) if i not in done for t in lst[6]]
                if undo:
                    _add_to_counters(undo, -1)
                raise
        return loss

    # -- sparse gradients (sparse_grads=True) -------------------------------------------------
    def _install_hooks(self, params: Iterable[Tensor]) -> None:
        """Install the gather hook on every held param that requires grad and has none yet."""
        if self._closed:
            return
        new = [p for p in params if p.requires_grad and p not in self._hooks]
        if not new:
            return
        # The hook holds a weak reference: params outliving the optimizer must not keep it
        # (and its state) alive.
        ref = weakref.ref(self)

        def hook(p: Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._sparse_gather(p)

        for p in new:
            self._hooks[p] = p.register_post_accumulate_grad_hook(hook)
        # a finalizer removes the hooks if the optimizer is dropped unclosed (no warning:
        # Trainer and deepcopy drop optimizers they never close; see _hook_owners);
        # an estimator made over the params whose dense gradient the hook replaces (masked:
        # by a SparseGrad) or drops (frozen by the mask) while the hooks are live is refused
        first = not getattr(self, "_hooks_watched", False)
        self._hooks_watched = True
        desc = f"SparseAdamW(sparse_grads=True) made at {_hook_owners.creation_site()}"
        taken = [p for p in new if self._selection.get(p, True) is not None]
        _hook_owners.register(self, taken, self._hooks, desc, watch=first, warn=False)

    @torch.no_grad()
    def _sparse_gather(self, p: Tensor) -> None:
        g = p.grad
        if g is None or isinstance(g, SparseGrad):
            return  # nothing new, or autograd already added into the SparseGrad
        if p not in self._selection:
            p.grad = None  # frozen by the mask: drop the dense gradient now
            return
        idx = self._idx_on(p)
        if idx is None:
            return  # trained densely: the dense gradient is what AdamW would use
        if g.is_sparse:
            raise RuntimeError("SparseAdamW does not take torch.sparse gradients")
        p.grad = SparseGrad.gather(g, idx)

    def sparse_grad(self, p: Tensor | str) -> Tensor | None:
        """The gradient of ``p`` (a param or its name) at its selected entries.

        A flat tensor (the gradient's dtype) aligned with the mask's indices (all entries,
        flat, for a param trained densely), or None when ``p`` has no gradient.  Only with
        ``sparse_grads=True``; it is ``p.grad.selected_values``.
        """
        if not self.sparse_grads:
            raise RuntimeError(
                "sparse_grad(): this optimizer was made with sparse_grads=False; read p.grad"
            )
        if isinstance(p, str):
            by_name = {n: t for t, n in self._names.items()}
            if p not in by_name:
                raise KeyError(f"sparse_grad(): no parameter named {p!r} in this optimizer")
            p = by_name[p]
        g = p.grad
        if g is None:
            return None
        return g._values if isinstance(g, SparseGrad) else g.reshape(-1)

    def grad_bytes(self) -> int:
        """Bytes of gradient storage held now by this optimizer's params (``.grad``).

        A :class:`SparseGrad` counts its values; with sparse_grads=True no dense gradient
        of a masked param exists outside backward.
        """
        n = 0
        for p in self._ordered_params():
            g = p.grad
            if isinstance(g, SparseGrad):
                n += g._values.numel() * g._values.element_size()
            elif g is not None:
                n += g.numel() * g.element_size()
        return n

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """:func:`torch.nn.utils.clip_grad_norm_` over the gradients of this optimizer's params.

        The same function Trainer, Accelerate and Lightning call on ``model.parameters()``,
        so both agree where the optimizer holds every param with a gradient.  With
        sparse_grads=True a :class:`SparseGrad` contributes its selected entries.
        """
        params = [p for p in self._ordered_params() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(
            params,
            max_norm,
            norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite,
            foreach=foreach,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients as torch does (a :class:`SparseGrad` included)."""
        if self.sparse_grads:
            self._install_hooks(self._ordered_params())
        super().zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the sparse_grads hooks (no-op without sparse_grads); step() then raises."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        if self.sparse_grads:
            self._closed = True

    # -- checkpointing -------------------------------------------------------------------------
    def _ordered_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, plus the mask under ``"piece_mask"``.

        ``{"indices": {param id: sorted flat indices, or None for a param trained densely},
        "numel_total": int or None}`` (param ids as in ``"state"``; ids absent are frozen by
        the mask).  :meth:`load_state_dict` checks it against this optimizer's mask.
        """
        sd = super().state_dict()
        params = self._ordered_params()
        sd[MASK_KEY] = {
            "indices": {
                i: self._selection[p] for i, p in enumerate(params) if p in self._selection
            },
            "numel_total": self._mask_total,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, after checking it was made with the same mask and shapes.

        torch's ``load_state_dict`` (pre/post hooks included), with checks first: the
        saved mask (``"piece_mask"``, or the indices in the per-param state of older
        state_dicts) must equal this optimizer's.  Moments are fp32 (float64 for float64
        params), master copies fp32.  On any mismatch a ValueError is raised and nothing
        changes.  A ``torch.optim.AdamW`` state_dict loads into ``mask=None``; one asking
        for ``amsgrad``/``maximize`` (or Adam's L2 weight decay) is refused.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        refuse_foreign_adam_flags(saved_groups)
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(groups, saved_groups, strict=True):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = self._ordered_params()
        id_map = dict(zip(saved_ids, params, strict=True))
        record = state_dict.get(MASK_KEY)
        selection = self._selection
        # pending: the mask comes from this state_dict, unless it is one without a mask
        # (accelerate.prepare round-trips a new optimizer's own state_dict, for instance)
        adopt = self._mask_kind == "pending" and bool(record and record["indices"])
        if adopt:
            selection = self._selection_of(record, id_map)
            if not any(p.requires_grad for p in selection):
                raise ValueError("the state_dict's mask leaves nothing to train")
        elif self._mask_kind == "pending":
            if state_dict["state"]:
                raise ValueError(
                    "this optimizer takes its mask from the state_dict, which carries none "
                    "(not saved by SparseAdamW): resume from a checkpoint made with use_piece"
                )
        elif record is not None:
            self._check_same_mask(record, id_map)
        for sid, st in state_dict["state"].items():
            if sid in id_map and st:
                self._check_state(id_map[sid], st, selection)

        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for sid, st in state_dict["state"].items():
            if sid not in id_map:
                state[sid] = st  # as torch: state of unknown ids is kept as is
                continue
            p = id_map[sid]
            lp = local_tensor(p)
            new: dict[str, Any] = {}
            for key, val in st.items():
                if key == "idx":
                    new[key] = selection[p]
                elif key == "step":
                    new[key] = val.detach().to(device="cpu", dtype=_scalar_dtype()).clone()
                elif key in _STATE_FLOAT_KEYS:
                    dt = torch.float32 if key == "master" else compute_dtype(lp.dtype)
                    new[key] = val.detach().to(device=lp.device, dtype=dt).clone()
                elif isinstance(val, Tensor):
                    new[key] = val.detach().to(lp.device).clone()
                else:
                    new[key] = deepcopy(val)
            state[p] = new
        for g, sg in zip(groups, saved_groups, strict=True):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
        if adopt:
            self._adopt(selection, record)
        Optimizer.__setstate__(self, {"state": state, "param_groups": saved_groups})
        for idx_p in list(self._selection):
            self._idx_on(idx_p)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _name_of(self, p: Tensor, sid: Any) -> str:
        return self._names.get(p) or f"#{sid} (shape {tuple(p.shape)})"

    def _selection_of(self, record: dict[str, Any], id_map: dict[Any, Tensor]) -> dict:
        out: dict[Tensor, Tensor | None] = {}
        for sid, idx in record["indices"].items():
            if sid not in id_map:
                raise ValueError(f"state_dict's mask names parameter id {sid}, which is not held")
            p = id_map[sid]
            if idx is not None:
                idx = validate_indices(idx, local_tensor(p).numel(), self._name_of(p, sid))
            out[p] = idx
        return out

    def _check_same_mask(self, record: dict[str, Any], id_map: dict[Any, Tensor]) -> None:
        saved = record["indices"]
        for sid, p in id_map.items():
            mine_has, theirs_has = p in self._selection, sid in saved
            mine = self._selection.get(p)
            theirs = saved.get(sid)
            name = self._name_of(p, sid)
            if mine_has != theirs_has:
                which = "trains" if theirs_has else "freezes"
                raise ValueError(
                    f"state_dict was made with a different mask: it {which} parameter {name}, "
                    "this optimizer's mask does not"
                )
            if not mine_has or (mine is None and theirs is None):
                continue
            if (
                (mine is None) != (theirs is None)
                or mine.shape != theirs.shape
                or not (torch.equal(theirs.to(mine), mine))
            ):
                got = "all" if theirs is None else theirs.numel()
                want = "all" if mine is None else mine.numel()
                raise ValueError(
                    f"state_dict for parameter {name} was made with a different mask ({got} "
                    f"indices saved, {want} in this optimizer's mask)"
                )

    def _check_state(self, p: Tensor, st: dict[str, Any], selection: dict) -> None:
        name = self._names.get(p) or f"of shape {tuple(p.shape)}"
        if p not in selection:
            raise ValueError(
                f"state_dict has state for parameter {name}, which this optimizer's mask "
                "freezes: the state_dict comes from a different mask"
            )
        idx = selection[p]
        if idx is None:
            if "idx" in st or tuple(st["exp_avg"].shape) != tuple(local_tensor(p).shape):
                raise ValueError(
                    f"state_dict for parameter {name} is sparse or of another shape; this "
                    "optimizer trains it densely (mask=None)"
                )
            return
        if "idx" not in st:
            raise ValueError(
                f"state_dict for parameter {name} is dense, this optimizer's mask is "
                "sparse: the state_dict comes from a different mask"
            )
        sidx = st["idx"]
        if sidx.shape != idx.shape or not torch.equal(sidx.to(idx), idx):
            raise ValueError(
                f"state_dict for parameter {name} was made with a different mask "
                f"({sidx.numel()} indices saved, {idx.numel()} in this optimizer's mask)"
            )
        if st["exp_avg"].numel() != idx.numel():
            raise ValueError(f"state_dict for parameter {name}: moments do not match k")

    def _adopt(self, selection: dict[Tensor, Tensor | None], record: dict[str, Any]) -> None:
        """Take the mask of a loaded state_dict (an optimizer made with MASK_FROM_STATE_DICT)."""
        self._selection = dict(selection)
        self._mask_kind = "params"
        self._mask_by_param = {p: i for p, i in selection.items() if i is not None}
        self._matched = set(self._mask_by_param)
        self._mask_params = list(selection)
        self._mask_total = record.get("numel_total")

    # -- copy / pickle ---------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        params = self._ordered_params()
        state["_piece"] = {
            "sparse_grads": self.sparse_grads,
            "master_weights": self.master_weights,
            "backend": self.backend,
            "backend_arg": self._backend_arg,
            "closed": self._closed,
            "mask_kind": self._mask_kind,
            "mask_by_name": self._mask_by_name,
            "mask_shapes": self._mask_shapes,
            "mask_total": self._mask_total,
            "mask_by_pos": [self._mask_by_param.get(p) for p in params],
            "selection": [(p in self._selection, self._selection.get(p)) for p in params],
            "names": [self._names.get(p) for p in params],
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        piece = state.pop("_piece", None)
        super().__setstate__(state)
        if piece is None:
            return
        params = self._ordered_params()
        self._sharded = any(local_tensor(p) is not p for p in params)
        self.sparse_grads = piece["sparse_grads"]
        self.master_weights = piece["master_weights"]
        self.backend = piece["backend"]
        self._backend_arg = piece["backend_arg"]
        self._closed = piece["closed"]
        self._mask_kind = piece["mask_kind"]
        self._mask_by_name = piece["mask_by_name"]
        self._mask_shapes = piece["mask_shapes"]
        self._mask_total = piece["mask_total"]
        self._mask_param_names = {}
        self._mask_by_param = {
            p: i for p, i in zip(params, piece["mask_by_pos"], strict=True) if i is not None
        }
        self._selection = {
            p: i for p, (has, i) in zip(params, piece["selection"], strict=True) if has
        }
        self._names = {p: n for p, n in zip(params, piece["names"], strict=True) if n is not None}
        self._matched = set(self._mask_by_name) | set(self._mask_by_param)
        self._mask_params = list(self._selection)
        self._hooks = {}
        if self.sparse_grads:
            self._install_hooks(params)


def _add_to_counters(steps: list[Tensor], value: int) -> None:
    # one tensor: add_ (~3x cheaper than a foreach call of one); several: one foreach call
    if len(steps) == 1:
        steps[0].add_(value)
    else:
        torch._foreach_add_(steps, value)


@torch.no_grad()
def _resync_master(p: Tensor, idx: Tensor | None, master: Tensor) -> None:
    """Re-read master entries whose param value changed outside the optimizer.

    The last step wrote ``master`` rounded to the param's dtype (round to nearest even, on
    every backend); an entry that no longer holds that value was changed by someone else
    (a checkpoint load, a re-init, ``p.zero_()``) and its master takes the new value.
    """
    flat = p.detach().view(-1)
    cur = flat if idx is None else flat.index_select(0, idx)
    m = master.view(-1)  # a dense param's master is shaped like it (2+ dims included)
    stale = cur != m.to(cur.dtype)
    m.copy_(torch.where(stale, cur.float(), m))


def _drop_duplicates(group: dict[str, Any]) -> None:
    """Keep the first entry of a Parameter listed twice in one group (``named_parameters(
    remove_duplicate=False)`` lists tied weights under each name; torch warns about it).
    Decision: the masks of both names were merged by ``_register_param``, and the param
    is stepped once per step (torch's AdamW would step it twice, which it calls a bug)."""
    params = group["params"]
    if len({id(p) for p in params}) == len(params):
        return
    names = group.get("param_names")
    keep = []
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) not in seen:
            seen.add(id(p))
            keep.append(i)
    group["params"] = [params[i] for i in keep]
    if names is not None:
        group["param_names"] = [names[i] for i in keep]
