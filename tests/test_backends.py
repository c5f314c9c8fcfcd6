"""Every backend against the reference (:mod:`piece_optim.backends.reference`), and the rule.

``be`` is each registered backend but the reference that runs on the test device
(``PIECE_OPTIM_TEST_DEVICE``): on a CPU the C++ kernels and Triton's interpreter (conftest
sets ``TRITON_INTERPRET=1``), on a GPU the CUDA kernels and compiled Triton.  With
``PIECE_OPTIM_BACKEND`` set (one CI stage per backend) only that one; a backend named there
that cannot run fails the tests instead of skipping them.  A new backend is tested here as
soon as it is registered; its tolerances, if it is not bit-exact, go in ``helpers.tol_of``.

Inputs are fresh random (the ``seed`` fixture), of odd sizes, with a zero-size tensor,
special values and low precision; outputs are poisoned or start from random state.
Sizes stay small: Triton's interpreter runs every program in numpy.
"""

from __future__ import annotations

import inspect
import logging
import os

import pytest
import torch
from helpers import (
    BF16,
    DEVICE,
    F16,
    F32,
    TinyNet,
    WeightTol,
    assert_ulp,
    batches,
    tol_of,
)

import piece_optim as po
from piece_optim import backends
from piece_optim import functional as F
from piece_optim.backends import reference as ref

# numpy, running the interpreter, warns on 0/0 and x/0, which the NaN/eps=0 cases do on purpose
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning"),
]
DEV = DEVICE
HIST = ref.HIST_BINS


def _under_test() -> list:
    """``pytest.param`` per backend under test (see the module doc)."""
    env = os.environ.get("PIECE_OPTIM_BACKEND", "").strip().lower()
    if env and env != "auto":
        return [] if env == "torch" else [pytest.param(env, id=env)]
    # every other registered backend that can run here (on a CPU the C++ kernels and
    # Triton's interpreter; scripts/test.sh fails if the C++ one does not load)
    return [
        pytest.param(name, id=name)
        for name in backends.names()
        if name != "torch" and not backends.explain("adamw", DEV, (F32, F32))[name]
    ]


BACKENDS = _under_test()


@pytest.fixture(scope="module", params=BACKENDS)
def be(request):
    """The backend object itself (so PIECE_OPTIM_BACKEND cannot swap it for another)."""
    why = backends.explain("adamw", DEV, (F32, F32))[request.param]
    assert not why, f"backend {request.param!r} cannot run on {DEV}: {why}"
    return backends.load(request.param)


@pytest.fixture
def tol(be):
    return tol_of(be.name)


@pytest.fixture
def no_env_backend(monkeypatch):
    """Tests that compare two backends must not have PIECE_OPTIM_BACKEND force both to one."""
    monkeypatch.delenv("PIECE_OPTIM_BACKEND", raising=False)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(n: int, gen: torch.Generator, dtype: torch.dtype = F32, spread: int = 12) -> torch.Tensor:
    """Normal values times 2**U(-spread, 4): many exponents, so many histogram bins."""
    x = torch.randn(n, generator=gen) * torch.exp2(
        torch.randint(-spread, 5, (n,), generator=gen).float()
    )
    return x.to(dtype).to(DEV)


SIZES = (0, 1, 7, 1031)


