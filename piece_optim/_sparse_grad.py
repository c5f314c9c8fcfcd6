"""``SparseGrad``: a parameter's gradient kept at its selected entries only, as ``param.grad``.

With ``SparseAdamW(sparse_grads=True)`` a post-accumulate-grad hook replaces each dense
gradient by a ``SparseGrad``: a tensor subclass with the parameter's shape, dtype and device
but no dense storage, holding the ``k`` gradient values at the mask's indices (``values``,
in the gradient's dtype, as ``.grad`` would hold them) and the indices (``idx``).

Why a tensor on ``param.grad`` and not a buffer inside the optimizer: everything that
reads or changes gradients does it through ``param.grad``:
``torch.nn.utils.clip_grad_norm_`` (Hugging Face Trainer's ``max_grad_norm`` through
Accelerate, Lightning's ``gradient_clip_val``), ``clip_grad_value_``,
``torch.amp.GradScaler`` (unscale and inf check), ``zero_grad`` in either form, and
autograd's own accumulation over micro-batches (``grad += new_grad``).  A buffer they cannot
see would make each of them a silent no-op.  ``SparseGrad`` implements, in
``__torch_dispatch__``, the operations those consumers call; every other operation raises
``NotImplementedError`` naming the operation, so nothing can read it as if it were dense.

Semantics: a ``SparseGrad`` is the gradient *restricted to the selected entries*; the
other entries were dropped (they are never used by the step).  So

* norms (``linalg_vector_norm``, ``_foreach_norm``) are over the selected entries only;
* in-place scaling, clamping, zeroing and unscaling act on the ``k`` values;
* ``add_``/``copy_``/``sub_`` of a dense tensor gather it at ``idx`` first (that is how
  autograd accumulates a further backward into an existing gradient);
* ``detach``/``alias`` give a ``SparseGrad`` sharing the values, ``clone`` a copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

aten = torch.ops.aten

__all__ = ["SparseGrad"]


def _is_full(t: Any, like: SparseGrad) -> bool:
    """A dense tensor shaped like the parameter (it must be gathered at ``idx``)."""
    return isinstance(t, Tensor) and not isinstance(t, SparseGrad) and t.shape == like.shape


class SparseGrad(Tensor):
    """A gradient stored at its selected entries only (see the module docstring)."""

    _values: Tensor
    _idx: Tensor

    @staticmethod
    def __new__(
        cls, values: Tensor, idx: Tensor, shape: Any, dtype: torch.dtype, device: Any
    ) -> SparseGrad:
        r = Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=device, requires_grad=False
        )
        r._values = values
        r._idx = idx
        return r

    def __init__(self, *args: Any) -> None:
        pass

    @classmethod
    def gather(cls, dense: Tensor, idx: Tensor) -> SparseGrad:
        """The ``SparseGrad`` of ``dense`` at the flat indices ``idx`` (same dtype as ``dense``)."""
        values = dense.detach().reshape(-1).index_select(0, idx)
        return cls(values, idx, dense.shape, dense.dtype, dense.device)

    def _like(self, values: Tensor) -> SparseGrad:
        return SparseGrad(values, self._idx, self.shape, self.dtype, self.device)

    @property
    def selected_values(self) -> Tensor:
        """The ``k`` gradient values, aligned with :attr:`selected_indices` (flat)."""
        return self._values

    @property
    def selected_indices(self) -> Tensor:
        """The sorted flat indices (into ``param.view(-1)``) the values belong to."""
        return self._idx

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"SparseGrad(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"k={self._values.numel()})"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (SparseGrad, (self._values, self._idx, tuple(self.shape), self.dtype, self.device))

    def __deepcopy__(self, memo: dict) -> SparseGrad:
        return SparseGrad(
            self._values.clone(), self._idx.clone(), self.shape, self.dtype, self.device
        )

    # -- dispatch ------------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            if func.overloadpacket in _FOREACH_INPLACE:
                return _foreach_inplace(func, args, kwargs)
            raise NotImplementedError(
                f"SparseGrad (a gradient kept at the selected entries only, made by "
                f"SparseAdamW(sparse_grads=True)) does not support {func}. Supported: norms, "
                "in-place scaling/clamping/zeroing/unscaling, accumulating a dense gradient "
                "(add_), detach and clone. Read grad.values / grad.idx, or use "
                "sparse_grads=False to keep dense gradients"
            )
        return handler(func, args, kwargs)


def _unwrap_for(g: SparseGrad, x: Any) -> Any:
    """``x`` as an operand of an in-place op on ``g``'s values."""
    if isinstance(x, SparseGrad):
        if x._idx is not g._idx and not torch.equal(x._idx, g._idx):
            raise NotImplementedError("SparseGrad: operands with different indices")
        return x._values
    if _is_full(x, g):
        return x.reshape(-1).index_select(0, g._idx.to(x.device))
    if isinstance(x, Tensor) and x.numel() > 1:
        raise NotImplementedError(
            f"SparseGrad: an operand of shape {tuple(x.shape)} (the gradient's is "
            f"{tuple(g.shape)}) cannot be applied to the selected entries"
        )
    return x


