"""Issue 13 on a GPU: the scoring rule and the step's index checks in the CUDA-tensor paths.

Skipped unless ``PIECE_OPTIM_TEST_DEVICE=cuda`` (a GPU stage, PIECE_OPTIM_BACKEND=triton or
cuda).  The CPU paths are in test_reliability.py.  What is checked here, and only here:

* the GPU kernels' PIECE-S rule: NaN in -> NaN out, an overflowed sum of squares -> +inf;
* an index changed in place (version counter bumped) raises before the step writes;
* an index changed behind the version counter (``.data``) is skipped by the kernel, which
  flags it, and the *next* step on that device raises (the flag is read without stalling
  the stream), after which a repaired optimizer steps again.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE
from torch import nn

import piece_optim as po
from piece_optim.backends import get_backend
from piece_optim.backends import reference as ref

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs PIECE_OPTIM_TEST_DEVICE=cuda")
NAN, INF = float("nan"), float("inf")


def test_gpu_score_rule_matches_reference():
    s1 = torch.tensor([1.0, NAN, 2.0, 3.0, 1e-30, 0.0, NAN, INF, 5.0, -4.0])
    s2 = torch.tensor([1.0, NAN, 4.0, INF, 0.0, 0.0, 0.0, INF, NAN, 16.0])
    be = get_backend("auto", DEVICE)
    for eps in (1.0, 0.0):
        want = ref.score(s1, s2, "piece-s", eps)
        got = be.score(s1.to(DEVICE), s2.to(DEVICE), "piece-s", eps).cpu()
        assert torch.equal(got.isnan(), want.isnan()), be.name
        assert torch.equal(got == INF, want == INF), be.name
        ok = want.isfinite()
        torch.testing.assert_close(got[ok], want[ok], rtol=2.5e-7, atol=0)  # <= 2 ulp


def test_gpu_nan_gradient_makes_select_raise(seed):
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).to(DEVICE)
    est = po.ImportanceEstimator(model, method="piece-s", exclude=())
    model(torch.randn(3, 16, device=DEVICE)).sum().backward()
    model[0].weight.grad[2, 3] = NAN
    est.collect()
    with pytest.raises(FloatingPointError, match="NaN, infinite"):
        est.select(ratio=0.1)
    est.close()


def test_gpu_step_index_checks(seed):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8, bias=False).to(DEVICE)  # 128 entries
    idx = torch.tensor([1, 5, 7, 100], dtype=torch.int32)
    opt = po.SparseAdamW(lin.named_parameters(), mask={"weight": idx})

    def step() -> None:
        lin.weight.grad = torch.randn_like(lin.weight)
        opt.step()

    step()
    st = opt.state[lin.weight]
    st["idx"][3] = 130  # bumps the version counter: checked before anything is written
    before = lin.weight.detach().clone()
    with pytest.raises(IndexError, match="index 130"):
        step()
    assert torch.equal(lin.weight, before)
    st["idx"][3] = 100
    step()
    st["idx"].data[3] = 10**6  # behind the version counter: the kernel skips and flags it
    before = lin.weight.detach().clone()
    step()  # does not stall the stream to look
    flat, old = lin.weight.detach().view(-1), before.view(-1)
    assert torch.equal(flat[8:100], old[8:100]) and torch.equal(flat[101:], old[101:])
    with pytest.raises(IndexError, match="previous sparse AdamW step"):
        step()
    st["idx"].data[3] = 100
    step()  # the flag was reset: a repaired optimizer steps again
    torch.cuda.synchronize()
