"""SparseAdamW: AdamW that keeps optimizer state for the selected entries only."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _hooks
from ._backends import validate_backend_name
from ._reference import compute_dtype
from .distributed import local_tensor, refuse_sparse_grads, shard_indices
from .functional import refuse_foreign_adam_flags, sparse_adamw
from .mask import SparseMask, union_indices, validate_indices

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_FLOAT_KEYS = ("exp_avg", "exp_avg_sq", "master")


class SparseAdamW(Optimizer):
    r"""AdamW on a sparse set of entries, with optimizer state for those entries only.

    A drop-in replacement for :class:`torch.optim.AdamW`.  With ``mask=None`` every
    element trains and the update is torch's AdamW, operation for operation.  With a
    mask, each parameter's selected flat indices ``idx`` train; every other entry, and
    every parameter the mask does not name, is frozen: never read, never written (weight
    decay included), and holds no state.

    Per selected entry the state is an index (int32), ``exp_avg`` and ``exp_avg_sq``
    (fp32), plus an fp32 ``master`` copy for bf16/fp16 params (``master_weights``), so
    updates smaller than the storage precision accumulate instead of being rounded away.

    Args:
        params: what torch optimizers accept: tensors, dicts of param groups, or
            ``(name, param)`` pairs (e.g. ``model.named_parameters()``).
        mask: ``None`` (dense AdamW), a :class:`SparseMask` / mapping of parameter name to
            indices (needs named params), or a mapping of parameter tensor to indices
            (``mask.bind(model)``).  Indices are sorted unique flat positions in the full
            parameter, under FSDP2 too (each rank keeps the part in its shard).
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`; weight decay is
            decoupled and touches the selected entries only.
        sparse_grads: gather each gradient at the selected entries from a
            post-accumulate-grad hook into a small fp32 buffer and free the dense gradient
            at once, for every parameter this optimizer holds (frozen ones included: their
            gradient is dropped).  See "Sparse gradients" below.
        master_weights: ``"auto"`` (fp32 master for bf16/fp16 params), ``True`` or ``False``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    ``amsgrad``, ``maximize``, ``foreach``, ``capturable``, ``differentiable`` and ``fused``
    exist only to fail loudly when set: they are not supported.

    Sparse gradients (``sparse_grads=True``)
        Each backward's gradient of a parameter is gathered at its selected indices and
        *added* to an fp32 buffer of length k (all entries for a dense-trained parameter),
        then ``param.grad`` is set to None, so at most one dense gradient exists at a time
        and only while backward produces it.  Buffers sum across backwards, so gradient
        accumulation over micro-batches works as with dense grads; the buffers are cleared
        by :meth:`step` (after use) and by :meth:`zero_grad`, so a user's
        ``model.zero_grad()`` is harmless.  :meth:`clip_grad_norm_` clips the buffers
        (torch's ``clip_grad_norm_`` cannot see them), :meth:`sparse_grad` reads one and
        :meth:`grad_bytes` counts them; :meth:`close` removes the hooks.  Activation
        checkpointing (reentrant or not) works: a hook that fires twice in one backward
        just adds twice.  ``torch.amp.GradScaler`` cannot unscale or inf-check buffers it
        cannot see, so ``scaler.step(opt)`` raises; use bf16 autocast (no scaler) or
        ``sparse_grads=False``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        mask: SparseMask | Mapping[Any, Tensor] | None = None,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        sparse_grads: bool = False,
        master_weights: bool | str = "auto",
        backend: str = "auto",
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        for flag, value in (("amsgrad", amsgrad), ("maximize", maximize), ("foreach", foreach),
                            ("capturable", capturable), ("differentiable", differentiable),
                            ("fused", fused)):  # fmt: skip
            if value:
                raise ValueError(
                    f"SparseAdamW does not support {flag}={value!r}; leave it at its default "
                    "(the sparse step is already one batched kernel per backend)"
                )
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("lr as a Tensor must have one element")
        elif not 0.0 <= lr:
            raise ValueError(f"invalid learning rate lr={lr}: must be >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps={eps}: must be >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas={betas}: each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay={weight_decay}: must be >= 0")
        if master_weights not in ("auto", True, False):
            raise ValueError(f"master_weights={master_weights!r} must be 'auto', True or False")
        self.sparse_grads = bool(sparse_grads)
        self._sparse_init()
        self.master_weights = master_weights
        self.backend = validate_backend_name(backend)
        self._backend_arg = backend

        # Resolve the mask before torch's __init__ calls add_param_group.
        self._mask_kind: str
        self._mask_by_name: dict[str, Tensor] = {}
        self._mask_by_param: dict[Tensor, Tensor] = {}
        self._mask_shapes: dict[str, tuple[int, ...]] = {}
        self._matched: set[Any] = set()
        self._selection: dict[Tensor, Tensor | None] = {}  # param -> idx (None: dense)
        self._names: dict[Tensor, str] = {}
        if mask is None:
            self._mask_kind = "dense"
        elif isinstance(mask, SparseMask):
            self._mask_kind = "names"
            self._mask_by_name = dict(mask.items())
            self._mask_shapes = {n: mask.shape(n) for n in mask.names()}
        elif isinstance(mask, Mapping):
            keys = list(mask.keys())
            if all(isinstance(k, str) for k in keys):
                self._mask_kind = "names"
                self._mask_by_name = dict(mask)
            elif all(isinstance(k, Tensor) for k in keys):
                self._mask_kind = "params"
                self._mask_by_param = dict(mask)
            else:
                raise TypeError(
                    "mask must map parameter names (str) or parameter tensors to indices, not a mix"
                )
        else:
            raise TypeError(
                f"mask must be None, a SparseMask or a mapping, got {type(mask).__name__}"
            )

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

        unmatched = (
            [n for n in self._mask_by_name if n not in self._matched]
            if self._mask_kind == "names"
            else [k for k in self._mask_by_param if k not in self._matched]
        )
        if unmatched:
            shown = unmatched[:3] if self._mask_kind == "names" else [
                f"<tensor {tuple(t.shape)}>" for t in unmatched[:3]]  # fmt: skip
            raise ValueError(
                f"mask names {len(unmatched)} parameter(s) this optimizer does not hold "
                f"(e.g. {shown}); pass every parameter the mask selects, or a mask made "
                "for this model"
            )

    # -- param groups and the mask ---------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        _hooks.check_free(zip(names, group["params"], strict=True), "SparseAdamW", self)
        for p, name in zip(group["params"], names, strict=True):
            self._register_param(p, name)
        _drop_duplicates(group)  # one Parameter under two names: one entry, masks merged
        self._sparse_hook_params(group["params"])

    def _register_param(self, p: Tensor, name: str | None) -> None:
        what = repr(name) if name is not None else f"parameter of shape {tuple(p.shape)}"
        lp = local_tensor(p)  # FSDP2: the mask is global; the step runs on the local shard
        if name is not None:
            self._names.setdefault(p, name)  # the first name of a Parameter listed twice
        if self._mask_kind == "dense":
            idx = None
        elif self._mask_kind == "names":
            if name is None:
                raise ValueError(
                    "the mask is keyed by parameter names but the params carry no names; pass "
                    "model.named_parameters() or mask=mask.bind(model)"
                )
            if name not in self._mask_by_name:
                return  # frozen
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
        if not p.requires_grad or p.numel() == 0:
            return  # skipped: nothing to train (a zero-size or frozen param holds no state)
        if not lp.is_contiguous():
            raise ValueError(f"{what}: SparseAdamW needs contiguous parameters")
        if p.is_complex():
            raise ValueError(f"{what}: complex parameters are not supported")
        if idx is not None:
            idx = validate_indices(idx, p.numel(), f"mask[{what}]")
            idx = shard_indices(p, idx).to(p.device)  # FSDP2: this rank's part, local positions
            if idx.numel() == 0:
                return
        if p in self._selection:  # the same Parameter under a second name: both names' entries
            prev = self._selection[p]
            idx = None if prev is None or idx is None else union_indices(prev, idx, lp.numel())
        self._selection[p] = idx

    # -- state ---------------------------------------------------------------------------
    def _use_master(self, p: Tensor) -> bool:
        return p.dtype in _LOW_PRECISION and self.master_weights in ("auto", True)

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        idx = self._selection[p]
        p = local_tensor(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        mdt = compute_dtype(p.dtype)  # float64 params: float64 moments and math, as AdamW
        if idx is None:
            shape: Any = p.shape
            state["exp_avg"] = torch.zeros(shape, dtype=mdt, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=mdt, device=p.device)
            if self._use_master(p):
                state["master"] = p.detach().float().clone()
        else:
            state["idx"] = idx
            k = idx.numel()
            state["exp_avg"] = torch.zeros(k, dtype=mdt, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=mdt, device=p.device)
            if self._use_master(p):
                state["master"] = p.detach().view(-1)[idx.long()].float()
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
        """How many parameter entries this optimizer updates (on this rank under FSDP2)."""
        return sum(local_tensor(p).numel() if i is None else i.numel()
                   for p, i in self._selection.items())  # fmt: skip

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
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        self._sparse_check_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, idxs, ms, vs, masters, step_ts = [], [], [], [], [], [], []
            for p in group["params"]:
                grad = self._sparse_bufs.get(p) if self.sparse_grads else p.grad
                if p not in self._selection or grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SparseAdamW does not take torch.sparse gradients")
                state = self.state[p] or self._init_state(p)
                step_ts.append(state["step"])
                params.append(local_tensor(p))
                grads.append(local_tensor(grad))
                idxs.append(state.get("idx"))
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                masters.append(state.get("master"))
            if not params:
                continue
            # one call for every counter (as torch's foreach/fused AdamW do), not one per param
            torch._foreach_add_(step_ts, 1)
            steps = [int(t.item()) for t in step_ts]
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            try:
                sparse_adamw(
                    params, grads, idxs, ms, vs, masters, steps,
                    lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), grad_is_sparse=self.sparse_grads,
                    backend=self._backend_arg,
                )  # fmt: skip
            except BaseException:
                torch._foreach_sub_(step_ts, 1)  # the backends write nothing when they raise
                raise
        self._sparse_bufs.clear()  # consumed: the next backward starts a fresh sum
        return loss

    # -- sparse gradients (sparse_grads=True) -------------------------------------------------
    def _sparse_init(self) -> None:
        self._sparse_bufs: dict[Tensor, Tensor] = {}
        self._sparse_hooks: dict[Tensor, Any] = {}
        self._sparse_closed = False

    def _sparse_hook_params(self, params: Iterable[Tensor]) -> None:
        """Install the gather-and-free hook on every trainable param (sparse_grads only)."""
        if not self.sparse_grads:
            return
        params = list(params)
        refuse_sparse_grads(params)  # DDP / FSDP2: see piece_optim.distributed
        # The hook holds a weak reference: params outliving the optimizer must not keep it
        # (and its state) alive.
        ref = weakref.ref(self)

        def hook(p: Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._sparse_gather(p)

        for p in params:
            if p.requires_grad and p not in self._sparse_hooks:
                self._sparse_hooks[p] = p.register_post_accumulate_grad_hook(hook)
        # a finalizer warns (and removes the hooks) if the optimizer is dropped unclosed
        first = not getattr(self, "_sparse_watched", False)
        self._sparse_watched = True
        desc = f"SparseAdamW(sparse_grads=True) made at {_hooks.creation_site()}"
        _hooks.register(self, params, self._sparse_hooks, desc, watch=first)

    @torch.no_grad()
    def _sparse_gather(self, p: Tensor) -> None:
        g = p.grad
        if g is None:
            return
        p.grad = None  # free the dense gradient now, also for frozen params
        if p not in self._selection:
            return
        if g.is_sparse:
            raise RuntimeError("SparseAdamW does not take torch.sparse gradients")
        idx = self._selection[p]
        flat = g.reshape(-1)
        buf = self._sparse_bufs.get(p)
        if idx is None:
            if buf is None:
                self._sparse_bufs[p] = flat.to(torch.float32, copy=True)
            else:
                buf.add_(flat)
        else:
            vals = flat.index_select(0, idx)
            if buf is None:
                self._sparse_bufs[p] = vals.float()
            else:
                buf.add_(vals)

    def _sparse_check_step(self) -> None:
        if not self.sparse_grads:
            return
        if self._sparse_closed:
            raise RuntimeError("step(): this optimizer was closed (sparse_grads hooks removed)")
        if hasattr(self, "found_inf") or hasattr(self, "grad_scale"):
            raise RuntimeError(
                "SparseAdamW(sparse_grads=True) cannot be driven by torch.amp.GradScaler: the "
                "scaler unscales and inf-checks param.grad, which sparse_grads frees at once. "
                "Train in bf16 (torch.autocast(dtype=torch.bfloat16) needs no scaler), or use "
                "sparse_grads=False with the GradScaler"
            )

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler.step() hands control to optimizers that set this flag (it then sets
        # ``found_inf``/``grad_scale`` on us); with sparse_grads we use that to fail loudly
        # in step() instead of GradScaler's opaque "No inf checks were recorded".
        return self.sparse_grads

    def sparse_grad(self, p: Tensor | str) -> Tensor | None:
        """The accumulated gradient of ``p`` (a param or its name) at its selected entries.

        A flat fp32 tensor aligned with the mask's indices (all entries, flat, for a param
        trained densely), or None when no backward reached ``p`` since the last step or
        zero_grad.  Only meaningful with ``sparse_grads=True``.
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
        return self._sparse_bufs.get(p)

    def grad_bytes(self) -> int:
        """Bytes of gradient storage held now for this optimizer's params.

        The sparse buffers plus any dense ``.grad`` still attached (with sparse_grads=True
        the latter is 0 outside backward).
        """
        n = sum(b.numel() * b.element_size() for b in self._sparse_bufs.values())
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    n += p.grad.numel() * p.grad.element_size()
        return n

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> Tensor:
        """Clip the gradients this optimizer will apply; returns the total norm (like torch).

        The same math as :func:`torch.nn.utils.clip_grad_norm_`: the ``norm_type`` norm of
        the per-tensor norms, scaled by ``min(1, max_norm / (total + 1e-6))``.  With
        sparse_grads=True it runs on the sparse buffers, i.e. on the selected entries only
        (the entries the step uses; the others were never kept); otherwise on the ``.grad``
        of every param this optimizer holds, exactly torch's function.
        """
        if not self.sparse_grads:
            params = [p for g in self.param_groups for p in g["params"]]
            return torch.nn.utils.clip_grad_norm_(
                params, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
            )
        bufs = list(self._sparse_bufs.values())
        if not bufs:
            return torch.tensor(0.0)
        total = torch.nn.utils.get_total_norm(
            bufs, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
        )
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for b in bufs:
            b.mul_(coef.to(b.device))
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients: dense ``.grad`` as torch does, and the sparse buffers."""
        self._sparse_bufs.clear()
        super().zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the sparse_grads hooks and free the buffers (no-op without sparse_grads)."""
        for h in self._sparse_hooks.values():
            h.remove()
        self._sparse_hooks.clear()
        self._sparse_bufs.clear()
        if self.sparse_grads:
            self._sparse_closed = True

    # -- checkpointing -------------------------------------------------------------------------
    def _ordered_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, after checking it was made with the same mask and shapes.

        Moments and master copies stay fp32 whatever the param dtype.  On any mismatch a
        ValueError is raised and nothing changes.
        """
        saved_groups = state_dict["param_groups"]
        refuse_foreign_adam_flags(saved_groups)
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = self._ordered_params()
        if len(saved_ids) != len(params):
            raise ValueError(
                f"state_dict holds {len(saved_ids)} parameters, this optimizer {len(params)}"
            )
        keep: dict[Tensor, dict[str, Tensor]] = {}
        for sid, p in zip(saved_ids, params, strict=True):
            st = state_dict["state"].get(sid)
            if not st:
                continue
            name = self._names.get(p, f"#{sid} (shape {tuple(p.shape)})")
            if p not in self._selection:
                raise ValueError(
                    f"state_dict has state for parameter {name}, which this optimizer's mask "
                    "freezes: the state_dict comes from a different mask"
                )
            idx = self._selection[p]
            if idx is None:
                if "idx" in st or tuple(st["exp_avg"].shape) != tuple(local_tensor(p).shape):
                    raise ValueError(
                        f"state_dict for parameter {name} is sparse or of another shape; this "
                        "optimizer trains it densely (mask=None)"
                    )
            else:
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
            keep[p] = st
        super().load_state_dict(state_dict)
        for p, st in keep.items():
            state = self.state[p]
            for key in _STATE_FLOAT_KEYS:
                if key in st:
                    dt = torch.float32 if key == "master" else compute_dtype(p.dtype)
                    state[key] = st[key].detach().to(device=p.device, dtype=dt).clone()
            if "idx" in st:
                state["idx"] = self._selection[p]
            state["step"] = st["step"].detach().to(torch.float32).cpu().clone()


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
