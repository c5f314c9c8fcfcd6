"""PIECE-S options: eps="auto", the magnitude tie-break, the selection report, protective
selection with a reference Fisher, and sampling reference text from the model."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import DEVICE, TinyNet, batches

import piece_optim as po
from piece_optim import importance as imp
from piece_optim._select import ScoreSource, global_topk_info, kth_largest


def _collect(model: TinyNet, grads: list[dict[str, torch.Tensor]], **kw) -> po.ImportanceEstimator:
    """An estimator fed hand-made gradient terms (each collect() folds one term)."""
    est = po.ImportanceEstimator(model, **kw)
    params = dict(model.named_parameters())
    for term in grads:
        for n, g in term.items():
            params[n].grad = g.to(params[n].device).clone()
        est.collect()
    return est


def _eligible(model: TinyNet) -> dict[str, torch.nn.Parameter]:
    return {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and p.numel() and "embed" not in n
    }


def _saturated_terms(model: TinyNet, seed: int, B: int = 4) -> tuple[list[dict], dict]:
    """B identical terms of dyadic gradients x = m / 256 (|m| <= 1024, some zero): sum g =
    B x and sum g^2 = B x^2 are exact in fp32, so with eps = 0 every nonzero entry scores
    exactly sqrt(B): the whole top-k is one tie."""
    g = torch.Generator().manual_seed(seed)
    xs = {}
    for n, p in _eligible(model).items():
        m = torch.randint(-1024, 1025, p.shape, generator=g).float()
        m[torch.rand(p.shape, generator=g) < 0.1] = 0
        xs[n] = m / 256
    return [xs] * B, xs


def _brute(keys: list[tuple[torch.Tensor, ...]], k: int) -> list[torch.Tensor]:
    """Top-k by lexicographic (key1 desc, key2 desc, ..., global position asc), on the CPU."""
    cols = [torch.cat([t[i].reshape(-1).double().cpu() for t in keys]) for i in range(len(keys[0]))]
    pos = torch.arange(cols[0].numel(), dtype=torch.float64)
    order = sorted(range(pos.numel()), key=lambda j: (*(-float(c[j]) for c in cols), j))[:k]
    chosen = torch.zeros(pos.numel(), dtype=torch.bool)
    chosen[order] = True
    out, start = [], 0
    for t in keys:
        n = t[0].numel()
        out.append(torch.nonzero(chosen[start : start + n]).reshape(-1))
        start += n
    return out


def _upper_quantile(t: torch.Tensor, q: float) -> float:
    """The value eps="auto" and the reference rescaling use: among the nonzero entries
    sorted descending, the ceil((1 - q) * n)-th."""
    pos = torch.sort(t[t > 0], descending=True).values
    return float(pos[math.ceil((1 - q) * pos.numel()) - 1])


def _mask_list(mask: po.SparseMask, names) -> list[torch.Tensor]:
    """The mask's indices per name, on the CPU (where _brute answers)."""
    return [mask[n].long().cpu() if n in mask else torch.empty(0, dtype=torch.long) for n in names]


# -- the saturated case: every selected score ties ---------------------------------------------


@pytest.mark.parametrize("B", [1, 4])
def test_saturated_piece_s_ties_go_to_magnitude_and_warn(seed, B):
    torch.manual_seed(seed)
    model = TinyNet()
    terms, xs = _saturated_terms(model, seed, B)
    est = _collect(model, terms, method="piece-s", eps=0.0)
    names = list(xs)
    scores = est.scores()
    nonzero = torch.cat([(x != 0).reshape(-1) for x in xs.values()])
    flat = torch.cat([scores[n].reshape(-1).cpu() for n in names])
    assert bool((flat[nonzero] == math.sqrt(B)).all())  # the whole top is one tie
    k = int(0.3 * nonzero.sum())
    with pytest.warns(po.SelectionWarning, match="saturated"):
        mask = est.select(k=k)
    info = est.last_selection
    assert (info.k, info.n_above, info.threshold) == (k, 0, math.sqrt(B))
    assert info.n_tied == int(nonzero.sum()) and info.tie_break == "magnitude"
    assert info.saturated and info.eps == 0.0
    # larger |sum g| first, then the lower position: the brute-force order
    expect = _brute([(scores[n], (B * xs[n]).abs()) for n in names], k)
    for got, want in zip(_mask_list(mask, names), expect, strict=True):
        assert torch.equal(got, want)
    # position (the old rule) keeps the first k tied entries and says so
    with pytest.warns(po.SelectionWarning, match="by position"):
        pos_mask = est.select(k=k, tie_break="position")
    assert est.last_selection.n_by_position == k
    expect = _brute([(scores[n],) for n in names], k)
    for got, want in zip(_mask_list(pos_mask, names), expect, strict=True):
        assert torch.equal(got, want)


