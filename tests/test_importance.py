"""ImportanceEstimator scores and the exact global top-k against independent computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import DEVICE, TinyNet, batches

import piece_optim as po
from piece_optim.functional import ScoreSource, global_topk


def _float64_sums(model: TinyNet, data) -> tuple[dict, dict, dict]:
    """sum_b g_b, sum_b g_b^2 and sum_b |g_b| per parameter, summed in float64.

    The per-batch gradients come from ``torch.autograd.grad`` on an independent copy of the
    model (same fp32 weights, so the same fp32 gradients the estimator sees); only the
    summation and the scoring are done in float64.  This checks the estimator's
    accumulation and scores, not the fp32 rounding of backprop itself.
    """
    twin = copy.deepcopy(model)
    params = {n: p for n, p in twin.named_parameters() if p.requires_grad and p.numel()}
    s1 = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    s2 = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    sa = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for x, y in data:
        grads = torch.autograd.grad(twin.loss(x, y), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                g = g.double()
                s1[n] += g
                s2[n] += g * g
                sa[n] += g.abs()
    return s1, s2, sa


def brute_force_topk(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Stable sort by (-score, global position): the tie rule (the lower global position
    wins), on the CPU."""
    flat = torch.cat([s.reshape(-1).double().cpu() for s in scores])
    order = torch.sort(-flat, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, start = [], 0
    for s in scores:
        out.append(torch.nonzero(chosen[start : start + s.numel()]).reshape(-1))
        start += s.numel()
    return out


@pytest.mark.parametrize("method", ["piece-f", "fisher", "piece-s", "second-order"])
def test_scores_equal_float64_sums(seed, method):
    torch.manual_seed(seed)
    model = TinyNet()
    data = batches(5, seed + 1)
    s1, s2, sa = _float64_sums(model, data)
    with po.ImportanceEstimator(model, method=method, eps=1.0) as est:
        for x, y in data:
            model.loss(x, y).backward()
            est.collect()
            assert all(p.grad is None for p in model.parameters())
        scores = est.scores()
        assert est.num_terms == 5
    assert "embed.weight" not in scores  # excluded by default
    assert set(scores) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for n, s in scores.items():
        assert s.dtype == torch.float32 and s.shape == dict(model.named_parameters())[n].shape
        if method in ("piece-f", "fisher"):
            expect = s2[n]
            torch.testing.assert_close(s.double(), expect, rtol=2e-5, atol=1e-12)
        else:
            expect = s1[n].abs() / (s2[n] + 1.0).sqrt()
            # fp32 summation of 5 terms may cancel: its error is bounded by ~n*u*sum|g|
            # (u = 2**-24), not by |sum g|; allow 4x that bound plus 2e-6 relative.
            bound = 4 * 5 * 2.0**-24 * sa[n] / (s2[n] + 1.0).sqrt() + 2e-6 * expect
            err = (s.double() - expect).abs()
            assert bool((err <= bound + 1e-30).all()), float((err / bound).max())


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("ratio", [1e-3, 0.01, 0.2, 1.0])
def test_select_equals_brute_force(seed, method, ratio):
    torch.manual_seed(seed)
    model = TinyNet(vocab=41, dim=17, hidden=23)
    data = batches(3, seed + 1, vocab=41)
    est = po.ImportanceEstimator(model, method=method, exclude=())
    for x, y in data:
        model.loss(x, y).backward()
        est.collect()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = int(ratio * total)
    if k < 1:
        with pytest.raises(ValueError, match="selects nothing"):
            est.select(ratio=ratio)
        return
    mask = est.select(ratio=ratio)
    scores = est.scores()
    expect = brute_force_topk(list(scores.values()), k)
    assert mask.numel_selected() == k and mask.numel_total() == total
    for (name, _), idx in zip(scores.items(), expect, strict=True):
        got = mask[name].long().cpu() if name in mask else torch.empty(0, dtype=torch.long)
        assert torch.equal(got, idx), name
    assert math.isclose(mask.ratio, k / total)


def _sources(tensors):
    be = po.backends.get_backend("auto", DEVICE)
    return [
        ScoreSource(None, t.reshape(-1).contiguous().to(DEVICE), t.numel(), torch.int32, be)
        for t in tensors
    ]


@pytest.mark.parametrize("n_levels", [1, 2, 7])
def test_global_topk_ties_lower_position_wins(seed, n_levels):
    g = torch.Generator().manual_seed(seed)
    # few distinct values -> heavy ties, including exactly at the threshold
    levels = torch.rand(n_levels, generator=g) + 0.5
    sizes = [1, 4097, 333, 0, 2000]
    tensors = [levels[torch.randint(0, n_levels, (n,), generator=g)] for n in sizes]
    N = sum(sizes)
    for k in (1, 2, 17, N // 2, N - 1, N):
        got = global_topk(_sources(tensors), k, "piece-f", 1.0)
        expect = brute_force_topk(tensors, k)
        assert sum(i.numel() for i in got) == k
        for a, b in zip(got, expect, strict=True):
            assert torch.equal(a.long().cpu(), b), (k, n_levels)


def test_global_topk_all_equal_and_zero_scores(seed):
    t = [torch.zeros(50), torch.zeros(7)]
    got = global_topk(_sources(t), 53, "piece-f", 1.0)
    assert torch.equal(got[0].long().cpu(), torch.arange(50))
    assert torch.equal(got[1].long().cpu(), torch.arange(3))
    v = float(torch.rand(1).item()) + 1e-3
    t = [torch.full((10,), v), torch.full((10,), v)]
    got = global_topk(_sources(t), 5, "piece-f", 1.0)
    assert torch.equal(got[0].long().cpu(), torch.arange(5)) and got[1].numel() == 0


def test_global_topk_values_spanning_bins(seed):
    """Values in the same top-16-bit bin and across many bins, denormals included."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(3001, generator=g) * 1e-3
    b = 1.0 + torch.rand(997, generator=g) * 2**-10  # same top bits, differ in low bits
    c = torch.rand(513, generator=g) * 1e-40  # denormals
    for k in (1, 100, 997, 1500, 4511):
        got = global_topk(_sources([a, b, c]), k, "piece-f", 1.0)
        for x, y in zip(got, brute_force_topk([a, b, c], k), strict=True):
            assert torch.equal(x.long().cpu(), y), k


def test_nan_scores_raise(seed):
    t = torch.rand(100)
    t[7] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        global_topk(_sources([t]), 3, "piece-f", 1.0)
    t[7] = float("inf")
    with pytest.raises(FloatingPointError):
        global_topk(_sources([t]), 3, "piece-f", 1.0)


def test_exclude_counts_in_total_but_is_never_selected(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, method="piece-f", exclude=("embed", "fc1.bias"))
    for x, y in batches(2, seed):
        model.loss(x, y).backward()
        est.collect()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eligible = total - model.embed.weight.numel() - model.fc1.bias.numel()
    mask = est.select(k=eligible)
    assert mask.numel_total() == total
    assert "embed.weight" not in mask and "fc1.bias" not in mask
    assert mask.numel_selected() == eligible
    with pytest.raises(ValueError, match="exceeds"):
        est.select(k=eligible + 1)


def test_in_backward_equals_collect(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    twin = copy.deepcopy(model)
    data = batches(4, seed + 1)
    a = po.ImportanceEstimator(model, method="piece-s")
    b = po.ImportanceEstimator(twin, method="piece-s", in_backward=True)
    for x, y in data:
        model.loss(x, y).backward()
        a.collect()
        twin.loss(x, y).backward()
        assert all(p.grad is None for p in twin.parameters())
    assert b.num_terms == a.num_terms == 4
    sa, sb = a.scores(), b.scores()
    for n in sa:
        assert torch.equal(sa[n], sb[n]), n
    assert a.select(ratio=0.01) == b.select(ratio=0.01)
    b.close()
    twin.loss(*data[0]).backward()  # hooks removed: grads stay
    assert twin.fc1.weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, r"\(0, 1\]"),
        ({"ratio": 1.5}, r"\(0, 1\]"),
        ({"ratio": float("nan")}, r"\(0, 1\]"),
        ({"ratio": -0.1}, r"\(0, 1\]"),
        ({}, "exactly one"),
        ({"ratio": 0.1, "k": 3}, "exactly one"),
        ({"k": 0}, "positive"),
        ({"k": 2.5}, "positive"),
    ],
)
def test_select_bad_arguments(seed, kwargs, match):
    model = TinyNet()
    est = po.ImportanceEstimator(model)
    model.loss(*batches(1, seed)[0]).backward()
    est.collect()
    with pytest.raises(ValueError, match=match):
        est.select(**kwargs)


def test_estimator_bad_input():
    model = TinyNet()
    with pytest.raises(ValueError, match="method"):
        po.ImportanceEstimator(model, method="magnitude")
    with pytest.raises(ValueError, match="eps"):
        po.ImportanceEstimator(model, eps=-1.0)
    with pytest.raises(ValueError, match="accum_dtype"):
        po.ImportanceEstimator(model, accum_dtype=torch.float16)
    with pytest.raises(ValueError, match="eligible"):
        po.ImportanceEstimator(model, exclude=("",))
    with pytest.raises(TypeError, match="nn.Module"):
        po.ImportanceEstimator([torch.nn.Parameter(torch.randn(2))])
    est = po.ImportanceEstimator(model)
    with pytest.raises(RuntimeError, match="backward"):
        est.collect()
    with pytest.raises(RuntimeError, match="no gradients"):
        est.select(ratio=0.1)
    est.close()
    with pytest.raises(RuntimeError, match="closed"):
        est.scores()


def test_bf16_accumulators_are_close(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    twin = copy.deepcopy(model)
    a = po.ImportanceEstimator(model, method="piece-f")
    b = po.ImportanceEstimator(twin, method="piece-f", accum_dtype=torch.bfloat16)
    for x, y in batches(6, seed + 1):
        model.loss(x, y).backward()
        a.collect()
        twin.loss(x, y).backward()
        b.collect()
    assert b.state_bytes() * 2 == a.state_bytes()
    for n, s in a.scores().items():
        torch.testing.assert_close(b.scores()[n], s, rtol=2**-7 * 6, atol=1e-12)
