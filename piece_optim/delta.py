"""Sparse deltas: one task's update as a small safetensors file of indices and values.

A PIECE (or any sparse) fine-tune changes a few entries of a few tensors.  ``save_delta``
stores, per changed parameter, the sorted flat indices of the changed entries and their
values before and after, so that

* ``apply_delta(model, path)`` turns the base model into the fine-tuned one, and
* ``revert_delta(model, path)`` turns it back,

both bit-exactly: values are stored, not differences, because ``before + (after -
before)`` is not always ``after`` in floating point.  Storing both sides costs one extra
value per entry and lets apply/revert check that the model they change is the one the
delta was made for (``strict=True``), instead of silently corrupting another model.

File layout (format ``piece_optim.SparseDelta/1``): tensors ``idx/<name>`` (int32, int64
for tensors of 2**31 entries or more), ``old/<name>`` and ``new/<name>`` (the parameter's
dtype); metadata holds the format, the parameter order and shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ._files import atomic_save_safetensors, load_safetensors_checked
from ._indices import index_dtype_for, validate_indices
from .mask import SparseMask

_FORMAT = "piece_optim.SparseDelta/1"

__all__ = ["apply_delta", "load_delta", "revert_delta", "save_delta"]


def _state_of(obj: nn.Module | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        return {n: p.detach() for n, p in obj.named_parameters()}
    if isinstance(obj, Mapping):
        for n, t in obj.items():
            if not isinstance(n, str) or not isinstance(t, Tensor):
                raise TypeError(f"{what}: a state dict must map str names to tensors")
        return dict(obj)
    raise TypeError(
        f"{what} must be an nn.Module or a {{name: tensor}} state dict, got {type(obj).__name__}"
    )


def save_delta(
    base: nn.Module | Mapping[str, Tensor],
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    mask: SparseMask | Mapping[str, Tensor] | None = None,
) -> dict[str, int]:
    """Write the entries where ``model`` differs from ``base`` to ``path`` (safetensors).

    Args:
        base: the model before the update, or its state dict (e.g. a copy of
            ``{n: p.detach().clone() for n, p in model.named_parameters()}`` taken before
            training).
        model: the model after the update (or its state dict); same names and shapes.
        path: the file to write (atomically: a temp file renamed into place).
        mask: if given, store exactly these entries (e.g. the PIECE mask, so the file
            records the full selection even where an update happened to be zero);
            otherwise the changed entries are found by comparing values (a bit-level
            comparison: ``-0.0`` vs ``0.0`` and NaN payloads count as changes).

    Returns ``{"entries": number stored, "bytes": file size}``.
    """
    before = _state_of(base, "base")
    after = _state_of(model, "model")
    missing = [n for n in after if n not in before]
    if missing:
        raise ValueError(
            f"save_delta: base has no parameter {missing[0]!r}; pass the same model before "
            "and after the update"
        )
    if mask is not None:
        unknown = [n for n in mask if n not in after]
        if unknown:
            raise ValueError(f"save_delta: mask names {unknown[0]!r}, which the model lacks")
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    entries = 0
    for name, new in after.items():
        old = before[name]
        if tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
            raise ValueError(
                f"save_delta: parameter {name!r} is {tuple(old.shape)}/{old.dtype} in base and "
                f"{tuple(new.shape)}/{new.dtype} in model"
            )
        o, n = old.reshape(-1).cpu(), new.reshape(-1).cpu()
        if mask is not None:
            if name not in mask:
                continue
            idx = validate_indices(mask[name], n.numel(), f"save_delta mask[{name!r}]").long()
        else:
            if o.dtype.is_floating_point:
                changed = o.view(_int_view(o.dtype)) != n.view(_int_view(o.dtype))
            else:
                changed = o != n
            idx = changed.nonzero().view(-1)
        if idx.numel() == 0:
            continue
        tensors[f"idx/{name}"] = idx.to(index_dtype_for(n.numel())).contiguous()
        tensors[f"old/{name}"] = o[idx].contiguous()
        tensors[f"new/{name}"] = n[idx].contiguous()
        shapes[name] = list(new.shape)
        entries += idx.numel()
    meta = {"format": _FORMAT, "order": json.dumps(list(shapes)), "shapes": json.dumps(shapes)}
    atomic_save_safetensors(tensors, Path(path), meta)
    return {"entries": entries, "bytes": Path(path).stat().st_size}


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def load_delta(path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """``{name: {"idx", "old", "new", "shape"}}`` from a file written by :func:`save_delta`.

    Errors name the path: a missing file (FileNotFoundError), an empty, truncated or
    corrupted one (its SHA-256 is checked), another format (ValueError).
    """
    meta, tensors = load_safetensors_checked(
        path, _FORMAT, "load_delta", "sparse delta", frozenset({"format", "order", "shapes"})
    )
    try:
        order = json.loads(meta["order"])
        shapes = json.loads(meta["shapes"])
        out = {n: {k: tensors.pop(f"{k}/{n}") for k in ("idx", "old", "new")} for n in order}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"load_delta: {path}: malformed delta metadata or tensors ({exc!r})"
        ) from exc
    if tensors:
        raise ValueError(f"load_delta: {path}: unexpected tensors {sorted(tensors)[:3]}")
    for n, d in out.items():
        try:
            numel = 1
            for s in shapes[n]:
                numel *= int(s)
            d["idx"] = validate_indices(d["idx"], numel, f"delta[{n!r}]")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"load_delta: {path}: {exc}") from exc
        if not d["old"].numel() == d["new"].numel() == d["idx"].numel():
            raise ValueError(f"load_delta: {path}: entry {n!r} has mismatched lengths")
        d["shape"] = torch.tensor(shapes[n], dtype=torch.long)
    return out


def _write(model: nn.Module, path: str | os.PathLike, src: str, dst: str, strict: bool) -> int:
    """Write the delta's ``dst`` values into ``model``: all of them or, on any error, none.

    Everything is checked first (names, shapes, dtypes, the ``src`` values when strict);
    then each parameter's current values at the delta's entries are kept and the writes
    happen; if one fails (e.g. out of memory on a device), those already written are put
    back before the error propagates.  Non-contiguous parameters are written in place
    through their multi-dimensional indices.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    delta = load_delta(path)
    params = dict(model.named_parameters())
    plan = []
    for name, d in delta.items():  # validate everything before changing anything
        if name not in params:
            raise KeyError(f"the delta names parameter {name!r}, which the model lacks")
        p = params[name]
        if list(p.shape) != d["shape"].tolist() or p.dtype != d[dst].dtype:
            raise ValueError(
                f"parameter {name!r} is {tuple(p.shape)}/{p.dtype}; the delta was made for "
                f"{tuple(d['shape'].tolist())}/{d[dst].dtype}"
            )
        if p.device.type == "meta":
            raise ValueError(f"parameter {name!r} is on the meta device: it has no values")
        target, where = _positions(p.detach(), d["idx"].long().to(p.device))
        cur = target[where]  # a copy: the values to put back if a later write fails
        if strict:
            cur_cpu = cur.cpu()
            iv = _int_view(cur_cpu.dtype) if cur_cpu.dtype.is_floating_point else cur_cpu.dtype
            if not torch.equal(cur_cpu.view(iv), d[src].view(iv)):
                state = "base" if src == "old" else "fine-tuned"
                raise ValueError(
                    f"parameter {name!r} does not hold the delta's {state} values: the delta "
                    "was made for another model (or was already applied/reverted); pass "
                    "strict=False to write anyway"
                )
        plan.append((target, where, d[dst].to(p.device), cur))
    n = 0
    done = []
    with torch.no_grad():
        try:
            for target, where, values, cur in plan:
                target[where] = values
                done.append((target, where, cur))
                n += values.numel()
        except BaseException:
            for target, where, cur in reversed(done):
                target[where] = cur
            raise
    return n


def _positions(t: Tensor, flat_idx: Tensor) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """``(view, index)`` such that ``view[index]`` are the flat positions ``flat_idx`` of
    ``t`` (row-major, as ``t.reshape(-1)``), writable in place even when ``t`` is not
    contiguous (then through its multi-dimensional indices)."""
    if t.is_contiguous():
        return t.view(-1), flat_idx
    return t, torch.unravel_index(flat_idx, t.shape)


def apply_delta(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> int:
    """Write the delta's fine-tuned values into ``model`` in place; returns entries written.

    ``strict=True`` first checks that the model holds the base values at those entries.
    """
    return _write(model, path, "old", "new", strict)


def revert_delta(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> int:
    """Write the delta's base values back into ``model`` in place; returns entries written.

    ``strict=True`` first checks that the model holds the fine-tuned values there.
    """
    return _write(model, path, "new", "old", strict)
