"""The test suite's own options (conftest.py): --seed reruns the seeded tests with one
seed, --seeds N sweeps them over N fresh seeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TARGET = "test_demo.py::test_op_bwt_matches_trace_definition"

pytestmark = pytest.mark.cpu_only("runs pytest itself on a CPU test")


@pytest.fixture(autouse=True)
def _once_per_suite() -> None:
    """Backend-independent and ~5 s a case (a pytest process each): the
    PIECE_OPTIM_BACKEND-unset stage of scripts/test.sh runs these, the others skip."""
    if os.environ.get("PIECE_OPTIM_BACKEND"):
        pytest.skip("backend-independent: runs in the PIECE_OPTIM_BACKEND-unset stage")


def _collect(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", TARGET]
    return subprocess.run([*cmd, *args], cwd=HERE, capture_output=True, text=True, timeout=120)


def _ids(r: subprocess.CompletedProcess) -> list[str]:
    return [ln.split("[", 1)[1].rstrip("]") for ln in r.stdout.splitlines() if "[" in ln]


def test_seed_reruns_with_that_seed() -> None:
    r = _collect("--seed", "402695660")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _ids(r) == ["seed402695660"]


def test_seeds_sweeps_fresh_seeds() -> None:
    r = _collect("--seeds", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = _ids(r)
    assert len(ids) == 4 and len(set(ids)) == 4, ids  # four different fresh seeds
    assert all(i.startswith("seed") and int(i[4:]) >= 0 for i in ids)
    plain = _collect()  # no option: one test, the fixture draws its seed
    assert plain.returncode == 0 and _ids(plain) == [] and TARGET in plain.stdout


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--seeds", "0"], "1 or more"),
        (["--seed", "3", "--seeds", "2"], "one of them"),
        (["--seed", "-1"], "[0, 2**31)"),
    ],
)
def test_seed_options_refuse_bad_values(args: list[str], msg: str) -> None:
    r = _collect(*args)
    assert r.returncode != 0
    assert msg in r.stdout + r.stderr, r.stdout + r.stderr
