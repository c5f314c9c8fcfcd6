"""SparseMask: which entries of which parameters are trained."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ._files import atomic_save_safetensors, load_safetensors_checked
from ._indices import index_dtype_for, union_indices, validate_indices

__all__ = [
    "BoundMask",
    "MaskSpec",
    "SparseMask",
    "canonical_name",
    "index_dtype_for",
    "mask_spec",
    "union_indices",
    "validate_indices",
]

_FORMAT = "piece_optim.SparseMask/1"
_LEGACY_KEYS = frozenset({"format", "numel_total", "shapes", "order"})  # before checksums


class SparseMask(Mapping[str, Tensor]):
    """Sorted flat indices of the selected entries, per parameter name.

    ``mask[name]`` is a 1-D int32 tensor (int64 for tensors of 2**31 or more entries) of
    sorted unique flat indices into the full parameter (``param.view(-1)``; under FSDP2
    the unsharded parameter, so a mask is the same on every rank and for any world size).
    Parameters with no selected entry have no key (they are frozen by
    :class:`SparseAdamW`).  ``numel_total()`` is the total trainable numel the ratio was
    taken of (excluded tensors included), so ``ratio`` is the fraction of the model that
    trains.

    The mask owns its indices: the constructor copies the tensors it is given, and
    ``mask[name]`` (so also ``items()``, ``values()``) and :meth:`bind` return copies.
    Editing a returned tensor never changes the mask, nor an optimizer built from it.
    """

    def __init__(
        self,
        indices: Mapping[str, Tensor],
        shapes: Mapping[str, tuple[int, ...] | torch.Size],
        numel_total: int,
    ) -> None:
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in shapes.items()}
        self._idx: dict[str, Tensor] = {}
        for name, idx in indices.items():
            if name not in self._shapes:
                raise ValueError(f"SparseMask: no shape given for parameter {name!r}")
            numel = _numel(self._shapes[name])
            self._idx[name] = validate_indices(idx, numel, f"SparseMask[{name!r}]")
        self._numel_total = int(numel_total)
        if self._numel_total < self.numel_selected():
            raise ValueError(
                f"numel_total={numel_total} is smaller than the {self.numel_selected()} "
                "entries selected"
            )

    # -- Mapping ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._idx[name].clone()  # a copy: the mask's indices cannot be edited

    def __iter__(self) -> Iterator[str]:
        return iter(self._idx)

    def __len__(self) -> int:
        return len(self._idx)

    def __repr__(self) -> str:
        return (
            f"SparseMask({len(self)} tensors, {self.numel_selected()} of {self.numel_total()} "
            f"entries, ratio={self.ratio:.3g})"
        )

    def __eq__(self, other: object) -> bool:
        """Same names in the same order, same shapes, same indices, same total."""
        if not isinstance(other, SparseMask):
            return NotImplemented
        return (
            self.names() == other.names()
            and self._numel_total == other._numel_total
            and all(self._shapes[n] == other._shapes[n] for n in self._idx)
            and all(
                torch.equal(self._idx[n].cpu().long(), other._idx[n].cpu().long())
                for n in self._idx
            )
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container of tensors

    # -- queries --------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names of the parameters with at least one selected entry, in model order."""
        return list(self._idx)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def numel_selected(self) -> int:
        return sum(int(i.numel()) for i in self._idx.values())

    def numel_total(self) -> int:
        return self._numel_total

    @property
    def ratio(self) -> float:
        return self.numel_selected() / self._numel_total if self._numel_total else 0.0

    def dense(self, name: str) -> Tensor:
        """A bool tensor shaped like the parameter, True at the selected entries."""
        out = torch.zeros(_numel(self._shapes[name]), dtype=torch.bool)
        out[self._idx[name].long()] = True
        return out.view(self._shapes[name])

    def overlap(self, other: SparseMask) -> float:
        """Fraction of this mask's entries that ``other`` selects too."""
        n = self.numel_selected()
        if n == 0:
            return 1.0
        common = 0
        for name, idx in self._idx.items():
            if name in other:
                common += int(torch.isin(idx.long(), other[name].long()).sum())
        return common / n

    # -- binding --------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> dict[Tensor, Tensor]:
        """Map each selected parameter object of ``model`` to its indices.

        Use it to pass ``model.parameters()`` (without names) to :class:`SparseAdamW`.  The
        returned dict also carries the names (``.param_names``, param -> name), so the
        optimizer's errors can name a parameter.
        """
        params = dict(model.named_parameters())
        out = BoundMask()
        for name, idx in self._idx.items():
            if name not in params:
                raise KeyError(
                    f"SparseMask.bind: the model has no parameter {name!r}; was the mask made "
                    "for another model?"
                )
            p = params[name]
            shape = tuple(p.shape)  # FSDP2 too: a DTensor's shape is the full parameter's
            if shape != self._shapes[name]:
                raise ValueError(
                    f"SparseMask.bind: parameter {name!r} has shape {shape}, the mask "
                    f"was made for {self._shapes[name]}"
                )
            out[p] = idx.to(p.device, copy=True)
            out.param_names[p] = name
        return out

    def to(self, device: torch.device | str) -> SparseMask:
        return SparseMask(
            {n: i.to(device) for n, i in self._idx.items()}, self._shapes, self._numel_total
        )

    # -- renaming (wrappers such as PEFT, DDP, torch.compile) ----------------------------------
    def rename(self, names: Mapping[str, str] | Callable[[str], str]) -> SparseMask:
        """The same mask under new parameter names: a mapping old -> new, or a function.

        Names a mapping does not list are kept.  Two names mapped to one raise.
        """
        fn = names if callable(names) else (lambda n: names.get(n, n))
        new = {n: fn(n) for n in self._shapes}
        if len(set(new.values())) != len(new):
            raise ValueError("SparseMask.rename: two parameter names map to the same new name")
        return SparseMask(
            {new[n]: i for n, i in self._idx.items()},
            {new[n]: s for n, s in self._shapes.items()},
            self._numel_total,
        )

    def for_model(self, model: nn.Module) -> SparseMask:
        """This mask re-keyed to ``model``'s parameter names (a wrapped model, typically).

        Wrappers rename parameters: PEFT (``get_peft_model``) adds the prefix
        ``base_model.model.`` and, in the layers it adapts, the infix ``.base_layer``
        (``...q_proj.weight`` -> ``base_model.model....q_proj.base_layer.weight``); DDP adds
        ``module.``, ``torch.compile`` ``_orig_mod.``.  Each mask name is matched to the
        parameter of ``model`` with the same name once those are removed from both
        (:func:`canonical_name`); shapes must agree.  Works in either direction (a mask made
        on the wrapped model, applied to the bare one).  Raises KeyError naming a parameter
        that cannot be found, or that matches several.

        PEFT also freezes the base weights (``requires_grad=False``): unfreeze the ones the
        mask selects before making the optimizer, e.g.
        ``for n in mask.names(): model.get_parameter(n).requires_grad_(True)``.
        """
        by_canon: dict[str, list[str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for n, p in model.named_parameters():
            by_canon.setdefault(canonical_name(n), []).append(n)
            shapes[n] = tuple(p.shape)  # FSDP2 too: a DTensor's shape is the full one
        mapping: dict[str, str] = {}
        for name in self._shapes:
            if name in shapes:
                mapping[name] = name
                continue
            hits = by_canon.get(canonical_name(name), [])
            if name not in self._idx and len(hits) != 1:
                continue  # a shape without selected entries: not needed
            if len(hits) != 1:
                why = "no parameter" if not hits else f"{len(hits)} parameters ({hits[:3]})"
                raise KeyError(
                    f"SparseMask.for_model: {why} of the model matches {name!r} (compared as "
                    f"{canonical_name(name)!r}); use mask.rename({{old: new}}) to map it by hand"
                )
            mapping[name] = hits[0]
        for old, new in mapping.items():
            if shapes[new] != self._shapes[old]:
                raise ValueError(
                    f"SparseMask.for_model: {old!r} -> {new!r} has shape {shapes[new]}, the "
                    f"mask was made for {self._shapes[old]}"
                )
        kept = SparseMask(
            self._idx, {n: s for n, s in self._shapes.items() if n in mapping}, self._numel_total
        )
        return kept.rename(mapping)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the mask as safetensors, atomically (see :func:`atomic_save_safetensors`).

        The metadata carries a SHA-256 of the payload, which :meth:`load` verifies.
        """
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "numel_total": str(self._numel_total),
            "shapes": json.dumps({n: list(s) for n, s in self._shapes.items()}),
            "order": json.dumps(list(self._idx)),
        }
        tensors = {f"idx/{n}": i.detach().cpu().contiguous() for n, i in self._idx.items()}
        atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> SparseMask:
        """Read a mask written by :meth:`save`.

        Raises FileNotFoundError, or ValueError naming the path and what is wrong with the
        file: empty, truncated, not safetensors, not a mask, a checksum mismatch (the file
        changed after it was written), malformed metadata.  A file from before checksums
        existed loads with a warning.
        """
        meta, tensors = load_safetensors_checked(
            path, _FORMAT, "SparseMask.load", "mask", _LEGACY_KEYS
        )
        try:
            order = json.loads(meta["order"])
            shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
            numel_total = int(meta["numel_total"])
            idx = {n: tensors.pop(f"idx/{n}") for n in order}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"SparseMask.load: {path}: malformed mask metadata or tensors ({exc!r})"
            ) from exc
        if tensors:
            raise ValueError(f"SparseMask.load: {path}: unexpected tensors {sorted(tensors)[:3]}")
        try:
            mask = cls(idx, shapes, numel_total)
        except ValueError as exc:
            raise ValueError(f"SparseMask.load: {path}: {exc}") from exc
        return mask.to(device) if torch.device(device).type != "cpu" else mask


@dataclass
class MaskSpec:
    """What ``SparseAdamW(mask=...)`` was given, in one form (:func:`mask_spec`).

    ``kind``: ``"dense"`` (``mask=None``), ``"pending"`` (the mask comes from the next
    ``load_state_dict``), ``"names"`` (keyed by parameter name: a :class:`SparseMask` or a
    mapping of str) or ``"params"`` (keyed by parameter tensor: ``mask.bind(model)``).
    """

    kind: str
    by_name: dict[str, Tensor] = field(default_factory=dict)
    by_param: dict[Tensor, Tensor] = field(default_factory=dict)
    param_names: dict[Tensor, str] = field(default_factory=dict)  # from bind(): for errors
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    numel_total: int | None = None


def mask_spec(mask: object, pending: bool = False) -> MaskSpec:
    """The three kinds of mask an optimizer takes, told apart once (see :class:`MaskSpec`);
    raises TypeError for anything else."""
    if mask is None:
        return MaskSpec("dense")
    if pending:
        return MaskSpec("pending")
    if isinstance(mask, SparseMask):
        return MaskSpec(
            "names",
            by_name=dict(mask.items()),
            shapes={n: mask.shape(n) for n in mask.names()},
            numel_total=mask.numel_total(),
        )
    if isinstance(mask, Mapping):
        keys = list(mask.keys())
        names = dict(getattr(mask, "param_names", {}))
        if all(isinstance(k, str) for k in keys):
            return MaskSpec("names", by_name=dict(mask), param_names=names)
        if all(isinstance(k, Tensor) for k in keys):
            return MaskSpec("params", by_param=dict(mask), param_names=names)
        raise TypeError(
            "mask must map parameter names (str) or parameter tensors to indices, not a mix"
        )
    raise TypeError(f"mask must be None, a SparseMask or a mapping, got {type(mask).__name__}")


class BoundMask(dict):
    """What :meth:`SparseMask.bind` returns: ``{param: indices}`` plus ``param_names``."""

    def __init__(self) -> None:
        super().__init__()
        self.param_names: dict[Tensor, str] = {}


# Renamings by wrappers, removed to compare names (see SparseMask.for_model):
# prefixes added to every name, and infixes added inside some names.
_WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
_WRAPPER_INFIXES = (".base_layer.",)


def canonical_name(name: str) -> str:
    """``name`` without the prefixes/infixes PEFT, DDP and torch.compile add."""
    changed = True
    while changed:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre) :], True
    for inf in _WRAPPER_INFIXES:
        name = name.replace(inf, ".")
    return name


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
