"""Sparse deltas: save / apply / revert round trips are bit-exact; bad input fails clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import piece_optim as po
from piece_optim.delta import load_delta

pytestmark = pytest.mark.cpu_only("delta files: CPU models and file I/O, no kernels")


def _model(dtype: torch.dtype) -> nn.Module:
    m = nn.Sequential(nn.Linear(13, 29), nn.Linear(29, 7), nn.LayerNorm(7))
    return m.to(dtype)


def _perturb_(model: nn.Module, frac: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Change a random ``frac`` of each float param's entries; returns the changed positions."""
    changed = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            sel = torch.rand(p.numel(), generator=g) < frac
            if n.startswith("2."):
                continue  # leave the LayerNorm untouched: a parameter with no change
            flat = p.view(-1)
            flat[sel] = flat[sel] + torch.randn(int(sel.sum()), generator=g).to(p.dtype)
            changed[n] = sel.nonzero().view(-1)
    return changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bit_exact(tmp_path, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = _model(dtype)
    tuned = copy.deepcopy(base)
    changed = _perturb_(tuned, 0.1, g)
    info = po.save_delta(base, tuned, tmp_path / "d.safetensors")
    stored = load_delta(tmp_path / "d.safetensors")
    assert set(stored) == {n for n, i in changed.items() if i.numel()}
    for n, d in stored.items():
        # bit comparison: an entry whose perturbation rounded to zero is not a change
        old = dict(base.named_parameters())[n].detach().view(-1)
        new = dict(tuned.named_parameters())[n].detach().view(-1)
        expect = (old != new).nonzero().view(-1)
        assert torch.equal(d["idx"].long(), expect)
        assert d["idx"].dtype == torch.int32
    assert info["entries"] == sum(d["idx"].numel() for d in stored.values())
    assert info["bytes"] == (tmp_path / "d.safetensors").stat().st_size

    m = copy.deepcopy(base)
    assert po.apply_delta(m, tmp_path / "d.safetensors") == info["entries"]
    for (n, p), q in zip(m.named_parameters(), tuned.parameters(), strict=True):
        assert torch.equal(
            p.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
            q.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
        ), n
    po.revert_delta(m, tmp_path / "d.safetensors")
    for p, q in zip(m.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mask_entries_and_state_dict_base(tmp_path, seed):
    torch.manual_seed(seed)
    model = _model(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = dict(model.named_parameters())
    idx = torch.randperm(names["0.weight"].numel())[:37].sort().values
    mask = po.SparseMask({"0.weight": idx}, {"0.weight": (29, 13)}, 1000)
    with torch.no_grad():
        names["0.weight"].view(-1)[idx[::2]] += 1.0  # half the selected entries change
        names["1.bias"].add_(1.0)  # outside the mask: not stored
    info = po.save_delta(before, model, tmp_path / "m.safetensors", mask=mask)
    assert info["entries"] == 37
    d = load_delta(tmp_path / "m.safetensors")
    assert list(d) == ["0.weight"]
    assert torch.equal(d["0.weight"]["idx"].long(), idx)
    po.revert_delta(model, tmp_path / "m.safetensors")
    assert torch.equal(names["0.weight"], before["0.weight"])
    assert not torch.equal(names["1.bias"], before["1.bias"])


def test_strict_checks_and_errors(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = _model(torch.float32)
    tuned = copy.deepcopy(base)
    _perturb_(tuned, 0.2, g)
    path = tmp_path / "d.safetensors"
    po.save_delta(base, tuned, path)
    with pytest.raises(ValueError, match="fine-tuned values"):
        po.revert_delta(copy.deepcopy(base), path)  # not applied yet
    with pytest.raises(ValueError, match="base values"):
        po.apply_delta(copy.deepcopy(tuned), path)  # already applied
    other = _model(torch.float32)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="strict=False"):
        po.apply_delta(other, path)
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), before, strict=True))
    po.apply_delta(other, path, strict=False)  # explicit override writes anyway
    with pytest.raises(KeyError, match="lacks"):
        po.apply_delta(nn.Sequential(nn.Linear(13, 29)), path, strict=False)
    wrong = nn.Sequential(nn.Linear(13, 30), nn.Linear(30, 7), nn.LayerNorm(7))
    with pytest.raises(ValueError, match="made for"):
        po.apply_delta(wrong, path, strict=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        po.apply_delta(base, tmp_path / "missing.safetensors")
    po.SparseMask({}, {}, 1).save(tmp_path / "mask.safetensors")
    with pytest.raises(ValueError, match="not a piece_optim sparse delta"):
        load_delta(tmp_path / "mask.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="cannot read"):
        load_delta(tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="nn.Module"):
        po.save_delta([1], tuned, path)
    with pytest.raises(TypeError, match="nn.Module"):
        po.apply_delta({"a": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="base has no parameter"):
        po.save_delta({"0.weight": base[0].weight}, tuned, path)
    with pytest.raises(ValueError, match="in base and"):
        po.save_delta(base, copy.deepcopy(base).to(torch.float64), path)
