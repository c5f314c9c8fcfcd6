"""Tests for the benchmark harness, ``python -m benchmarks`` and ``benchmarks/gpu_check.sh``.

No timed assertions: timings are only checked for being positive and for the columns
derived from them (speedup, GB/s, fraction of copy bandwidth) matching their formulas.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import e2e, harness, micro
from benchmarks.__main__ import main as bench_main
from piece_optim.cli import main as cli_main

pytestmark = pytest.mark.cpu_only("the benchmark CSV/script checks run at toy sizes on CPU")

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
# The CSV keeps 6 significant digits (harness._fmt): a value read back is within 5e-6
# relative of the one computed, so a ratio of two read-back values is within ~1e-5.
CSV_RTOL = 2e-5


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _timing(rng: random.Random, n: int = 5) -> object:
    samples = [rng.uniform(0.1, 10.0) for _ in range(n)]
    return harness.Timing(harness.median(samples), harness.iqr(samples), tuple(samples))


def _prov() -> dict[str, str]:
    return harness.provenance("cpu")


# -- statistics -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 8, 101])
def test_median_and_iqr_match_numpy(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    xs = rng.exponential(3.0, size=n).tolist()
    assert harness.median(xs) == pytest.approx(float(np.median(xs)), rel=1e-12)
    q75, q25 = np.percentile(xs, [75, 25])
    assert harness.iqr(xs) == pytest.approx(float(q75 - q25), rel=1e-12, abs=1e-12)
    if n == 1:
        assert harness.iqr(xs) == 0.0


def test_median_iqr_reject_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        harness.median([])
    with pytest.raises(ValueError, match="empty"):
        harness.iqr([])


def test_time_fn_counts_calls_and_runs_setup() -> None:
    calls = {"fn": 0, "setup": 0}

    def fn() -> None:
        calls["fn"] += 1

    def setup() -> None:
        calls["setup"] += 1

    t = harness.time_fn(fn, warmup=2, repeats=3, setup=setup, min_time_s=0.0)
    assert len(t.samples_ms) == 3
    assert calls == {"fn": 5, "setup": 5}
    assert t.median_ms == harness.median(t.samples_ms)
    assert t.spread_ms == harness.iqr(t.samples_ms)
    # a fast call repeats until min_time_s or max_repeats, whichever comes first
    t = harness.time_fn(fn, warmup=0, repeats=2, min_time_s=1e6, max_repeats=17)
    assert len(t.samples_ms) == 17
    with pytest.raises(ValueError, match="repeats"):
        harness.time_fn(fn, repeats=0)


# -- rows and the CSV -------------------------------------------------------------------
def test_make_row_derives_columns(seed: int) -> None:
    rng = random.Random(seed)
    t, b = _timing(rng), _timing(rng)
    n = rng.randint(1000, 10**7)
    copy = rng.uniform(1.0, 100.0)
    row = harness.make_row(
        "step",
        "torch",
        t,
        prov=_prov(),
        n=n,
        k=n // 1000 + 1,
        ratio=1e-3,
        baseline="AdamW",
        baseline_timing=b,
        bytes_moved=32 * n,
        copy_gbps=copy,
        model={"hidden": 7},
        phase="step",
    )
    assert list(row) == list(harness.COLUMNS)
    assert row["speedup"] == pytest.approx(b.median_ms / t.median_ms, rel=1e-12)
    gbps = 32 * n / (t.median_ms * 1e-3) / 1e9
    assert row["gbps"] == pytest.approx(gbps, rel=1e-12)
    assert row["frac_of_copy"] == pytest.approx(gbps / copy, rel=1e-12)
    assert row["phase"] == "step"
    assert json.loads(row["extra"]) == {"model": {"hidden": 7}}
    for c in ("device", "torch", "triton", "commit", "timestamp"):
        assert row[c], c


def test_commit_is_the_repo_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIECE_OPTIM_COMMIT", raising=False)
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    commit = harness.git_commit()
    if head.returncode == 0:
        assert commit.split("+")[0] == head.stdout.strip()
    else:
        assert commit == "unknown"


def test_commit_unknown_outside_a_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIECE_OPTIM_COMMIT", raising=False)
    assert harness.git_commit(tmp_path) == "unknown"


def test_commit_named_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree copied to a GPU machine may carry a stale .git: the named commit wins."""
    monkeypatch.setenv("PIECE_OPTIM_COMMIT", "c5a5dd1")
    assert harness.git_commit() == "c5a5dd1 (env)"