def _inplace(func: Any, args: Any, kwargs: dict) -> SparseGrad:
    g = args[0]
    rest = [_unwrap_for(g, a) for a in args[1:]]
    kw = {k: _unwrap_for(g, v) for k, v in kwargs.items()}
    func(g._values, *rest, **kw)
    return g


def _norm(func: Any, args: Any, kwargs: dict) -> Tensor:
    g, *rest = args
    dim = rest[1] if len(rest) > 1 else kwargs.get("dim")
    if dim is not None and list(dim) != list(range(g.dim())):
        raise NotImplementedError("SparseGrad: a norm over some dims only is not supported")
    ord_ = rest[0] if rest else kwargs.get("ord", 2)
    return torch.linalg.vector_norm(g._values, ord_, dtype=kwargs.get("dtype"))


def _alias(func: Any, args: Any, kwargs: dict) -> SparseGrad:
    return args[0]._like(args[0]._values)


def _clone(func: Any, args: Any, kwargs: dict) -> SparseGrad:
    return args[0]._like(args[0]._values.clone())


def _foreach_inplace(func: Any, args: Any, kwargs: dict) -> None:
    """Foreach in-place ops (scaling, clamping, zeroing): on the values of each SparseGrad."""
    tensors = [t._values if isinstance(t, SparseGrad) else t for t in args[0]]
    func(tensors, *args[1:], **kwargs)


def _foreach_norm(func: Any, args: Any, kwargs: dict) -> list[Tensor]:
    tensors = [t._values if isinstance(t, SparseGrad) else t for t in args[0]]
    return func(tensors, *args[1:], **kwargs)


def _amp_unscale(func: Any, args: Any, kwargs: dict) -> None:
    # GradScaler.unscale_: unscale the values and record a non-finite one in found_inf
    tensors = [t._values if isinstance(t, SparseGrad) else t for t in args[0]]
    func(tensors, *args[1:], **kwargs)


def _meta(func: Any, args: Any, kwargs: dict) -> Any:
    # metadata queries answered from the wrapper's own (param-shaped) metadata
    return func(torch.empty(args[0].shape, dtype=args[0].dtype, device="meta"), *args[1:], **kwargs)


def _no_grad_graph(func: Any, args: Any, kwargs: dict) -> Any:
    raise NotImplementedError(
        "SparseGrad cannot take part in a differentiable gradient sum (backward with "
        "create_graph=True, or an out-of-place op on .grad); use SparseAdamW(sparse_grads=False)"
    )


_HANDLERS: dict[Any, Any] = {}
for _op in (
    "mul_",
    "div_",
    "add_",
    "sub_",
    "copy_",
    "clamp_",
    "clamp_min_",
    "clamp_max_",
    "nan_to_num_",
    "neg_",
):
    for _name in getattr(aten, _op).overloads():
        _HANDLERS[getattr(getattr(aten, _op), _name)] = _inplace
_HANDLERS[aten.zero_.default] = _inplace
_HANDLERS[aten.fill_.Scalar] = _inplace
_HANDLERS[aten.linalg_vector_norm.default] = _norm
_HANDLERS[aten.detach.default] = _alias
_HANDLERS[aten.alias.default] = _alias
_HANDLERS[aten.clone.default] = _clone
_HANDLERS[aten._foreach_norm.Scalar] = _foreach_norm
_HANDLERS[aten._amp_foreach_non_finite_check_and_unscale_.default] = _amp_unscale
_HANDLERS[aten.add.Tensor] = _no_grad_graph
_HANDLERS[aten.is_same_size.default] = _meta

_FOREACH_INPLACE = {
    aten._foreach_mul_,
    aten._foreach_div_,
    aten._foreach_zero_,
    aten._foreach_clamp_min_,
    aten._foreach_clamp_max_,
}
