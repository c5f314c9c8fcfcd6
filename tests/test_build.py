"""csrc_build.py: which CUDA architectures the extension is built for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import csrc_build  # noqa: E402

pytestmark = pytest.mark.cpu_only("build configuration, no device work")


@pytest.mark.parametrize(
    "ours, theirs, want",
    [("9.0", None, "9.0"), (None, "9.0", "9.0"), ("9.0", "8.0;8.6", "9.0"),
     (None, None, "8.0;9.0"), ("", "7.5", "7.5"), ("8.0 9.0a", "", "8.0 9.0a")],
)  # fmt: skip
def test_cuda_arch_list_precedence(monkeypatch, capsys, ours, theirs, want):
    """PIECE_CUDA_ARCH_LIST wins, then TORCH_CUDA_ARCH_LIST, then A100 + H100/H200; never
    torch's 'the GPUs visible now' (a build machine may have none)."""
    for var, value in (("PIECE_CUDA_ARCH_LIST", ours), ("TORCH_CUDA_ARCH_LIST", theirs)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert csrc_build.cuda_arch_list() == want
    said = capsys.readouterr().err
    assert ("overrides TORCH_CUDA_ARCH_LIST" in said) == bool(ours and theirs and ours != theirs)
