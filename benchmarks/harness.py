"""The one benchmark harness: timing, provenance and CSV rows.

Every benchmark in this folder times a callable with :func:`time_fn` (warm-up calls, then
``repeats`` timed calls, each synchronised on CUDA), turns the result into a row with
:func:`make_row` and appends rows with :func:`append_rows`.  A row always carries the
baseline measured *in the same run* (``baseline``, ``baseline_ms``, ``speedup`` =
``baseline_ms / time_ms``) and the provenance needed to trust it later: device name,
torch and triton versions, git commit and a UTC timestamp.

Design decisions
----------------
* **Median and IQR**, not mean and std: the machines we run on are shared (this repo's
  CI box is 2 cores serving 7 processes), so a single descheduled repeat can double a
  mean; the median ignores it and the interquartile range reports how noisy the run was.
* **Bytes moved -> GB/s, against measured copy bandwidth.**  Each row states the bytes a
  kernel must move at least (``gbps``) and the machine's own ``tensor.copy_`` bandwidth
  measured in the same run (``copy_gbps``); ``frac_of_copy`` is how close the kernel is to
  that floor, which is the number that says whether a kernel has headroom.
* **Atomic CSV append with a fixed header.**  Rows are appended under an exclusive lock
  (``flock`` on the CSV's folder: no stray lock file), by writing the old content plus
  the new rows to a temporary file and ``os.replace``-ing it: a reader never sees half a
  row, two writers never interleave, and a crash leaves the old file intact.  A CSV
  whose header differs from :data:`COLUMNS` is refused rather than silently misaligned.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; on other platforms the replace alone is still atomic
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import torch

COLUMNS: tuple[str, ...] = (
    "benchmark",
    "backend",
    "n",
    "k",
    "ratio",
    "time_ms",
    "spread_ms",
    "baseline",
    "baseline_ms",
    "speedup",
    "gbps",
    "copy_gbps",
    "frac_of_copy",
    "throughput",
    "throughput_unit",
    "phase",
    "peak_mem_mib",
    "extra",
    "device",
    "torch",
    "triton",
    "commit",
    "timestamp",
)
"""The CSV header, in order.  ``throughput``/``throughput_unit`` carry end-to-end rates
(e.g. tokens/s), ``phase``/``peak_mem_mib`` the memory benchmark, ``extra`` a JSON object
of any other key a benchmark reported."""

REPO = Path(__file__).resolve().parents[1]


# -- statistics -------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not xs:
        raise ValueError("median() of an empty sequence: time at least one repeat")
    return float(statistics.median(xs))


def iqr(xs: Sequence[float]) -> float:
    """Interquartile range (Q3 - Q1), quartiles by linear interpolation (numpy's default).

    Zero for a single sample: one repeat says nothing about spread.
    """
    if not xs:
        raise ValueError("iqr() of an empty sequence: time at least one repeat")
    s = sorted(float(x) for x in xs)
    return _quantile(s, 0.75) - _quantile(s, 0.25)


def _quantile(s: Sequence[float], q: float) -> float:
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Result of :func:`time_fn`, in milliseconds."""

    median_ms: float
    spread_ms: float
    samples_ms: tuple[float, ...]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str | None = None,
    setup: Callable[[], Any] | None = None,
    min_time_s: float = 0.05,
    max_repeats: int = 100,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed ones.

    Fast calls repeat until ``min_time_s`` of timed work (at most ``max_repeats`` calls):
    on a shared machine a sub-millisecond kernel needs tens of samples before its median
    stops moving, while one 300 ms call is already long enough that 5 samples do.

    ``setup`` (untimed) runs before every call, e.g. to restore state an in-place kernel
    changed.  On CUDA the device is synchronised before and after each timed call, so the
    time covers the kernels, not just their launch.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    dev = torch.device(device) if device is not None else None
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    _sync(dev)
    samples: list[float] = []
    while len(samples) < repeats or (
        sum(samples) < min_time_s * 1e3 and len(samples) < max(max_repeats, repeats)
    ):
        if setup is not None:
            setup()
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(median(samples), iqr(samples), tuple(samples))


def time_device(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str | None = None,
    setup: Callable[[], Any] | None = None,
    min_time_s: float = 0.1,
    max_repeats: int = 50,
) -> Timing:
    """Like :func:`time_fn`, but on CUDA each call is timed with a pair of CUDA events.

    Events time the GPU work itself, without the host's synchronise-and-wake-up latency
    (tens of microseconds) that :func:`time_fn` adds to every sample: that latency is as
    large as a 1M-entry sparse AdamW step.  ``setup`` (untimed) runs before each call,
    outside the events.  All events are read after one final synchronisation.  On other
    devices this is :func:`time_fn`.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return time_fn(
            fn,
            warmup=warmup,
            repeats=repeats,
            device=dev,
            setup=setup,
            min_time_s=min_time_s,
            max_repeats=max_repeats,
        )
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    torch.cuda.synchronize(dev)
    pairs: list[tuple[Any, Any]] = []
    spent = 0.0
    while len(pairs) < repeats or (spent < min_time_s * 1e3 and len(pairs) < max_repeats):
        if setup is not None:
            setup()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
        if len(pairs) >= repeats:  # read the clock only to decide whether to go on
            end.synchronize()
            spent = sum(s.elapsed_time(e) for s, e in pairs)
    torch.cuda.synchronize(dev)
    samples = [s.elapsed_time(e) for s, e in pairs]
    return Timing(median(samples), iqr(samples), tuple(samples))


# -- provenance -------------------------------------------------------------------------
def device_name(device: torch.device | str = "cpu") -> str:
    """GPU name for CUDA devices; the CPU model name (plus core count) otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores, {platform.machine()})"