def test_auto_eps_unsaturates_and_ranks_by_magnitude_here(seed):
    """eps="auto" on the saturated sums: scores 4|x| / sqrt(4x^2 + eps) rise with |x|, so
    the mask is the magnitude-ranked one with no tie at the threshold's score level."""
    torch.manual_seed(seed)
    model = TinyNet()
    terms, xs = _saturated_terms(model, seed, 4)
    est = _collect(model, terms, method="piece-s", eps="auto")
    names = list(xs)
    k = 97
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", po.SelectionWarning)  # equal |x| may still tie
        mask = est.select(k=k)
    assert not est.last_selection.saturated
    expect = _brute([((4 * xs[n]).abs(),) for n in names], k)
    for got, want in zip(_mask_list(mask, names), expect, strict=True):
        assert torch.equal(got, want)


def test_auto_eps_is_the_quantile_of_nonzero_sums(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    data = batches(3, seed + 1)
    est = po.ImportanceEstimator(model, method="piece-s", eps="auto")
    for x, y in data:
        model.loss(x, y).backward()
        est.collect()
    s2 = torch.cat([t.reshape(-1) for t in est._sum_g2.values()])
    want = imp.EPS_AUTO_FRACTION * _upper_quantile(s2, imp.EPS_AUTO_QUANTILE)
    assert est.resolved_eps() == want
    eps = est.resolved_eps()
    s1 = {n: t for n, t in est._sum_g.items()}
    for n, sc in est.scores().items():
        ref = s1[n].double().abs() / (est._sum_g2[n].double() + eps).sqrt()
        torch.testing.assert_close(sc.reshape(-1).double(), ref, rtol=2e-6, atol=0)
    mask = est.select(ratio=0.05)
    assert est.last_selection.eps == eps
    names = list(est.scores())
    expect = _brute([(est.scores()[n],) for n in names], mask.numel_selected())
    for got, want_idx in zip(_mask_list(mask, names), expect, strict=True):
        assert torch.equal(got, want_idx)


def test_auto_eps_all_zero_gradients_is_defined():
    model = TinyNet()
    zeros = {n: torch.zeros_like(p) for n, p in _eligible(model).items()}
    est = _collect(model, [zeros, zeros], method="piece-s", eps="auto")
    assert est.resolved_eps() == 1.0
    assert all(bool((s == 0).all()) for s in est.scores().values())


@pytest.mark.parametrize("bad", ["Auto", "1e-3", True, float("inf"), -1.0])
def test_eps_bad_values(bad):
    with pytest.raises(ValueError, match="eps"):
        po.ImportanceEstimator(TinyNet(), eps=bad)


def test_tie_break_argument_checked(seed):
    model = TinyNet()
    est = po.ImportanceEstimator(model)
    model.loss(*batches(1, seed)[0]).backward()
    est.collect()
    with pytest.raises(ValueError, match="tie_break"):
        est.select(k=3, tie_break="random")


def test_no_cut_tie_reports_none(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, method="piece-f")
    for x, y in batches(2, seed):
        model.loss(x, y).backward()
        est.collect()
    est.select(k=5)
    info = est.last_selection
    assert info.tie_break == "none" and info.n_by_position == 0 and not info.saturated
    assert info.n_above + min(info.n_tied, 5 - info.n_above) == 5


# -- the selection helpers on raw sums (any backend: the stage's) ------------------------------


def _src(sum_g, sum_g2):
    """A score source on the test device (made on the CPU: the seed decides the values)."""
    be = po.backends.get_backend("auto", DEVICE)
    sum_g = None if sum_g is None else sum_g.to(DEVICE)
    return ScoreSource(sum_g, sum_g2.to(DEVICE), sum_g2.numel(), torch.int32, be)


def test_kth_largest_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    ts = [
        torch.rand(n, generator=g) * 10.0 ** torch.randint(-6, 2, (n,), generator=g)
        for n in (1, 4097, 0, 333)
    ]
    allv = torch.sort(torch.cat(ts), descending=True).values
    for k in (1, 2, 100, allv.numel()):
        got = kth_largest([_src(None, t) for t in ts], k, "piece-f", 0.0)
        assert got == float(allv[k - 1])


def test_magnitude_ties_across_sources_with_one_rank_hooks(seed):
    """The magnitude tie-break through the distributed hooks (one rank) equals no hooks,
    with ties on the secondary key too (position decides those)."""
    g = torch.Generator().manual_seed(seed)
    B = 4
    xs = [torch.randint(-6, 7, (n,), generator=g).float() / 8 for n in (4097, 1, 333, 2000)]
    srcs = [_src(B * x, B * x * x) for x in xs]
    scores = [torch.where(x != 0, torch.full_like(x, 2.0), torch.zeros_like(x)) for x in xs]
    calls = []

    def share_ties(local_eq, take_eq):
        calls.append(take_eq)
        quota = []
        for n in local_eq:
            quota.append(min(n, take_eq))
            take_eq -= quota[-1]
        return quota

    mags = torch.sort(torch.cat([(B * x).abs() for x in xs]), descending=True).values
    at_least = [int((mags >= m).sum()) for m in mags.unique()]  # a whole tie group ends there
    by_position_seen = 0
    for k in (1, 50, 3000, at_least[-2], at_least[-2] + 1):
        plain, info = global_topk_info(srcs, k, "piece-s", 0.0, tie_break="magnitude")
        hooked, _ = global_topk_info(
            srcs,
            k,
            "piece-s",
            0.0,
            tie_break="magnitude",
            reduce_hist=lambda h: None,
            share_ties=share_ties,
        )
        expect = _brute([(s, (B * x).abs()) for s, x in zip(scores, xs, strict=True)], k)
        for a, b, e in zip(plain, hooked, expect, strict=True):
            assert torch.equal(a.long().cpu(), e) and torch.equal(b.long().cpu(), e)
        # position decides among the entries whose |sum g| equals the k-th one, unless the
        # k-th one closes its group (then nothing is left to position)
        kth = mags[k - 1]
        n_above, n_eq = int((mags > kth).sum()), int((mags == kth).sum())
        take = k - n_above
        assert info.tie_break == "magnitude"
        assert info.n_by_position == (take if take < n_eq else 0), (k, info)
        by_position_seen += info.n_by_position > 0
    assert by_position_seen >= 2  # k = 1 and k = at_least[-2] + 1 split a tie group
    assert calls  # the hook was asked to split the last-level tie


# -- protective selection -------------------------------------------------------------------


def _trained(seed: int, method="piece-s", n=3, **kw) -> tuple[TinyNet, po.ImportanceEstimator]:
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, method=method, **kw)
    for x, y in batches(n, seed + 1):
        model.loss(x, y).backward()
        est.collect()
    return model, est


