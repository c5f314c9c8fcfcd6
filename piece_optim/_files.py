"""Files piece_optim writes: atomic safetensors, a checksum in the metadata, clear errors.

Used by :class:`~piece_optim.SparseMask` (``save``/``load``) and the sparse deltas
(:mod:`piece_optim.delta`).
"""

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
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

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
