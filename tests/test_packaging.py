"""Importing never needs Triton or the compiled extension; the kernels' install mapping;
the CLI answers --help/--version.  (The wheel itself: scripts/wheel_check.sh.)"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import piece_optim as po

pytestmark = pytest.mark.cpu_only("import and install checks, no device work")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PIECE_OPTIM_BACKEND"}
    env["PIECE_OPTIM_NO_JIT"] = "1"  # no one-off JIT build of the missing extension
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )


def test_import_without_triton_and_extension():
    # sys.modules[name] = None makes "import name" raise ImportError, as if not installed
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['piece_optim._C'] = None\n"
        "import torch, piece_optim as po\n"
        "assert po.available_backends('cpu') == ['torch'], po.available_backends('cpu')\n"
        "m = torch.nn.Linear(5, 3)\n"
        "est = po.ImportanceEstimator(m, backend='auto')\n"
        "m(torch.randn(2, 5)).sum().backward(); est.collect()\n"
        "assert est.select(k=4).numel_selected() == 4\n"
        "try:\n"
        "    po.ImportanceEstimator(m, backend='triton')\n"
        "    est2 = po.ImportanceEstimator(m, backend='triton')\n"
        "    m(torch.randn(2, 5)).sum().backward(); est2.collect()\n"
        "    raise SystemExit('triton backend did not fail')\n"
        "except po.BackendUnavailableError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_cli_version_and_help():
    r = subprocess.run(
        [sys.executable, "-m", "piece_optim", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and po.__version__ in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "piece_optim", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "info" in r.stdout and "demo" in r.stdout


def test_triton_missing_is_told_apart_from_kernels_not_installed():
    code = (
        "import sys\n"
        "sys.modules[{blocked!r}] = None\n"
        "from piece_optim import backends\n"
        "print(backends.explain('adamw', 'cuda')['triton'][0])\n"
    )
    r = _run(code.format(blocked="triton"))
    assert r.returncode == 0, r.stderr
    assert "triton is not installed" in r.stdout and "pip install triton" in r.stdout
    r = _run(code.format(blocked="piece_optim.kernels"))
    assert r.returncode == 0, r.stderr
    assert "piece_optim.kernels is not installed" in r.stdout and "kernels/" in r.stdout


def _package_dirs() -> dict[str, str]:
    """setup.py's PACKAGE_DIRS, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_DIRS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py declares no PACKAGE_DIRS")


REPO = Path(__file__).resolve().parents[1]


def test_kernels_mapping_is_declared_once_and_followed():
    """kernels/ is installed as piece_optim.kernels (setup.py's PACKAGE_DIRS, the only place
    that says so), never as a top-level ``kernels``; the editable install follows it (the
    wheel: scripts/wheel_check.sh)."""
    dirs = _package_dirs()
    assert dirs == {"piece_optim.kernels": "kernels"}
    for package, folder in dirs.items():
        spec = importlib.util.find_spec(package)
        assert spec is not None and Path(spec.origin).parent == REPO / folder, spec
    mentions = [
        p
        for p in (*REPO.glob("*.py"), *REPO.glob("*.toml"), *REPO.glob("*.cfg"))
        if '"kernels"' in p.read_text() and p.name != "setup.py"
    ]
    assert not mentions, f"the mapping is repeated in {mentions}"