@pytest.mark.parametrize("eps, weight", [(1e-6, 0.0), (1e-6, 1.0), ("auto", 30.0)])
def test_reference_joins_the_denominator(seed, eps, weight):
    model, est = _trained(seed, eps=eps)
    ref = po.ImportanceEstimator(model, method="piece-f")
    for x, y in batches(5, seed + 2):
        model.loss(x, y).backward()
        ref.collect()
    fisher = ref.fisher()
    for n, f in fisher.items():
        torch.testing.assert_close(f.reshape(-1), ref._sum_g2[n] / 5, rtol=0, atol=0)
    s2 = torch.cat([t.reshape(-1) for t in est._sum_g2.values()])
    f_all = torch.cat([fisher[n].reshape(-1) for n in est._sum_g2])
    c = _upper_quantile(s2, 0.5) / _upper_quantile(f_all, 0.5)
    den = {
        n: est._sum_g2[n].double() + weight * c * fisher[n].reshape(-1).double()
        for n in est._sum_g2
    }
    e = est.resolved_eps(reference=ref, reference_weight=weight)
    if eps == "auto":  # the quantile of the whole denominator
        allv = torch.cat(list(den.values())).float()
        want = imp.EPS_AUTO_FRACTION * _upper_quantile(allv, imp.EPS_AUTO_QUANTILE)
        assert e == pytest.approx(want, rel=1e-6)
    else:
        assert e == eps

    scores = est.scores(reference=ref, reference_weight=weight)
    assert scores.keys() == est.scores().keys()
    for n, sc in scores.items():
        want = est._sum_g[n].double().abs() / (den[n] + e).sqrt()
        torch.testing.assert_close(sc.reshape(-1).double(), want, rtol=1e-5, atol=0)
    # an estimator or its fisher() dict: the same mask, the brute-force one
    m1 = est.select(ratio=0.1, reference=ref, reference_weight=weight)
    assert est.last_selection.reference_scale == pytest.approx(c, rel=1e-6)
    m2 = est.select(ratio=0.1, reference=fisher, reference_weight=weight)
    assert m1 == m2
    names = list(scores)
    expect = _brute([(scores[n],) for n in names], m1.numel_selected())
    for got, want_idx in zip(_mask_list(m1, names), expect, strict=True):
        assert torch.equal(got, want_idx)


