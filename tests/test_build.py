"""The build configuration: CUDA architectures, the source lists, the environment names."""

from __future__ import annotations

from pathlib import Path

import pytest

import csrc_build
from piece_optim import _build_config, _env

pytestmark = pytest.mark.cpu_only("build configuration, no device work")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "ours, theirs, want",
    [
        ("9.0", None, "9.0"),
        (None, "9.0", "9.0"),
        ("9.0", "8.0;8.6", "9.0"),
        (None, None, "8.0;9.0"),
        ("", "7.5", "7.5"),
        ("8.0 9.0a", "", "8.0 9.0a"),
    ],
)
def test_cuda_arch_list_precedence(monkeypatch, capsys, ours, theirs, want):
    """PIECE_OPTIM_CUDA_ARCH_LIST wins, then TORCH_CUDA_ARCH_LIST, then A100 + H100/H200;
    never torch's 'the GPUs visible now' (a build machine may have none)."""
    monkeypatch.delenv("PIECE_CUDA_ARCH_LIST", raising=False)
    for var, value in (("PIECE_OPTIM_CUDA_ARCH_LIST", ours), ("TORCH_CUDA_ARCH_LIST", theirs)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert csrc_build.cuda_arch_list() == want
    said = capsys.readouterr().err
    assert ("overrides TORCH_CUDA_ARCH_LIST" in said) == bool(ours and theirs and ours != theirs)


def test_old_environment_names_still_work_with_a_deprecation(monkeypatch, capsys):
    monkeypatch.delenv("PIECE_OPTIM_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("PIECE_CUDA_ARCH_LIST", "8.6")
    csrc_build._env._warned.discard("CUDA_ARCH_LIST")  # warned once per process
    assert csrc_build.cuda_arch_list() == "8.6"
    assert "PIECE_CUDA_ARCH_LIST is deprecated; use PIECE_OPTIM_CUDA_ARCH_LIST" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("PIECE_OPTIM_CUDA_ARCH_LIST", "9.0")  # the new name wins
    assert csrc_build.cuda_arch_list() == "9.0"
    monkeypatch.setenv("PIECE_NO_JIT", "1")
    monkeypatch.delenv("PIECE_OPTIM_NO_JIT", raising=False)
    _env._warned.discard("NO_JIT")
    with pytest.warns(DeprecationWarning, match="PIECE_NO_JIT is deprecated"):
        assert _env.flag("NO_JIT")
    monkeypatch.setenv("PIECE_BACKEND", "cpu")  # never a PIECE_ name: not read at all
    monkeypatch.delenv("PIECE_OPTIM_BACKEND", raising=False)
    assert _env.get("BACKEND") == ""


def test_source_lists_name_every_source_once():
    """The build configuration lists csrc/ exactly: a new .cu or .cpp must be added there."""
    listed = [*_build_config.CPU_SOURCES, *_build_config.CUDA_SOURCES]
    assert len(set(listed)) == len(listed)
    on_disk = {
        str(p.relative_to(REPO)) for pat in ("*.cpp", "*.cu") for p in (REPO / "csrc").rglob(pat)
    }
    assert set(listed) == on_disk
    assert csrc_build.config.CXX_FLAGS == _build_config.CXX_FLAGS  # one configuration