def git_commit(repo: Path = REPO) -> str:
    """Short commit hash of the repo (``+dirty`` if it has local changes), or "unknown".

    ``PIECE_OPTIM_COMMIT``, when set, names the commit instead (marked ``(env)``) and wins
    over git: a copy of the tree sent to a GPU machine may carry no ``.git``, or a stale
    one (runs 2 and 3 of docs/gpu.md did).
    """
    named = os.environ.get("PIECE_OPTIM_COMMIT", "").strip()
    if named:
        return f"{named} (env)"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = rev.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not installed"
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def provenance(device: torch.device | str = "cpu") -> dict[str, str]:
    """The provenance columns, computed once per run."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# -- rows -------------------------------------------------------------------------------
def make_row(
    benchmark: str,
    backend: str,
    timing: Timing,
    *,
    prov: Mapping[str, str],
    n: int | None = None,
    k: int | None = None,
    ratio: float | None = None,
    baseline: str = "",
    baseline_timing: Timing | None = None,
    bytes_moved: float | None = None,
    copy_gbps: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One CSV row; ``speedup``, ``gbps`` and ``frac_of_copy`` are derived here.

    Keyword arguments that name a column (``throughput``, ``phase``...) fill it; any other
    goes into the ``extra`` JSON column.
    """
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(
        benchmark=benchmark, backend=backend, time_ms=timing.median_ms, spread_ms=timing.spread_ms
    )
    if n is not None:
        row["n"] = int(n)
    if k is not None:
        row["k"] = int(k)
    if ratio is not None:
        row["ratio"] = float(ratio)
    if baseline_timing is not None:
        row["baseline"] = baseline
        row["baseline_ms"] = baseline_timing.median_ms
        if timing.median_ms > 0:
            row["speedup"] = baseline_timing.median_ms / timing.median_ms
    if bytes_moved is not None and timing.median_ms > 0:
        row["gbps"] = bytes_moved / (timing.median_ms * 1e-3) / 1e9
        if copy_gbps:
            row["copy_gbps"] = copy_gbps
            row["frac_of_copy"] = row["gbps"] / copy_gbps
    elif copy_gbps:
        row["copy_gbps"] = copy_gbps
    rest = {}
    for key, value in extra.items():
        if key in COLUMNS:
            row[key] = value
        else:
            rest[key] = value
    if rest:
        row["extra"] = json.dumps(rest, sort_keys=True, default=str)
    row.update({c: prov[c] for c in ("device", "torch", "triton", "commit", "timestamp")})
    return row


def normalize_row(row: Mapping[str, Any], prov: Mapping[str, str]) -> dict[str, Any]:
    """Fit a row from another module (e.g. ``memory.run``) into :data:`COLUMNS`.

    Known columns are copied, missing provenance is filled from ``prov``, and every other
    key lands in ``extra`` (never dropped silently).
    """
    out: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    rest = {}
    for key, value in row.items():
        if key in COLUMNS and key != "extra":
            out[key] = value
        else:
            rest[key] = value
    if rest:
        out["extra"] = json.dumps(rest, sort_keys=True, default=str)
    for c in ("device", "torch", "triton", "commit", "timestamp"):
        if out[c] in ("", None):
            out[c] = prov[c]
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append ``rows`` to the CSV at ``path`` atomically; write the header if it is new.

    Returns the number of rows written.  Raises ``ValueError`` if the file exists with a
    different header, or a row has a key outside :data:`COLUMNS`.
    """
    path = Path(path)
    rows = list(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="raise")
    for r in rows:
        unknown = set(r) - set(COLUMNS)
        if unknown:
            raise ValueError(
                f"row has columns {sorted(unknown)} outside the CSV header; pass them through "
                "make_row(...) or normalize_row(...) so they land in 'extra'"
            )
        writer.writerow({c: _fmt(r.get(c)) for c in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Lock the folder, not the CSV: os.replace swaps the CSV's inode, so a lock held on the
    # old file would not exclude a writer that opened the new one.
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text() if path.exists() else ""
        header = ",".join(COLUMNS) + "\n"
        if old:
            first = old.split("\n", 1)[0] + "\n"
            if first != header:
                raise ValueError(
                    f"{path} has a different header ({first.strip()[:80]}...); write to a "
                    "new file or move the old one away"
                )
            if not old.endswith("\n"):
                old += "\n"
        else:
            old = header
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep a CSV's usual mode
            with os.fdopen(fd, "w") as f:
                f.write(old + buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    finally:
        os.close(lock)  # releases the flock
    return len(rows)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a harness CSV, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def measure_copy(
    n: int, device: torch.device | str = "cpu", *, repeats: int = 5
) -> tuple[Timing, float]:
    """Time ``dst.copy_(src)`` for ``n`` fp32; returns the timing and its GB/s (read + write)."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)
    return t, 2 * 4 * n / (t.median_ms * 1e-3) / 1e9


def copy_bandwidth(n: int, device: torch.device | str = "cpu", *, repeats: int = 5) -> float:
    """Measured copy bandwidth in GB/s for ``n`` fp32 elements (see :func:`measure_copy`)."""
    return measure_copy(n, device, repeats=repeats)[1]
