"""Importing never needs Triton or the compiled extension; the CLI answers --help/--version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import piece_optim as po

pytestmark = pytest.mark.cpu_only("import and install checks, no device work")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PIECE_OPTIM_BACKEND"}
    env["PIECE_NO_JIT"] = "1"  # no one-off JIT build of the missing extension
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


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
    r = subprocess.run([sys.executable, "-m", "piece_optim", "--version"], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and po.__version__ in r.stdout
    r = subprocess.run([sys.executable, "-m", "piece_optim", "--help"], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "info" in r.stdout and "demo" in r.stdout