def test_append_rows_header_once_and_roundtrip(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "sub" / "bench.csv"
    prov = _prov()
    first = [
        harness.make_row("accumulate", "torch", _timing(rng), prov=prov, n=rng.randint(1, 99))
        for _ in range(3)
    ]
    second = [harness.make_row("copy", "torch", _timing(rng), prov=prov, n=7)]
    assert harness.append_rows(path, first) == 3
    assert harness.append_rows(path, second) == 1
    text = path.read_text()
    assert text.count("benchmark,backend,") == 1
    header, rows = _rows(path)
    assert header == list(harness.COLUMNS)
    assert len(rows) == 4
    for src, got in zip(first + second, rows, strict=True):
        assert got["benchmark"] == src["benchmark"]
        assert int(got["n"]) == src["n"]
        assert float(got["time_ms"]) == pytest.approx(src["time_ms"], rel=CSV_RTOL)
    assert not list(path.parent.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_append_rows_refuses_bad_header_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "bench.csv"
    path.write_text("a,b,c\n1,2,3\n")
    row = harness.make_row("copy", "torch", harness.Timing(1.0, 0.0, (1.0,)), prov=_prov())
    with pytest.raises(ValueError, match="different header"):
        harness.append_rows(path, [row])
    assert path.read_text() == "a,b,c\n1,2,3\n"
    with pytest.raises(ValueError, match="outside the CSV header"):
        harness.append_rows(tmp_path / "new.csv", [{**row, "bogus": 1}])


def test_append_rows_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bench.csv"
    row = harness.make_row("copy", "torch", harness.Timing(2.0, 0.5, (2.0,)), prov=_prov(), n=3)
    harness.append_rows(path, [row])
    before = path.read_text()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(harness.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        harness.append_rows(path, [row] * 5)
    assert path.read_text() == before
    assert not list(tmp_path.glob("*.tmp"))


def _writer(path: str, tag: int, count: int) -> None:
    prov = harness.provenance("cpu")
    for i in range(count):
        row = harness.make_row(
            f"w{tag}", "torch", harness.Timing(1.0 + i, 0.0, (1.0,)), prov=prov, n=i
        )
        harness.append_rows(path, [row, row])


def test_append_rows_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "bench.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), t, 10)) for t in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    header, rows = _rows(path)
    assert header == list(harness.COLUMNS)
    assert len(rows) == 4 * 10 * 2
    assert [f.name for f in tmp_path.iterdir()] == ["bench.csv"]  # no temp or lock files
    for t in range(4):
        mine = [int(r["n"]) for r in rows if r["benchmark"] == f"w{t}"]
        # each call's two rows are adjacent and each writer's calls stay in order
        assert mine == [i for i in range(10) for _ in range(2)]


# -- the memory hook --------------------------------------------------------------------
def test_memory_rows_absent_and_present(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "benchmarks.memory", None)
    assert e2e.memory_rows(True) == []
    assert "skipping the memory rows" in capsys.readouterr().out

    class Fake:
        @staticmethod
        def run(quick: bool) -> list[dict]:
            return [
                {
                    "benchmark": "memory",
                    "backend": "SparseAdamW",
                    "phase": "step",
                    "peak_mem_mib": 12.5,
                    "quick": quick,
                    "peak_bytes": 13107200,
                }
            ]

    monkeypatch.setitem(sys.modules, "benchmarks.memory", Fake)
    (row,) = e2e.memory_rows(True)
    assert list(row) == list(harness.COLUMNS)
    assert (row["phase"], row["peak_mem_mib"]) == ("step", 12.5)
    assert json.loads(row["extra"]) == {"quick": True, "peak_bytes": 13107200}
    assert row["device"] and row["commit"] and row["timestamp"]

    class LikeMemoryPy:  # the row shape benchmarks/memory.py returns
        @staticmethod
        def run(quick: bool) -> list[dict]:
            return [
                {"bench": "memory", "phase": "adamw", "peak_growth_mib": 40.0, "torch": "x"},
                {"bench": "memory", "phase": "overlap", "k": 3},
            ]

    monkeypatch.setitem(sys.modules, "benchmarks.memory", LikeMemoryPy)
    first, second = e2e.memory_rows(False)
    assert (first["benchmark"], first["phase"], first["peak_mem_mib"]) == ("memory", "adamw", 40.0)
    assert first["torch"] == "x"  # the module's own provenance wins over ours
    assert json.loads(first["extra"]) == {"bench": "memory", "peak_growth_mib": 40.0}
    assert (second["benchmark"], second["k"], second["peak_mem_mib"]) == ("memory", 3, "")


# -- python -m benchmarks ---------------------------------------------------------------
def test_bench_quick_writes_rows_and_plots(tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setenv("PIECE_OPTIM_BENCH_TINY", "1")
    out = tmp_path / "out"
    # PIECE_OPTIM_BACKEND=cuda (or native triton) names a backend that cannot take CPU
    # tensors: then the bench runs on the GPU, or, without one, must refuse clearly.
    device = "cpu" if micro.backends_to_run("cpu") else "cuda"
    args = ["--quick", "--threads", "0", "--device", device, "--out", str(out)]
    if device == "cuda" and not torch.cuda.is_available():
        assert bench_main(args) == 2
        return
    assert bench_main(args) == 0
    header, rows = _rows(out / "bench.csv")
    assert header == list(harness.COLUMNS)
    assert len(rows) >= 6
    backends = set(micro.backends_to_run(device))
    assert backends and {r["backend"] for r in rows if r["benchmark"] != "copy"} >= backends
    kinds = {r["benchmark"] for r in rows}
    assert {"copy", "accumulate", "step", "select", "compaction", "e2e_train_step"} <= kinds
    for r in rows:
        assert float(r["time_ms"]) > 0
        for c in ("device", "torch", "triton", "commit", "timestamp"):
            assert r[c], (c, r)
        if r["baseline"]:
            ratio = float(r["baseline_ms"]) / float(r["time_ms"])
            assert float(r["speedup"]) == pytest.approx(ratio, rel=CSV_RTOL)
        if r["ratio"]:
            assert int(r["k"]) == max(1, int(float(r["ratio"]) * int(r["n"])))
        if r["benchmark"] == "step":
            gbps = 32 * int(r["k"]) / (float(r["time_ms"]) * 1e-3) / 1e9
            assert float(r["gbps"]) == pytest.approx(gbps, rel=CSV_RTOL)
            assert float(r["frac_of_copy"]) == pytest.approx(
                float(r["gbps"]) / float(r["copy_gbps"]), rel=CSV_RTOL
            )
        if r["benchmark"] == "e2e_train_step":
            assert r["throughput_unit"] == "tokens/s"
            assert float(r["throughput"]) > 0
    if _has_matplotlib():
        for png in ("time_vs_n.png", "e2e_throughput.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_piece_optim_bench_says_where_the_benchmarks_went(capsys) -> None:
    """The installed package never imports benchmarks/: its old subcommand points there."""
    assert cli_main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "moved" in err and "python -m benchmarks" in err and "source checkout" in err


def test_bench_rejects_conflicting_flags(tmp_path: Path, capsys) -> None:
    assert bench_main(["--quick", "--max-n", "1000000000", "--out", str(tmp_path)]) == 2
    assert "--max-n" in capsys.readouterr().err
    assert bench_main(["--no-e2e", "--memory", "--out", str(tmp_path)]) == 2
    assert "--memory" in capsys.readouterr().err
    assert bench_main(["--quick", "--threads", "-1", "--out", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err
    assert not (tmp_path / "bench.csv").exists()


def test_bench_rejects_cuda_without_gpu(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    assert bench_main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no GPU" in capsys.readouterr().err


# -- gpu_check.sh -----------------------------------------------------------------------
def _gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    full_env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(GPU_CHECK), *args], capture_output=True, text=True, env=full_env, timeout=240
    )


def test_gpu_check_syntax() -> None:
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    assert os.access(GPU_CHECK, os.X_OK)


def test_gpu_check_arguments() -> None:
    r = _gpu_check("--help")
    assert r.returncode == 0
    for word in (
        "--out",
        "--max-n",
        "--budget",
        "--skip-bench",
        "--dry-run",
        "390 s",
        "summary.txt",
    ):
        assert word in r.stdout
    assert "set -uo" not in r.stdout
    for bad, msg in (
        (["--bogus"], "unknown argument"),
        (["--out"], "needs a folder"),
        (["--max-n"], "needs a number"),
        (["--max-n", "abc"], "not a number"),
        (["--max-n", "1000"], ">= 1e6"),
        (["--budget"], "needs seconds"),
        (["--budget", "5m"], "whole seconds"),
    ):
        r = _gpu_check(*bad)
        assert r.returncode == 2, bad
        assert msg in r.stderr, (bad, r.stderr)


def test_gpu_check_no_budget_skips_every_stage(tmp_path: Path) -> None:
    """Stages that cannot finish inside the budget are skipped, recorded, and fail the run."""
    out = tmp_path / "gpu"
    r = _gpu_check("--dry-run", "--budget", "0", "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln.split() for ln in (out / "summary.txt").read_text().splitlines() if ln.strip()]
    stages = [ln for ln in lines if len(ln) == 3 and ln[1].startswith("skipped")]
    assert [s[0] for s in stages] == GPU_STAGES
    assert all(s[1] == "skipped(no-time)" for s in stages)


def test_gpu_check_skip_bench_stops_after_the_tests(tmp_path: Path) -> None:
    """--skip-bench (a short device lease): the bench stages are recorded as skipped, not
    run, and do not fail the run (budget 0 skips the others, so this takes no time)."""
    out = tmp_path / "gpu"
    r = _gpu_check("--dry-run", "--budget", "0", "--skip-bench", "--out", str(out))
    summary = (out / "summary.txt").read_text()
    stages = [ln.split()[0] for ln in summary.splitlines() if ln and not ln.startswith(" ")]
    assert "bench skipped(--skip-bench) 0s" in summary, summary
    assert not [s for s in stages if s.startswith("bench-")], summary
    assert r.returncode == 1  # the other stages were skipped for time: that still fails


GPU_STAGES = [
    "env",
    "build",
    "backends",
    "tests-cuda",
    "tests-triton",
    "bench-select",
    "bench-step",
    "bench-memory",
]


def test_gpu_check_dry_run_writes_csv(tmp_path: Path) -> None:
    """The whole script on CPU: every stage, the GPU test selection, the benchmarks at toy
    sizes, the CSV and the summary tables.  About a minute on the 2 shared CI cores, and
    independent of the backend stage (it fixes PIECE_OPTIM_BACKEND itself), so it runs in
    the backend=auto stage of scripts/test.sh only."""
    if os.environ.get("PIECE_OPTIM_BACKEND"):
        pytest.skip("backend-independent: runs in the PIECE_OPTIM_BACKEND-unset stage")
    out = tmp_path / "gpu"
    # The script is under test, not the backends (test_bench_quick covers those): the
    # reference backend keeps this fast.
    r = _gpu_check("--dry-run", "--max-n=2e6", "--out", str(out), PIECE_OPTIM_BACKEND="torch")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    lines = [ln.split() for ln in summary.splitlines() if ln.strip()]
    assert [ln[:2] for ln in lines if ln[0] in GPU_STAGES] == [[s, "pass"] for s in GPU_STAGES]
    # the GPU selection: device-aware tests kept, cpu_only ones deselected, both counted
    for be in ("cuda", "triton"):
        (count,) = [ln for ln in summary.splitlines() if ln.startswith(f"  tests-{be}:")]
        assert "deselected" in count and "tests collected" in count, count
    log = (out / "gpu_check.log").read_text()
    assert "max_n=2000000" in log and "--sizes 2000000" in log
    assert "arch 9.0" in log  # the build stage's dry run: PIECE_CUDA_ARCH_LIST is honoured
    header, rows = _rows(out / "bench.csv")
    assert header == list(harness.COLUMNS)
    kinds = {r["benchmark"] for r in rows}
    assert kinds == {
        "gpu_copy",
        "gpu_accumulate",
        "gpu_select",
        "gpu_collect",
        "gpu_est_select",
        "gpu_dense_adamw",
        "gpu_step",
        "gpu_opt_step",
        "gpu_memory",
    }
    for r in rows:
        assert float(r["time_ms"]) > 0 and r["commit"] and r["timestamp"], r
        assert {"driver", "cuda", "dtype"} <= set(json.loads(r["extra"])), r
        if r["baseline"]:
            ratio = float(r["baseline_ms"]) / float(r["time_ms"])
            assert float(r["speedup"]) == pytest.approx(ratio, rel=CSV_RTOL)
        if r["benchmark"] == "gpu_select":
            assert json.loads(r["extra"])["check"] == "ok"  # the same k-th value as topk
    phases = [r["phase"] for r in rows if r["benchmark"] == "gpu_memory"]
    assert phases == ["adamw", "estimate", "sparse"]
    for title in ("| N | sums | backend |", "| N | params | backend |", "| phase | backend |"):
        assert title in summary, title


def test_plot_memory_bars_and_latest_rows(tmp_path: Path, seed: int) -> None:
    if not _has_matplotlib():
        pytest.skip("matplotlib is an optional extra")
    from benchmarks import plot

    rng = random.Random(seed)
    prov = _prov()
    path = tmp_path / "bench.csv"
    for run in range(2):  # the second run's rows must replace the first's
        rows = [
            harness.normalize_row(
                {
                    "benchmark": "memory",
                    "backend": opt,
                    "phase": ph,
                    "peak_mem_mib": rng.uniform(1, 100) + run,
                },
                prov,
            )
            for opt in ("AdamW", "SparseAdamW")
            for ph in ("estimate", "train")
        ]
        harness.append_rows(path, rows)
    kept = plot.latest(harness.read_rows(path))
    assert len(kept) == 4
    assert kept == harness.read_rows(path)[4:]
    (png,) = plot.plot_csv(path, tmp_path / "png")
    assert png.name == "memory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