def test_reference_moves_the_mask_off_reference_sensitive_entries(seed):
    """A large weight on a reference that is huge on the task's top entries pushes them out."""
    model, est = _trained(seed, eps=1e-6)
    plain = est.select(k=20)
    # The reference is rescaled so that its median nonzero entry equals the task sums'
    # (see select()): a background of ones makes that median 1, so the 1e12 on the plain
    # mask's entries stays 1e12 times a typical task entry.  (With zeros around them the
    # rescale brought the 20 entries down to the median, which sometimes kept one: seed
    # 402695660.)
    fisher = {n: torch.ones_like(p) for n, p in _eligible(model).items()}
    for n in plain:
        fisher[n].view(-1)[plain[n].long()] = 1e12
    protected = est.select(k=20, reference=fisher, reference_weight=1.0)
    for n in protected:
        assert not set(protected[n].tolist()) & set(plain[n].tolist() if n in plain else [])


@pytest.mark.parametrize("method, eps", [("piece-s", "auto"), ("piece-f", 1.0)])
def test_reference_pool_ranks_the_task_inside_the_least_reference_important(seed, method, eps):
    model, est = _trained(seed, method=method, eps=eps)
    g = torch.Generator().manual_seed(seed + 5)
    # few levels: ties at the pool boundary (all of them are in the pool)
    fisher = {
        n: torch.randint(0, 40, p.shape, generator=g).float() / 7
        for n, p in _eligible(model).items()
    }
    names = list(fisher)
    k, pool = 31, 3.0
    mask = est.select(
        k=k, reference={n: f.to(DEVICE) for n, f in fisher.items()}, reference_pool=pool
    )
    f_all = torch.cat([fisher[n].reshape(-1) for n in names])
    v = float(torch.sort(f_all).values[math.ceil(pool * k) - 1])  # the pool's largest value
    assert est.last_selection.pool_threshold == v
    inside = {n: fisher[n].reshape(-1) <= v for n in names}
    # the check on the CPU
    sum_g = {n: est._sum_g[n].reshape(-1).cpu() for n in names} if method == "piece-s" else {}
    sum_g2 = {n: est._sum_g2[n].reshape(-1).cpu() for n in names}
    s2 = torch.cat([sum_g2[n] for n in names])
    in_all = torch.cat([inside[n] for n in names])
    if eps == "auto":  # the quantile over the pool's sums
        e = imp.EPS_AUTO_FRACTION * _upper_quantile(s2[in_all], imp.EPS_AUTO_QUANTILE)
        assert est.last_selection.eps == e
    else:
        e = eps
    keys = []
    for n in names:
        s2n = sum_g2[n].double()
        sc = s2n if method == "piece-f" else sum_g[n].double().abs() / (s2n + e).sqrt()
        sc = torch.where(inside[n], sc.float(), torch.full_like(sc.float(), -1.0))
        mag = sum_g[n].abs() if method == "piece-s" else torch.zeros_like(sc)
        keys.append((sc, mag))
    expect = _brute(keys, k)
    for got, want in zip(_mask_list(mask, names), expect, strict=True):
        assert torch.equal(got, want)
    for n in mask:
        assert bool(inside[n][mask[n].long().cpu()].all()), n


