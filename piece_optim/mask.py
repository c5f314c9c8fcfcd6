"""SparseMask: which entries of which parameters are trained."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ._reference import index_dtype_for

_FORMAT = "piece_optim.SparseMask/1"
_LEGACY_KEYS = frozenset({"format", "numel_total", "shapes", "order"})  # before checksums


_UNSIGNED = tuple(
    getattr(torch, n) for n in ("uint8", "uint16", "uint32", "uint64") if hasattr(torch, n)
)


def validate_indices(idx: Tensor, numel: int, what: str) -> Tensor:
    """Check ``idx`` is a 1-D integer tensor of sorted unique indices into ``numel`` entries.

    Returns a new, private tensor of the canonical index dtype (int32, int64 for tensors
    of 2**31 entries or more), contiguous, on ``idx``'s device: never the caller's tensor,
    so editing the caller's tensor later cannot change (or push out of range) what the
    owner of the result indexes.  Any integer dtype is accepted, unsigned ones included
    (checked as int64: a difference of uint8 values wraps).  Raises ValueError naming
    ``what`` otherwise.
    """
    if not isinstance(idx, Tensor):
        idx = torch.as_tensor(idx)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{what}: indices must be an integer tensor, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{what}: indices must be 1-D flat indices, got shape {tuple(idx.shape)}")
    if idx.device.type == "meta":
        raise ValueError(f"{what}: indices are on the meta device (no values to check)")
    if idx.dtype in _UNSIGNED:
        # torch has no min/max/sub for uint16/32/64; uint64 above 2**63 turns negative
        # here, and the range check below refuses it
        idx = idx.to(torch.int64)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= numel:
            raise ValueError(
                f"{what}: index out of range [0, {numel}) (min {lo}, max {hi}); indices are "
                "flat positions into the parameter (param.view(-1))"
            )
        if idx.numel() > 1:
            d = idx[1:] - idx[:-1]
            if bool((d == 0).any()):
                raise ValueError(f"{what}: duplicated indices; pass sorted unique indices")
            if bool((d < 0).any()):
                raise ValueError(f"{what}: indices are not sorted; pass torch.sort(idx).values")
    return idx.to(index_dtype_for(numel), memory_format=torch.contiguous_format, copy=True)


def union_indices(a: Tensor, b: Tensor, numel: int) -> Tensor:
    """Sorted unique union of two index tensors into ``numel`` entries (canonical dtype)."""
    u = torch.unique(torch.cat([a.to(torch.int64), b.to(torch.int64).to(a.device)]))
    return u.to(index_dtype_for(numel)).contiguous()


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
        return SparseMask({n: i.to(device) for n, i in self._idx.items()}, self._shapes,
                          self._numel_total)  # fmt: skip

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


# -- files: atomic writes, checksums, clear errors ------------------------------------------
_CHECKSUM_KEY = "piece_optim.sha256"


def payload_sha256(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> str:
    """SHA-256 of a file's payload: every metadata entry but the checksum itself, and every
    tensor's name, dtype, shape and bytes, in name order (so a bit flip anywhere in them,
    or in the header that locates them, is caught)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted((k, v) for k, v in meta.items() if k != _CHECKSUM_KEY)).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def load_safetensors_checked(
    path: str | os.PathLike, fmt: str, what: str, kind: str, legacy_keys: frozenset[str]
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a piece_optim safetensors file of format ``fmt``.

    Every failure names ``path``: a missing file (FileNotFoundError), an empty, truncated
    or non-safetensors file, a safetensors file of another format, a checksum mismatch
    (ValueError).  Files written before checksums were stored (metadata keys exactly
    ``legacy_keys``) load with a warning (decision: they were valid when written and cannot
    be re-verified; the warning says to re-save them); a file with other keys but no
    checksum had its checksum entry damaged and is refused.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{what}: {path} is not a file")
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    if path.stat().st_size == 0:
        raise ValueError(
            f"{what}: {path} is empty (0 bytes), not a {kind} file; was the save "
            "interrupted before piece_optim wrote it atomically?"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise _WrongFormat(meta.get("format"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except _WrongFormat as exc:
        raise ValueError(
            f"{what}: {path} is a safetensors file but not a piece_optim {kind} file (format "
            f"{exc.args[0]!r}, expected {fmt!r})"
        ) from None
    except Exception as exc:  # SafetensorError, OSError, ...: not a readable safetensors file
        raise ValueError(
            f"{what}: cannot read {path} as a {kind} file: it is truncated, corrupted or not "
            f"a safetensors file ({type(exc).__name__}: {exc})"
        ) from exc
    stored = meta.get(_CHECKSUM_KEY)
    if stored is None and set(meta) != legacy_keys:
        raise ValueError(
            f"{what}: {path} is corrupted: its checksum entry is missing or damaged (metadata "
            f"keys {sorted(meta)})"
        )
    if stored is None:
        warnings.warn(
            f"{what}: {path} has no checksum (written by piece_optim before checksums were "
            "stored), so corruption cannot be detected; load and save it again to add one",
            UserWarning,
            stacklevel=3,
        )
    elif stored != payload_sha256(tensors, meta):
        raise ValueError(
            f"{what}: {path} is corrupted: the SHA-256 of its contents does not match the one "
            "stored when it was written (a changed byte, a bad copy or disk). Use a good copy"
        )
    return meta, tensors


class _WrongFormat(Exception):
    pass


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    """Write a safetensors file so that ``path`` only ever holds a complete file.

    The data go to a temporary file in the same folder (``.<name>.<host>.<pid>.<rand>.tmp``),
    which is fsynced and then renamed over ``path`` (and the folder fsynced): an
    exception, a KeyboardInterrupt, a SIGKILL or a power cut leaves the old file or the new
    one, never a mix.  The temporary file is removed on an exception; one left by a killed
    process is removed by the next save to the same path (when its process is gone).
    Permissions follow ``torch.save``: a new file gets ``0o666 & ~umask``, an overwritten
    one keeps its mode.  A SHA-256 of the payload is added to the metadata.
    """
    from safetensors.torch import save as serialize

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    meta = {**meta, _CHECKSUM_KEY: payload_sha256(tensors, meta)}
    # serialised here and written through our own descriptor: safetensors' save_file
    # writes its own temporary file (mode 0600, a name no later save can attribute)
    data = serialize(tensors, metadata=meta)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: a fresh file; mode 0o666 is filtered by the umask, as open(path, "wb") is
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            _write_payload(fd, data)
            os.fsync(fd)  # the data are on disk before the rename makes them the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_payload(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of earlier saves to ``path`` whose process is gone (killed
    mid-save); only this host's, since a pid means nothing on another machine."""
    prefix = f".{path.name}.{_HOST}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_part = name[len(prefix) :].split(".", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path.parent / name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or unknown): leave its file alone
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