# -- accumulate -------------------------------------------------------------------------------
@pytest.mark.parametrize("gdtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("adtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("piece_s", [False, True], ids=["piece-f", "piece-s"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_accumulate_matches_reference(be, tol, seed, gdtype, adtype, piece_s, stochastic):
    gen = _gen(seed)
    for n in SIZES:
        s1 = rnd(n, gen, adtype) if piece_s else None
        s2 = rnd(n, gen, F32).abs().to(adtype)
        r1 = s1.clone() if piece_s else None
        r2 = s2.clone()
        for term in range(2):
            g = rnd(n, gen, gdtype)
            keys = [ref.stochastic_key(seed, term, 3)] if stochastic else None
            be.accumulate_many_([g], [s1], [s2], keys)
            ref.accumulate_(g, r1, r2, None if keys is None else keys[0])
            if piece_s:
                assert_ulp(s1, r1, tol.acc, f"sum_g n={n} term={term}")
            assert_ulp(s2, r2, tol.acc, f"sum_g2 n={n} term={term}")


def test_accumulate_special_values(be, tol, seed):
    """NaN / inf / -inf / zeros / subnormals propagate as in the reference, both roundings."""
    gen = _gen(seed)
    for adtype, key in ((F32, None), (BF16, None), (BF16, ref.stochastic_key(seed, 0, 0))):
        g = rnd(40, gen)
        g[[1, 5, 9, 20]] = torch.tensor(
            [float("nan"), float("inf"), -float("inf"), 0.0], device=DEV
        )
        g[[2, 3]] = torch.tensor([1e-40, -3e-39], device=DEV)  # fp32 subnormals
        s1 = rnd(40, gen, adtype)
        s2 = rnd(40, gen).abs().to(adtype)
        s2[7] = float("inf")
        s1[8] = 3.3e38  # the next term may round it up to inf
        r1, r2 = s1.clone(), s2.clone()
        be.accumulate_many_([g], [s1], [s2], None if key is None else [key])
        ref.accumulate_(g, r1, r2, key)
        assert_ulp(s1, r1, tol.acc, f"sum_g {adtype}")
        assert_ulp(s2, r2, tol.acc, f"sum_g2 {adtype}")
        for method in ("piece-f", "piece-s"):
            got, want = be.score(s1, s2, method, 1.0), ref.score(r1, r2, method, 1.0)
            assert_ulp(got, want, tol.score(method), method)


def test_accumulate_many_mixed_sizes_and_strided(be, tol, seed, monkeypatch):
    """One call over tensors of odd sizes, with and without sum_g, strided and empty
    gradients, rounding keys per tensor (Triton: small ones batched into one launch)."""
    if be.name == "triton":
        from piece_optim.kernels import accumulate

        monkeypatch.setattr(accumulate, "BATCH_NUMEL", 600)  # 1031 alone, the others batch
    gen = _gen(seed)
    spec = [
        (7, F32, F32, True),
        (0, F32, F32, True),
        (1, F32, F32, True),
        (599, F32, F32, True),
        (1031, F32, F32, True),
        (5, BF16, F32, False),
        (300, BF16, BF16, False),
        (13, F16, BF16, True),
        (77, F16, BF16, True),
    ]
    grads, s1s, s2s = [], [], []
    for n, gdt, adt, has_g in spec:
        grads.append(rnd(n, gen, gdt))
        s1s.append(rnd(n, gen, adt) if has_g else None)
        s2s.append(rnd(n, gen).abs().to(adt))
    grads[4] = rnd(1031 * 3, gen)[::3]  # non-contiguous
    r1s = [None if t is None else t.clone() for t in s1s]
    r2s = [t.clone() for t in s2s]
    keys = [ref.stochastic_key(seed, 1, i) for i in range(len(spec))]
    be.accumulate_many_(grads, s1s, s2s, keys)
    for g, r1, r2, k in zip(grads, r1s, r2s, keys, strict=True):
        ref.accumulate_(g, r1, r2, k)
    for i in range(len(spec)):
        if s1s[i] is not None:
            assert_ulp(s1s[i], r1s[i], tol.acc, f"sum_g #{i}")
        assert_ulp(s2s[i], r2s[i], tol.acc, f"sum_g2 #{i}")


# -- scores and histograms --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("adtype", [F32, BF16], ids=str)
def test_score_matches_reference(be, tol, seed, method, adtype):
    gen = _gen(seed)
    for n in SIZES:
        s1 = rnd(n, gen, adtype)
        s2 = rnd(n, gen).abs().to(adtype)
        if n >= 7:
            s1[:3] = 0.0
            s2[1:4] = 0.0  # with eps=0: 0/0 -> score 0 (index 1, 2), x/0 -> 0 (index 3)
        for eps in (1.0, 0.0, 1e-8):
            got = be.score(s1, s2, method, eps)
            assert_ulp(got, ref.score(s1, s2, method, eps), tol.score(method), f"n={n} {eps}")


def _scores_with_ties(n: int, gen: torch.Generator) -> torch.Tensor:
    """Non-negative scores over many bins, with many exact duplicates."""
    pool = rnd(max(n // 4, 1), gen).abs()
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen).to(DEV)]


def test_histogram_of_raw_scores(be, seed):
    """A pass over raw fp32 scores (the piece-f score of ``(None, scores)``), NaN, inf and
    negative scores included (they land in the "bad" bins), adding to a histogram."""
    gen = _gen(seed)
    for n in SIZES:
        sc = _scores_with_ties(n, gen)
        if n >= 7:
            sc[[0, 3, 6]] = torch.tensor([float("nan"), float("inf"), -1.5], device=DEV)
        hist = torch.randint(0, 5, (HIST,), generator=gen).to(DEV)  # it adds to this
        hist_ref = hist.clone()
        be.score_histogram_many_([None], [sc], "piece-f", 0.0, hist, 16, 0)
        ref.histogram_(sc, hist_ref, 16, 0)
        assert torch.equal(hist, hist_ref), f"level 1, n={n}"
        if n:
            top = (int(ref._bits(sc)[n - 1]) & 0xFFFFFFFF) >> 16
            h2, h2_ref = torch.zeros_like(hist), torch.zeros_like(hist)
            be.score_histogram_many_([None], [sc], "piece-f", 0.0, h2, 0, top)
            ref.histogram_(sc, h2_ref, 0, top)
            assert torch.equal(h2, h2_ref), f"level 2, n={n}"
            assert int(h2.sum()) >= 1


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_score_histogram_many(be, seed, method):
    """One pass over several tensors, the scores computed on the fly: the counts of exactly
    the backend's own scores."""
    gen = _gen(seed)
    for adtype in (F32, BF16):
        sums = [(rnd(n, gen, adtype), rnd(n, gen).abs().to(adtype)) for n in (1031, 0, 7)]
        scores = torch.cat([be.score(s1, s2, method, 1.0) for s1, s2 in sums])
        for shift, prefix in ((16, 0), (0, int(ref._bits(scores)[500]) >> 16)):
            h, h_ref = torch.zeros(2, HIST, dtype=torch.int64, device=DEV)
            be.score_histogram_many_(
                [s[0] for s in sums], [s[1] for s in sums], method, 1.0, h, shift, prefix
            )
            ref.histogram_(scores, h_ref, shift, prefix)
            assert torch.equal(h, h_ref)


def _takes_replicas(be) -> bool:
    """The Triton and CUDA kernels count into R replicas of a histogram; the C++ CPU ones
    into one (the selection gives replicas on GPUs only: ``_select._new_hist``)."""
    return be.name != "cpu"


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_score_histogram_into_replicas(be, seed, replicas):
    """A histogram of R replicas: they sum to the reference's one histogram, and with
    several blocks more than one replica is used; the CPU kernels refuse R > 1."""
    gen = _gen(seed)
    n = 5000  # 5 Triton programs, 20 CUDA blocks
    s1, s2 = rnd(n, gen), rnd(n, gen).abs()
    sc = be.score(s1, s2, "piece-s", 1.0)
    for shift, prefix in ((16, 0), (0, int(ref._bits(sc)[n // 3]) >> 16)):
        start = torch.randint(0, 7, (replicas * HIST,), generator=gen).to(DEV)
        h = start.clone()
        if replicas > 1 and not _takes_replicas(be):
            with pytest.raises(RuntimeError, match="65536 bins"):
                be.score_histogram_many_([s1], [s2], "piece-s", 1.0, h, shift, prefix)
            assert torch.equal(h, start)
            continue
        h_ref = torch.zeros(HIST, dtype=torch.int64, device=DEV)
        be.score_histogram_many_([s1], [s2], "piece-s", 1.0, h, shift, prefix)
        ref.histogram_(sc, h_ref, shift, prefix)
        added = (h - start).view(replicas, HIST)
        assert torch.equal(added.sum(0), h_ref), (shift, prefix)
        if replicas > 1 and shift == 16:
            assert int((added.sum(1) > 0).sum()) > 1, "every block counted into one replica"


def test_reference_histogram_replicas_and_bad_sizes(seed):
    gen = _gen(seed)
    sc = rnd(300, gen).abs()
    h = torch.zeros(3 * HIST, dtype=torch.int64, device=DEV)
    one = torch.zeros(HIST, dtype=torch.int64, device=DEV)
    ref.histogram_(sc, h, 16, 0)
    ref.histogram_(sc, one, 16, 0)
    assert torch.equal(h.view(3, -1).sum(0), one)
    with pytest.raises(ValueError, match="65536 bins"):
        ref.histogram_(sc, torch.zeros(1000, dtype=torch.int64, device=DEV), 16, 0)


def test_global_topk_with_replicated_histograms(be, seed, monkeypatch):
    """The selection path of GPUs (R replicas per pass, summed) selects exactly what one
    histogram selects; run with every backend that takes replicas, on any device."""
    from piece_optim import _select

    if not _takes_replicas(be):
        assert _select._new_hist(torch.device("cpu")).numel() == HIST  # never given R > 1
        return
    gen = _gen(seed)
    sums = [(rnd(n, gen), rnd(n, gen).abs()) for n in (7, 2500, 1031)]
    total = sum(s2.numel() for _, s2 in sums)

    def run(k):
        srcs = [F.ScoreSource(s1, s2, s2.numel(), torch.int32, be) for s1, s2 in sums]
        return F.global_topk(srcs, k, "piece-s", 1.0)

    ks = (1, int(torch.randint(2, total, (1,), generator=gen)), total)
    want = [run(k) for k in ks]
    monkeypatch.setattr(
        _select,
        "_new_hist",
        lambda device: torch.zeros(4 * HIST, dtype=torch.int64, device=device),
    )
    for k, w in zip(ks, want, strict=True):
        got = run(k)
        assert sum(i.numel() for i in got) == k
        for a, b in zip(got, w, strict=True):
            assert torch.equal(a, b), f"k={k}"


# -- compaction and the global top-k ----------------------------------------------------------
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_compact_matches_reference(be, seed, index_dtype):
    gen = _gen(seed)
    for n in (1, 7, 1031, 2500):
        sc = _scores_with_ties(n, gen)
        bits = ref._bits(sc)
        for thr in {int(bits[0]), int(bits[n // 2]), int(bits.max()), 0}:
            n_eq_all = int((bits == thr).sum())
            for take_eq in sorted({0, 1, n_eq_all // 2, n_eq_all, n_eq_all + 3, n}):  # n: all
                idx, n_eq = be.score_compact(None, sc, "piece-f", 0.0, thr, take_eq, index_dtype)
                idx_ref, n_eq_ref = ref.compact(sc, thr, take_eq, index_dtype)
                assert n_eq == n_eq_ref, (n, thr, take_eq)
                assert idx.dtype == index_dtype
                assert torch.equal(idx, idx_ref), (n, thr, take_eq)
    empty = torch.empty(0, device=DEV)
    idx, n_eq = be.score_compact(None, empty, "piece-f", 0.0, 5, 3, torch.int32)
    assert idx.numel() == 0 and n_eq == 0


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_score_compact_from_the_sums(be, seed, method):
    gen = _gen(seed)
    s1 = rnd(2100, gen)
    s2 = rnd(2100, gen).abs()
    s2[::3] = s2[0]  # ties
    s1[::3] = s1[0]
    sc = be.score(s1, s2, method, 1.0)  # the fused pass must select on exactly these
    thr = int(ref._bits(sc)[0])
    for take_eq in (0, 1, 350, 10**6):
        got = be.score_compact(s1, s2, method, 1.0, thr, take_eq, torch.int32)
        want = ref.compact(sc, thr, take_eq, torch.int32)
        assert got[1] == want[1]
        assert torch.equal(got[0], want[0])


class RefOnKernelScores(ref.ReferenceBackend):
    """The reference selection ops, fed the backend's own scores: selection is then
    compared exactly, without the scores' documented ulps."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def score(self, sum_g, sum_g2, method, eps):
        return self.kernels.score(sum_g, sum_g2, method, eps)


def _topk_case(gen, method, kind):
    sums = []
    for n in (1, 7, 1031, 300):
        s1, s2 = rnd(n, gen), rnd(n, gen).abs()
        if kind == "all_equal":
            s1.fill_(0.75)
            s2.fill_(2.0)
        elif kind == "ties":
            s1, s2 = s1.round(), s2.ceil()
        sums.append((s1 if method == "piece-s" else None, s2))
    return sums


@pytest.mark.parametrize("kind", ["random", "ties", "all_equal"])
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_global_topk_equals_reference(be, seed, kind, method):
    gen = _gen(seed)
    sums = _topk_case(gen, method, kind)
    total = sum(s2.numel() for _, s2 in sums)
    oracle = RefOnKernelScores(be)

    def run(backend, k):
        srcs = [
            F.ScoreSource(s1, s2, s2.numel(), torch.int64 if i == 2 else torch.int32, backend)
            for i, (s1, s2) in enumerate(sums)
        ]
        return F.global_topk(srcs, k, method, 1.0)

    for k in (1, int(torch.randint(2, total, (1,), generator=gen)), total):
        got, want = run(be, k), run(oracle, k)
        assert sum(i.numel() for i in got) == k
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"k={k}"
    if kind == "all_equal":  # the lower global position wins every tie
        got = run(be, 9)
        assert [i.tolist() for i in got] == [[0], list(range(7)), [0], []]


# -- AdamW --------------------------------------------------------------------------------------
_ADAMW_CASES = [
    (F32, F32, False),
    (BF16, BF16, True),
    (BF16, BF16, False),
    (F16, F16, True),
    (F16, F32, False),
    (BF16, F32, True),
]


@pytest.mark.parametrize(
    "pdtype,gdtype,use_master,mode",
    [(*case, mode) for case in _ADAMW_CASES for mode in ("idx32", "dense", "sparse_grad")]
    + [(F32, F32, False, "idx64"), (BF16, BF16, True, "idx64")],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_adamw_matches_reference(be, tol, seed, pdtype, gdtype, use_master, mode):
    gen = _gen(seed)
    for n in (1, 1031):
        p = rnd(n, gen, pdtype, spread=4)
        if mode == "dense":
            idx, k = None, n
        else:
            k = 1 if n == 1 else int(torch.randint(1, n, (1,), generator=gen))
            idx = torch.randperm(n, generator=gen)[:k].sort().values
            idx = idx.to(torch.int64 if mode == "idx64" else torch.int32).to(DEV)
        m, v = torch.zeros(2, k, device=DEV)
        w = (p.float().clone() if idx is None else p.float()[idx.long()]) if use_master else None
        p_r, m_r, v_r = p.clone(), m.clone(), v.clone()
        w_r = w.clone() if w is not None else None
        tol_p, tol_w = WeightTol(tol.w), WeightTol(tol.w)
        p0, w0 = p.clone(), (w.clone() if w is not None else None)
        sparse = mode == "sparse_grad"
        for step in range(1, 8):
            p_old, w_old = p_r.clone(), (w_r.clone() if w_r is not None else None)
            sc = F.adamw_scalars(
                lr=1e-3 / step,
                beta1=(0.9, 0.3, 0.5)[step % 3],  # 1-beta1 < 0.5 and >= 0.5: both lerp forms
                beta2=(0.999, 0.95)[step % 2],
                eps=1e-8 if step < 5 else 1e-3,
                weight_decay=0.1 * (step % 3),
                step=step,
            )
            g = rnd(k if sparse else n, gen, gdtype, spread=6)
            be.adamw_step_many_([p], [g], [idx], [m], [v], [w], [sc], sparse)
            ref.adamw_apply_(p_r, g, idx, m_r, v_r, w_r, sc, sparse)
            # moments: exact on CPU while the weights never fed back into them
            assert_ulp(m, m_r, tol.acc * step, f"exp_avg n={n} step={step}")
            assert_ulp(v, v_r, tol.acc * step, f"exp_avg_sq n={n} step={step}")
            if w is not None:
                tol_w.check(w, w_r, w_old, f"master n={n} step={step}")
            tol_p.check(p, p_r, p_old, f"param n={n} step={step}")
        if idx is not None:  # entries outside idx: never written, bit for bit
            outside = torch.ones(n, dtype=torch.bool, device=DEV)
            outside[idx.long()] = False
            assert torch.equal(p[outside], p0[outside])
            # the selected entries were written: the fp32 master always moves; a bf16/fp16
            # param moves where the reference's does (7 steps of lr <= 1e-3 can stay under
            # half an ulp of every selected entry: seed 323070201, k small, |p| large)
            if w is not None:
                assert not torch.equal(w, w0)
            if k < n and not torch.equal(p_r, p0):
                assert not torch.equal(p, p0)


def test_adamw_nonfinite_grads_propagate_like_reference(be, tol, seed):
    gen = _gen(seed)
    p = rnd(50, gen)
    idx = torch.arange(0, 50, 2, dtype=torch.int32, device=DEV)
    g = rnd(50, gen)
    g[[0, 4, 8]] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=DEV)
    m, v = rnd(25, gen), rnd(25, gen).abs()
    p_r, m_r, v_r, p_old = p.clone(), m.clone(), v.clone(), p.clone()
    sc = F.adamw_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3)
    be.adamw_step_many_([p], [g], [idx], [m], [v], [None], [sc])
    ref.adamw_apply_(p_r, g, idx, m_r, v_r, None, sc)
    WeightTol(tol.w).check(p, p_r, p_old, "param")
    assert_ulp(m, m_r, tol.acc, "exp_avg")
    assert_ulp(v, v_r, tol.acc, "exp_avg_sq")
    assert p[:5].isnan().sum() >= 2 and not p[1::2].isnan().any()  # odd entries untouched


def test_adamw_many_mixed_tensors_one_call(be, tol, seed, monkeypatch):
    """fp32, bf16 with master, dense, empty selections and two different steps in one call
    (Triton: small tensors batched into shared launches)."""
    if be.name == "triton":
        from piece_optim.kernels import adamw

        monkeypatch.setattr(adamw, "BATCH_NUMEL", 600)
    gen = _gen(seed)
    # (numel, k or None for dense, param dtype, master, step)
    spec = [
        (7, 3, F32, False, 2),
        (1, 1, F32, False, 2),
        (40, 0, F32, False, 2),
        (1031, 700, F32, False, 2),
        (900, 500, F32, False, 2),
        (9, None, F32, False, 2),
        (33, 11, BF16, True, 2),
        (60, 30, BF16, True, 2),
        (50, 20, F32, False, 5),
    ]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.05)
    ours, theirs = [], []
    for n, k, dt, master, step in spec:
        p = rnd(n, gen, dt, spread=4)
        idx = (
            None
            if k is None
            else (torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32).to(DEV))
        )
        kk = n if k is None else k
        m, v = rnd(kk, gen, spread=6), rnd(kk, gen, spread=6).abs()
        w = p.float()[idx.long()] if master else None
        g = rnd(n, gen, dt, spread=6)
        ours.append([p, g, idx, m, v, w, F.adamw_scalars(**hp, step=step)])
        theirs.append([t.clone() if isinstance(t, torch.Tensor) else t for t in ours[-1]])
    old = [[t.clone() if isinstance(t, torch.Tensor) else t for t in row] for row in ours]
    be.adamw_step_many_(*[list(col) for col in zip(*ours, strict=True)])
    for row in theirs:
        ref.adamw_apply_(*row)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_ulp(a[3], b[3], tol.acc, f"exp_avg #{i}")
        assert_ulp(a[4], b[4], tol.acc, f"exp_avg_sq #{i}")
        for j in (0, 5):  # param, master
            if a[j] is not None:
                WeightTol(tol.w).check(a[j], b[j], old[i][j], f"tensor #{i} field {j}")


def test_large_tensor_end_to_end_ops(be, tol, seed):
    """The one-pass ops on a few hundred thousand elements (272 blocks, > 2 CPU chunks of
    65536): accumulate, a histogram pass, and an AdamW step gathering from all over."""
    gen = _gen(seed)
    n = 278011
    g = rnd(n, gen, BF16)
    s1, s2 = rnd(n, gen), rnd(n, gen).abs()
    r1, r2 = s1.clone(), s2.clone()
    be.accumulate_many_([g], [s1], [s2])
    ref.accumulate_(g, r1, r2)
    assert_ulp(s2, r2, tol.acc, "sum_g2")
    assert_ulp(s1, r1, tol.acc, "sum_g")
    hist, hist_ref = torch.zeros(2, HIST, dtype=torch.int64, device=DEV)
    be.score_histogram_many_([s1], [s2], "piece-f", 1.0, hist, 16, 0)
    ref.histogram_(ref.score(r1, r2, "piece-f", 1.0), hist_ref, 16, 0)
    assert torch.equal(hist, hist_ref)
    k = 1 + int(torch.randint(0, 5000, (1,), generator=gen))
    idx = torch.randperm(n, generator=gen)[:k].sort().values.to(DEV)
    idx[-1] = n - 1
    p = rnd(n, gen, spread=4)
    m, v = torch.zeros(2, k, device=DEV)
    p_r, m_r, v_r, p_old = p.clone(), m.clone(), v.clone(), p.clone()
    sc = F.adamw_scalars(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    be.adamw_step_many_([p], [g], [idx], [m], [v], [None], [sc])
    ref.adamw_apply_(p_r, g, idx, m_r, v_r, None, sc)
    WeightTol(tol.w).check(p, p_r, p_old, "param")
    assert_ulp(m, m_r, tol.acc, "exp_avg")


# -- the public classes on each backend ---------------------------------------------------------
def _brute_force_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    """Global top-k by a stable sort: the lower global position wins ties."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).cpu() for n in names])
    top = torch.sort(flat, descending=True, stable=True).indices[:k].sort().values
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        sel = top[(top >= start) & (top < start + size)] - start
        if sel.numel():
            out[n] = sel.tolist()
        start += size
    return out


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("accum_dtype", [F32, BF16], ids=str)
def test_estimator_equals_reference(be, tol, seed, no_env_backend, method, accum_dtype):
    """Scores within the backend's ulps of the reference's; each mask equals a brute-force
    top-k of the backend's own scores; bit-exact scores give the reference's mask."""
    torch.manual_seed(seed)
    model = TinyNet()
    results = {}
    for name in (be.name, "torch"):
        est = po.ImportanceEstimator(model, method=method, accum_dtype=accum_dtype, backend=name)
        for x, y in batches(3, seed):
            model.loss(x, y).backward()
            est.collect()
        results[name] = (est.scores(), est.select(ratio=0.05), est.select(k=1))
        est.close()
    (sc_b, m_b, k1_b), (sc_r, m_r, k1_r) = results[be.name], results["torch"]
    assert sc_b.keys() == sc_r.keys()
    for name in sc_b:
        assert_ulp(sc_b[name], sc_r[name], 3 * tol.score(method), name)
    for mask, k in ((m_b, m_r.numel_selected()), (k1_b, 1)):
        want = _brute_force_mask(sc_b, k)
        assert mask.numel_selected() == k
        assert sorted(mask.names()) == sorted(want)
        for name, idx in want.items():
            assert mask[name].tolist() == idx, name
    if all(torch.equal(sc_b[n], sc_r[n]) for n in sc_b):
        assert m_b == m_r and k1_b == k1_r


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_sparse_adamw_equals_reference(be, tol, seed, no_env_backend, dtype, tmp_path):
    """8 steps with a state_dict save/reload after step 4; params and every state tensor
    compared.  Both models get the same gradients (the reference model's), so the weights'
    documented ulps do not feed back through the loss."""
    torch.manual_seed(seed)
    base = TinyNet().to(DEV, dtype)
    mask = {
        n: torch.randperm(p.numel())[: max(1, p.numel() // 7)].sort().values.int()
        for n, p in base.named_parameters()
        if p.numel() and p.requires_grad
    }
    models = {b: TinyNet().to(DEV, dtype) for b in (be.name, "torch")}
    for m in models.values():
        m.load_state_dict(base.state_dict())

    def make(b: str) -> po.SparseAdamW:
        return po.SparseAdamW(
            models[b].named_parameters(),
            mask=mask,
            lr=1e-2,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            backend=b,
        )

    opts = {b: make(b) for b in models}
    pb, pr = dict(models[be.name].named_parameters()), dict(models["torch"].named_parameters())
    tols = {key: WeightTol(tol.w) for name in pb for key in (name, name + ".master")}
    for step, (x, y) in enumerate(batches(8, seed), 1):
        old = {name: p.detach().clone() for name, p in pr.items()}
        old.update(
            {
                n + ".master": opts["torch"].state[p]["master"].clone()
                for n, p in pr.items()
                if "master" in opts["torch"].state.get(p, {})
            }
        )
        for o in opts.values():
            o.zero_grad()
        models["torch"].loss(x, y).backward()
        for name, p in pr.items():
            if p.grad is not None:
                pb[name].grad = p.grad.clone()
        for o in opts.values():
            o.step()
        if step == 4:
            for b in models:
                torch.save(opts[b].state_dict(), tmp_path / f"{b}.pt")
                opts[b] = make(b)
                opts[b].load_state_dict(torch.load(tmp_path / f"{b}.pt"))
        for name in pb:
            tols[name].check(pb[name], pr[name], old[name], f"{name} step {step}")
            st, sr = opts[be.name].state[pb[name]], opts["torch"].state[pr[name]]
            assert st.keys() == sr.keys()
            for key in st:
                if key == "idx":
                    assert torch.equal(st[key], sr[key])
                elif key == "master":
                    # before step 1 the master did not exist: it starts as the param's entries
                    mo = old.get(name + ".master", old[name].reshape(-1)[sr["idx"].long()])
                    tols[name + ".master"].check(st[key], sr[key], mo, f"{name}.master {step}")
                elif key != "step":
                    assert_ulp(st[key], sr[key], tol.acc * step, f"{name}.{key} step {step}")
                else:
                    assert float(st[key]) == float(sr[key]) == step


# -- the rule: one registry, an explicit choice raises, "auto" moves on ---------------------------
def test_explicit_backend_refuses_what_it_cannot_take(be, no_env_backend, seed):
    """float64 parameters and gradients are not a kernel dtype: a backend named explicitly
    raises naming the backend, the op and the reason; "auto" runs them on the reference,
    in float64 (as torch's AdamW), bit for bit, and logs why once."""
    g = _gen(seed)
    p = torch.nn.Parameter(torch.randn(40, generator=g, dtype=torch.float64).to(DEV))
    opt = po.SparseAdamW([p], mask={p: torch.tensor([0, 3, 39])}, lr=1e-2, backend=be.name)
    p.grad = torch.randn(40, generator=g, dtype=torch.float64).to(DEV)
    with pytest.raises(po.BackendUnavailableError, match=rf"{be.name}.*adamw.*float64"):
        opt.step()
    assert float(opt.state[p]["step"]) == 0  # the counter rolled back; nothing written
    model = TinyNet().double()
    est = po.ImportanceEstimator(model, backend=be.name)
    model.loss(*batches(1, seed)[0]).backward()
    with pytest.raises(po.BackendUnavailableError, match=r"accumulate.*float64"):
        est.collect()
    est.close()
    auto = backends.resolve("auto", "adamw", p.device, (torch.float64, torch.float64))
    assert auto.name == "torch"
    assert "float64" in " ".join(backends.explain("adamw", p.device, (torch.float64,) * 2)[be.name])


def test_auto_passes_over_a_backend_for_an_input_and_says_why(no_env_backend, caplog, seed):
    f64 = torch.float64
    backends._said.discard(("adamw", DEV.type, (f64, f64)))
    backends._decisions.clear()
    with caplog.at_level(logging.INFO, logger="piece_optim"):
        be = backends.resolve("auto", "adamw", DEV, (f64, f64))
    assert be.name == "torch"
    first = backends.resolve("auto", "adamw", DEV, (F32, F32))
    if first.name != "torch":  # a kernel backend loaded here: auto said why it passed it over
        assert f"runs on backend 'torch'; passed over {first.name}: " in caplog.text
        assert "the parameter is float64" in caplog.text
        n_lines = caplog.text.count("passed over")
        backends._decisions.clear()
        backends.resolve("auto", "adamw", DEV, (f64, f64))
        assert caplog.text.count("passed over") == n_lines  # once per kind of input


def test_unknown_backend_names_every_registered_one(monkeypatch):
    with pytest.raises(ValueError, match="'auto', 'torch', 'cpu', 'cuda', 'triton'"):
        po.SparseAdamW([torch.nn.Parameter(torch.zeros(2))], backend="gpu")
    monkeypatch.setenv("PIECE_OPTIM_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable PIECE_OPTIM_BACKEND"):
        backends.get_backend("auto", "cpu")


@pytest.mark.cpu_only("the reference's chunking on CPU tensors")
def test_only_backends_that_ask_get_chunks(seed, monkeypatch, no_env_backend):
    """select() hands the reference 1M-entry pieces (its temporaries) and a kernel backend
    whole tensors (each piece costs it a compaction with a host sync on a GPU); the mask is
    the same."""
    gen = _gen(seed)
    s1, s2 = torch.randn(2500, generator=gen), torch.rand(2500, generator=gen)
    calls: dict[str, int] = {}
    reference = backends.load("torch")
    monkeypatch.setattr(type(reference), "select_chunk", 1000)
    got = {}
    for name in ("torch", *[n for n in ("cpu",) if backends.load(n) is not None]):
        be = backends.load(name)
        real = be.score_compact

        def counting(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(be, "score_compact", counting)
        got[name] = F.select_topk([s1], [s2], 77, "piece-s", 1.0, backend=name)
    assert calls["torch"] == 3  # 2500 entries in pieces of 1000
    if "cpu" in got:
        assert calls["cpu"] == 1
        assert torch.equal(got["cpu"][0], got["torch"][0])
    scores = ref.score(s1, s2, "piece-s", 1.0)
    want = torch.sort(scores, descending=True, stable=True).indices[:77].sort().values
    assert torch.equal(got["torch"][0].long(), want)


# -- the stochastic rounding's hash: the same integers in every implementation -----------------
@pytest.mark.cpu_only("integer arithmetic of the reference")
def test_hash32_in_torch_equals_the_integer_definition(seed):
    gen = _gen(seed)
    xs = torch.randint(0, 2**32, (2000,), generator=gen, dtype=torch.int64)
    xs[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    assert ref._hash32_t(xs).tolist() == [ref.hash32(int(x)) for x in xs]
    key = ref.stochastic_key(seed, 7, 11)
    start = 2**32 - 5  # indices past 2**32 mix their high word in
    bits = ref.stochastic_bits(key, start, 10, "cpu").tolist()
    want = [
        ref.hash32((i & 0xFFFFFFFF) ^ ref.hash32((i >> 32) ^ key)) for i in range(start, start + 10)
    ]
    assert bits == want
    assert len(set(bits)) == 10 and ref.stochastic_key(seed, 8, 11) != key


# -- backend-specific entry points ---------------------------------------------------------------
def _native_cpu():
    be = backends.load("cpu")
    if be is None:
        pytest.skip(f"the C++ extension is unavailable: {backends.explain('adamw')['cpu']}")
    return be


@pytest.mark.cpu_only("the C++ CPU kernels")
@pytest.mark.parametrize("n", [15, 16, 17, 33, 4097, 140001])
def test_cpu_level2_filter_groups_and_tail(seed, n):
    """Level 2 tests 16 scores at a time and filters only groups that may match: matches at
    group edges, in the tail, in bins above the prefix, and ties; the candidates kept for
    the compaction are exactly those whose top bits reach the prefix."""
    be = _native_cpu()
    g = _gen(seed)
    s2 = torch.rand(n, generator=g) * 0.25  # top bits below the prefix bin
    top = int(torch.tensor(1.5).view(torch.int32)) >> 16
    pos = torch.randint(0, n, (max(1, n // 50),), generator=g).tolist() + [0, n - 1]
    pos += [p for p in (15, 16, 31, 32, n - 17, n - 16) if 0 <= p < n]
    s2[pos] = 1.5 + torch.randint(0, 3, (len(pos),), generator=g).float() / 1024  # in-bin ties
    s2[torch.randint(0, n, (max(1, n // 200),), generator=g)] = 3.0  # above the bin
    h, r = torch.zeros(HIST, dtype=torch.int64), torch.zeros(HIST, dtype=torch.int64)
    be.score_histogram_many_([None], [s2], "piece-f", 0.0, h, 16, 0)  # a new selection
    h.zero_()
    be.score_histogram_many_([None], [s2], "piece-f", 0.0, h, 0, top)
    ref.histogram_(s2, r, 0, top)
    assert torch.equal(h, r) and int(h.sum()) > 0
    cand = be._cand.pop(id(s2))[2]
    expect = torch.nonzero((s2.view(torch.int32) >> 16) >= top).flatten()
    assert torch.equal(cand.to(torch.int64), expect)


@pytest.mark.cpu_only("the C++ CPU kernels")
def test_cpu_candidate_cache_used_and_invalidated(seed):
    be = _native_cpu()
    g = _gen(seed)
    s1, s2 = torch.randn(140001, generator=g) * 4, torch.rand(140001, generator=g) * 10
    sc = ref.score(s1, s2, "piece-s", 1.0)
    top = int(sc.view(torch.int32).max()) >> 16
    h = torch.zeros(HIST, dtype=torch.int64)
    be.score_histogram_many_([s1], [s2], "piece-s", 1.0, h, 16, 0)  # new selection: cleared
    be.score_histogram_many_([s1], [s2], "piece-s", 1.0, h, 0, top)
    assert id(s2) in be._cand, "the 2nd-level pass kept no candidates"
    thr = int(sc.view(torch.int32).max())
    idx, n_eq = be.score_compact(s1, s2, "piece-s", 1.0, thr, 1, torch.int32)
    assert id(s2) not in be._cand
    assert torch.equal(idx, ref.compact(sc, thr, 1, torch.int32)[0]) and n_eq == 1
    # a tensor changed after the histogram pass must not be served from the cache
    be.score_histogram_many_([s1], [s2], "piece-s", 1.0, h, 0, top)
    s2.mul_(0.25)
    thr = int(ref.score(s1, s2, "piece-s", 1.0).view(torch.int32).kthvalue(140001 - 100).values)
    idx, n_eq = be.score_compact(s1, s2, "piece-s", 1.0, thr, 5, torch.int32)
    e_idx, e_eq = ref.compact(ref.score(s1, s2, "piece-s", 1.0), thr, 5, torch.int32)
    assert torch.equal(idx, e_idx) and n_eq == e_eq and idx.numel() > 50


@pytest.mark.cpu_only("the C++ CPU kernels")
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(seed, threads):
    """Serial path (1 thread) and more threads than cores: the reference's results."""
    be = _native_cpu()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = _gen(seed)
        s1, s2 = torch.randn(140001, generator=g), torch.rand(140001, generator=g)
        grad = torch.randn(140001, generator=g)
        r1, r2 = s1.clone(), s2.clone()
        be.accumulate_many_([grad], [s1], [s2])
        ref.accumulate_(grad, r1, r2)
        assert_ulp(s2, r2, tol_of("cpu").acc, "sum_g2")
        assert torch.equal(s1, r1)
        sc = ref.score(s1, s2, "piece-s", 1.0)
        h, r = torch.zeros(HIST, dtype=torch.int64), torch.zeros(HIST, dtype=torch.int64)
        be.score_histogram_many_([s1], [s2], "piece-s", 1.0, h, 16, 0)
        ref.histogram_(sc, r, 16, 0)
        assert torch.equal(h, r)
        thr = int(sc.view(torch.int32).kthvalue(140001 - 500).values)
        idx, n_eq = be.score_compact(s1, s2, "piece-s", 1.0, thr, 1, torch.int32)
        e_idx, e_eq = ref.compact(sc, thr, 1, torch.int32)
        assert torch.equal(idx, e_idx) and n_eq == e_eq
    finally:
        torch.set_num_threads(before)


@pytest.mark.cpu_only("the C++ CPU ops")
def test_cpu_ops_schemas_fakes_and_errors():
    """torch.library.opcheck (schemas, mutation marks, fakes) and the ops' own errors."""
    _native_cpu()
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(300, generator=g), torch.rand(300, generator=g)
    hist = torch.zeros(HIST, dtype=torch.int64)
    ops = torch.ops.piece_optim
    grad = torch.randn(300, generator=g)
    torch.library.opcheck(ops.accumulate_many_.default, ([grad], [s1], [s2], []))
    torch.library.opcheck(ops.score.default, (s1, s2, "piece-s", 1.0))
    # not score_histogram_many_: torch 2.13's functionalization refuses a custom op that
    # mutates an input and returns a tensor list; selection calls it eagerly only
    p, m, v = torch.randn(300, generator=g), torch.zeros(300), torch.zeros(300)
    torch.library.opcheck(
        ops.adamw_step_many_.default,
        (
            [p],
            [torch.randn(300, generator=g)],
            [None],
            [m],
            [v],
            [torch.empty(0)],
            [0.1],
            [0.3],
            0.99,
            0.1,
            0.999,
            1e-3,
            1e-8,
            False,
        ),
    )
    with pytest.raises(RuntimeError, match="hist must be a contiguous int64"):
        ops.score_histogram_many_([torch.empty(0)], [s2], "piece-f", 0.0, hist.int(), 16, 0, [])
    with pytest.raises(RuntimeError, match="method must be 'piece-f' or 'piece-s'"):
        ops.score(None, s2, "fisher", 1.0)
    with pytest.raises(RuntimeError, match="piece-s needs sum_g"):
        ops.score(None, s2, "piece-s", 1.0)
    with pytest.raises(RuntimeError, match="grad has 9 elements but sum_g2 has 300"):
        ops.accumulate_many_([torch.rand(9)], [torch.empty(0)], [s2], [])
    with pytest.raises(RuntimeError, match="the kernels take float32, bfloat16 or float16"):
        ops.accumulate_many_([grad.double()], [torch.empty(0)], [s2], [])
    with pytest.raises(RuntimeError, match="a stochastic-rounding key is a uint32"):
        ops.accumulate_many_([grad], [torch.empty(0)], [s2.bfloat16()], [2**32])
    with pytest.raises(RuntimeError, match="index_dtype must be torch.int32 or torch.int64"):
        ops.compact(None, s2, "piece-f", 0.0, 0, 0, torch.int16)


def test_triton_runtime_scalars_are_not_constexpr():
    """lr, betas, eps, weight decay, step and the rounding key are runtime arguments: no
    recompiles."""
    pytest.importorskip("triton")
    from piece_optim.kernels import accumulate, adamw, compact, histogram, score

    kernels = [
        adamw._adamw_kernel,
        adamw._adamw_many_kernel,
        accumulate._accumulate_kernel,
        accumulate._accumulate_many_kernel,
        score._score_kernel,
        histogram._histogram_kernel,
        compact._compact_count_kernel,
        compact._compact_kernel,
    ]
    runtime = {
        "decay",
        "lerp_c",
        "lerp_small",
        "beta2",
        "one_m_beta2",
        "bc2_sqrt",
        "eps",
        "neg_step_size",
        "shift",
        "prefix",
        "thr",
        "take_eq",
        "n",
        "key",
    }
    for kern in kernels:
        params = inspect.signature(getattr(kern, "fn", kern)).parameters.values()
        const = {p.name for p in params if "constexpr" in str(p.annotation)}
        assert const, kern
        assert all(c.isupper() for c in const), const
        assert not const & runtime


def test_triton_device_rules(monkeypatch):
    tb = backends.load("triton")
    if tb is None:
        pytest.skip(f"triton does not load: {backends.explain('adamw')['triton']}")
    f32 = (F32, F32)
    assert not tb.not_supported_reasons("adamw", torch.device("cuda"), f32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = tb.not_supported_reasons("adamw", torch.device("cpu"), f32)
    assert why and "TRITON_INTERPRET=1" in why[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tb.not_supported_reasons("adamw", torch.device("cpu"), f32)
    monkeypatch.delenv("PIECE_OPTIM_BACKEND", raising=False)
    backends._decisions.clear()
    assert backends.get_backend("auto", "cpu").name != "triton"  # never automatic on CPU
    assert backends.get_backend("triton", DEV).name == "triton"