def test_reference_errors(seed):
    model, est = _trained(seed)
    fisher = {n: torch.rand(p.shape) for n, p in _eligible(model).items()}
    with pytest.raises(KeyError, match="fc2.bias"):
        est.select(k=3, reference={n: f for n, f in fisher.items() if n != "fc2.bias"})
    with pytest.raises(ValueError, match="entries"):
        est.select(k=3, reference={**fisher, "fc1.bias": torch.rand(3)})
    with pytest.raises(ValueError, match="reference_weight"):
        est.select(k=3, reference=fisher, reference_weight=-1.0)
    with pytest.raises(TypeError, match="reference"):
        est.select(k=3, reference=[1, 2])
    with pytest.raises(ValueError, match="another"):
        est.select(k=3, reference=est)
    with pytest.raises(ValueError, match="not both"):
        est.select(k=3, reference=fisher, reference_weight=2.0, reference_pool=3)
    with pytest.raises(ValueError, match="reference_pool"):
        est.select(k=3, reference=fisher, reference_pool=0.5)
    with pytest.raises(ValueError, match="need reference"):
        est.select(k=3, reference_pool=3)
    with pytest.raises(ValueError, match="negative"):
        est.select(k=3, reference={**fisher, "fc1.bias": -fisher["fc1.bias"] - 1})
    _, est_f = _trained(seed, method="piece-f")
    with pytest.raises(ValueError, match="piece-s"):
        est_f.select(k=3, reference=fisher)
    est_f.select(k=3, reference=fisher, reference_pool=3)  # the pool rule takes PIECE-F
    fresh = po.ImportanceEstimator(TinyNet())
    with pytest.raises(RuntimeError, match="no gradients"):
        fresh.fisher()


# -- reference text from the model itself ------------------------------------------------------


def _tiny_llama(seed: int):
    from piece_optim.demo.model import build_model

    return build_model("tiny", seed=seed % 1000)


def test_sample_tokens_deterministic_and_cache_free_path_agrees(seed, monkeypatch):
    from piece_optim import protect

    model = _tiny_llama(seed)
    model.train()
    prompt = torch.tensor([10, 65])
    a = protect.sample_tokens(model, 5, 9, prompt=prompt, batch_size=2, seed=seed)
    b = protect.sample_tokens(model, 5, 9, prompt=prompt, batch_size=2, seed=seed)
    assert a.shape == (5, 11) and a.dtype == torch.long and torch.equal(a, b)
    assert bool((a[:, :2] == prompt).all()) and model.training  # mode restored
    monkeypatch.setattr(protect, "_cache_arg", lambda m: None)  # re-run the sequence instead
    c = protect.sample_tokens(model, 5, 9, prompt=prompt, batch_size=2, seed=seed)
    assert torch.equal(a, c)
    d = protect.sample_tokens(model, 5, 9, prompt=prompt, batch_size=2, seed=seed + 1)
    assert not torch.equal(a, d)
    with pytest.raises(ValueError, match="n_samples"):
        protect.sample_tokens(model, 0, 9)
    with pytest.raises(ValueError, match="temperature"):
        protect.sample_tokens(model, 1, 9, temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        protect.sample_tokens(model, 1, 9, prompt=torch.zeros(2, 2, dtype=torch.long))
