"""The Triton kernels (and, on a GPU, the CUDA kernels) against piece_optim._reference.

The conformance tests take the ``be`` fixture: the Triton backend everywhere and, when
PIECE_OPTIM_TEST_DEVICE=cuda, the CUDA extension's backend too (``KERNEL_BACKENDS``), so
both GPU backends meet the same ulp bounds on the same fresh random inputs.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so sizes stay small; one test runs a few hundred thousand elements.

Tolerances, and why.  The kernels use the reference's fp32 operations in the reference's
order, including the fmas torch's vectorised CPU kernels use for ``addcmul_`` / ``lerp_``,
so wherever the reference itself is IEEE-rounded they match it bit for bit (0 ulp):
accumulation, PIECE-F scores, histograms, compaction, AdamW moments.  The one exception
is square root: torch's vectorised fp32 ``sqrt`` on CPU is faithful, not correctly
rounded (measured: <= 1 ulp from IEEE, on 17% of inputs), while the kernels use IEEE
``sqrt_rn``.  Hence PIECE-S scores may differ by <= 2 ulp (1 from the sqrt, 1 from the
division), and AdamW weights by a few ulps per step (``W_ULP``) while the moments stay
exact.  Selection is checked exactly against the reference run on the kernels' own scores.
On a GPU the reference runs torch's CUDA kernels, which order addcmul/addcdiv
differently and divide by a scalar through its reciprocal: tolerances double there.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from helpers import DEVICE, TinyNet, batches

import piece_optim as po
from piece_optim import _reference as ref
from piece_optim._backends import TorchBackend, get_backend
from piece_optim._select import ScoreSource, global_topk

# numpy, running the interpreter, warns on 0/0 and x/0, which the NaN/eps=0 cases do on purpose
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning"),
]
DEV = DEVICE
_GPU = DEV.type == "cuda"


def _kernel_backends() -> list[str]:
    """The kernel backends under test: on a GPU the one PIECE_OPTIM_BACKEND names (a GPU
    test stage per backend), else both; on the CPU the Triton interpreter."""
    if not _GPU:
        return ["triton"]
    env = os.environ.get("PIECE_OPTIM_BACKEND", "").strip().lower()
    return [env] if env in ("triton", "cuda") else ["triton", "cuda"]


KERNEL_BACKENDS = _kernel_backends()
ACC_ULP = 2 if _GPU else 0  # accumulators, AdamW moments
SCORE_S_ULP = 2  # PIECE-S: the reference's sqrt is <= 1 ulp off IEEE, plus the division
# AdamW weights, per step: the update u carries <= ~3 ulp(u) from the reference's sqrt
# (and, on a GPU, the op order), and |u| <= |w_new| + |w_old|; see WeightTol.
W_ULP = 8 if _GPU else 4
SIZES = (0, 1, 7, 1031)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
_MANT = {F32: 23, BF16: 7, F16: 10}


def score_ulp(method: str) -> int:
    return SCORE_S_ULP if method == "piece-s" else ACC_ULP


class RefOnKernelScores(TorchBackend):
    """The reference selection ops, fed the Triton kernels' own scores: selection is then
    compared exactly, without the reference sqrt's <= 1 ulp deviation."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def score(self, sum_g, sum_g2, method, eps):
        return self.kernels.score(sum_g, sum_g2, method, eps)


def _make_backend(name: str):
    if name == "cuda":
        from piece_optim._ext_backend import CudaBackend

        backend = CudaBackend()
    else:
        from piece_optim._triton_backend import TritonBackend

        backend = TritonBackend()
    ok, why = backend.supports(DEV)
    assert ok, why
    return backend


@pytest.fixture(scope="module", params=KERNEL_BACKENDS)
def be(request):
    """The kernel backend itself: PIECE_OPTIM_BACKEND (which get_backend obeys) must not
    swap it for another one in the other CI configurations."""
    return _make_backend(request.param)


@pytest.fixture(scope="module")
def tbe():
    """The Triton backend, for tests of Triton-only entry points (e.g. the fused histogram)."""
    return _make_backend("triton")


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


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to integers that order like the values (adjacent floats differ by 1)."""
    ity = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}[x.dtype]
    i = x.contiguous().view(ity).long()
    sign = (1 << (8 * x.element_size() - 1)) - 1
    return torch.where(i < 0, -(i & sign), i)


def assert_ulp(actual: torch.Tensor, expected: torch.Tensor, max_ulp: int, what: str) -> None:
    """At most ``max_ulp`` ulps apart elementwise; NaN exactly where the reference has NaN."""
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    a, e = actual.detach().reshape(-1).cpu(), expected.detach().reshape(-1).cpu()
    nan = e.isnan()
    assert torch.equal(a.isnan(), nan), f"{what}: NaN positions differ"
    if a.numel():
        d = (_ordered(a[~nan]) - _ordered(e[~nan])).abs()
        worst = int(d.max()) if d.numel() else 0
        assert worst <= max_ulp, f"{what}: {worst} ulp apart (allowed {max_ulp})"


def ulp_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |x| (fp32 tensor)."""
    _, e = torch.frexp(x.detach().float().cpu())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32, device="cpu"), e - 1 - _MANT[dtype])


class WeightTol:
    """Elementwise bound on |w_kernel - w_reference| over AdamW steps.

    Per step: ``W_ULP`` fp32 ulps of ``|w_old| + |w_new|`` (which bounds the update whose
    last bits differ), plus one ulp of the storage dtype (the final rounding may flip);
    the bound carries over from step to step.  Relative to the weights, not the result:
    w_new can cancel to ~0 while the update was large.
    """

    def __init__(self) -> None:
        self.tol: torch.Tensor | float = 0.0

    def check(self, got: torch.Tensor, want: torch.Tensor, old: torch.Tensor, what: str):
        scale = want.detach().float().abs().cpu() + old.detach().float().abs().cpu()
        self.tol = self.tol + W_ULP * ulp_of(scale, F32) + (
            ulp_of(want, want.dtype) if want.dtype != F32 else 0.0)  # fmt: skip
        err = (got.detach().float().cpu() - want.detach().float().cpu()).abs()
        nan = want.detach().float().cpu().isnan()
        assert torch.equal(got.detach().float().cpu().isnan(), nan), f"{what}: NaN positions"
        bad = (err > self.tol) & ~nan
        assert not bad.any(), f"{what}: error {err[bad].max().item():.3g} over the bound"


# -- accumulate -------------------------------------------------------------------------
@pytest.mark.parametrize("gdtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("adtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("piece_s", [False, True], ids=["piece-f", "piece-s"])
def test_accumulate_matches_reference(be, seed, gdtype, adtype, piece_s):
    gen = _gen(seed)
    for n in SIZES:
        s1 = rnd(n, gen, adtype) if piece_s else None
        s2 = rnd(n, gen, F32).abs().to(adtype)
        r1 = s1.clone() if piece_s else None
        r2 = s2.clone()
        for term in range(2):
            g = rnd(n, gen, gdtype)
            be.accumulate_(g, s1, s2)
            ref.accumulate_(g, r1, r2)
            if piece_s:
                assert_ulp(s1, r1, ACC_ULP, f"sum_g n={n} term={term}")
            assert_ulp(s2, r2, ACC_ULP, f"sum_g2 n={n} term={term}")


def test_accumulate_special_values(be, seed):
    """NaN / inf / -inf / zeros / subnormals propagate as in the reference."""
    gen = _gen(seed)
    for adtype in (F32, BF16):
        g = rnd(40, gen)
        g[[1, 5, 9, 20]] = torch.tensor(
            [float("nan"), float("inf"), -float("inf"), 0.0], device=DEV
        )
        g[[2, 3]] = torch.tensor([1e-40, -3e-39], device=DEV)  # fp32 subnormals
        s1 = rnd(40, gen, adtype)
        s2 = rnd(40, gen).abs().to(adtype)
        s2[7] = float("inf")
        r1, r2 = s1.clone(), s2.clone()
        be.accumulate_(g, s1, s2)
        ref.accumulate_(g, r1, r2)
        assert_ulp(s1, r1, ACC_ULP, f"sum_g {adtype}")
        assert_ulp(s2, r2, ACC_ULP, f"sum_g2 {adtype}")
        for method in ("piece-f", "piece-s"):
            got, want = be.score(s1, s2, method, 1.0), ref.score(r1, r2, method, 1.0)
            assert_ulp(got, want, score_ulp(method), method)


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_accumulate_fused_histogram(tbe, seed, method):
    from piece_optim.kernels.accumulate import accumulate_triton

    gen = _gen(seed)
    for adtype in (F32, BF16):
        n = 1031
        s1 = rnd(n, gen, adtype) if method == "piece-s" else None
        s2 = rnd(n, gen).abs().to(adtype)
        r1 = s1.clone() if s1 is not None else None
        r2 = s2.clone()
        g = rnd(n, gen, BF16)
        hist = torch.randint(0, 9, (ref.HIST_BINS,), generator=gen).to(DEV)
        hist_ref = hist.clone()
        accumulate_triton(g, s1, s2, hist=hist, method=method, eps=0.5)
        ref.accumulate_(g, r1, r2)
        ref.histogram_(tbe.score(r1, r2, method, 0.5), hist_ref, 16, 0)
        assert_ulp(s2, r2, ACC_ULP, "sum_g2")
        assert torch.equal(hist, hist_ref)
        # second level, fused too
        top = int(ref._bits(tbe.score(r1, r2, method, 0.5))[n // 2]) >> 16
        hist2, hist2_ref = torch.zeros_like(hist), torch.zeros_like(hist)
        g = rnd(n, gen, F32)
        accumulate_triton(g, s1, s2, hist=hist2, method=method, eps=0.5, shift=0, prefix=top)
        ref.accumulate_(g, r1, r2)
        ref.histogram_(tbe.score(r1, r2, method, 0.5), hist2_ref, 0, top)
        assert torch.equal(hist2, hist2_ref)


def test_accumulate_many_batches_small_tensors(be, seed, monkeypatch):
    from piece_optim.kernels import accumulate

    monkeypatch.setattr(accumulate, "BATCH_NUMEL", 600)  # 1031 launches alone, others batch
    gen = _gen(seed)
    spec = [(7, F32, F32, True), (0, F32, F32, True), (1, F32, F32, True), (599, F32, F32, True),
            (1031, F32, F32, True), (5, BF16, F32, False), (300, BF16, F32, False),
            (13, F16, BF16, True), (77, F16, BF16, True), (9, F32, (F32, BF16), True)]  # fmt: skip
    grads, s1s, s2s, r1s, r2s = [], [], [], [], []
    for n, gdt, adt, has_g in spec:
        adt1, adt2 = adt if isinstance(adt, tuple) else (adt, adt)  # mixed: sum_g, sum_g2
        grads.append(rnd(n, gen, gdt))
        s1s.append(rnd(n, gen, adt1) if has_g else None)
        s2s.append(rnd(n, gen).abs().to(adt2))
        r1s.append(s1s[-1].clone() if has_g else None)
        r2s.append(s2s[-1].clone())
    be.accumulate_many_(grads, s1s, s2s)
    for g, r1, r2 in zip(grads, r1s, r2s, strict=True):
        ref.accumulate_(g, r1, r2)
    for i in range(len(spec)):
        if s1s[i] is not None:
            assert_ulp(s1s[i], r1s[i], ACC_ULP, f"sum_g #{i}")
        assert_ulp(s2s[i], r2s[i], ACC_ULP, f"sum_g2 #{i}")


# -- score and histogram ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("adtype", [F32, BF16], ids=str)
def test_score_matches_reference(be, seed, method, adtype):
    from piece_optim.kernels.score import score_triton

    gen = _gen(seed)
    for n in SIZES:
        s1 = rnd(n, gen, adtype)
        s2 = rnd(n, gen).abs().to(adtype)
        if n >= 7:
            s1[:3] = 0.0
            s2[1:4] = 0.0  # with eps=0: 0/0 -> score 0 (index 1, 2), x/0 -> 0 (index 3)
        for eps in (1.0, 0.0, 1e-8):
            out = torch.full((n,), float("nan"), device=DEV)  # poisoned
            got = score_triton(s1, s2, method, eps, out=out)
            assert got is out
            want = ref.score(s1, s2, method, eps)
            assert_ulp(got, want, score_ulp(method), f"n={n} eps={eps}")
            assert_ulp(be.score(s1, s2, method, eps), want, score_ulp(method), "backend")


def _scores_with_ties(n: int, gen: torch.Generator) -> torch.Tensor:
    """Non-negative scores over many bins, with many exact duplicates."""
    pool = rnd(max(n // 4, 1), gen).abs()
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen).to(DEV)]


def test_histogram_matches_reference(be, seed):
    gen = _gen(seed)
    for n in SIZES:
        sc = _scores_with_ties(n, gen)
        if n >= 7:
            sc[[0, 3, 6]] = torch.tensor([float("nan"), float("inf"), -1.5], device=DEV)
        hist = torch.randint(0, 5, (ref.HIST_BINS,), generator=gen).to(DEV)  # it adds to this
        hist_ref = hist.clone()
        be.histogram_(sc, hist, 16, 0)
        ref.histogram_(sc, hist_ref, 16, 0)
        assert torch.equal(hist, hist_ref), f"level 1, n={n}"
        if n:
            top = (int(ref._bits(sc)[n - 1]) & 0xFFFFFFFF) >> 16
            h2, h2_ref = torch.zeros_like(hist), torch.zeros_like(hist)
            be.histogram_(sc, h2, 0, top)
            ref.histogram_(sc, h2_ref, 0, top)
            assert torch.equal(h2, h2_ref), f"level 2, n={n}"
            assert int(h2.sum()) >= 1


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_score_histogram_fused(be, seed, method):
    gen = _gen(seed)
    for adtype in (F32, BF16):
        s1 = rnd(1031, gen, adtype)
        s2 = rnd(1031, gen).abs().to(adtype)
        sc = be.score(s1, s2, method, 1.0)  # the fused pass must count exactly these
        for shift, prefix in ((16, 0), (0, int(ref._bits(sc)[500]) >> 16)):
            h, h_ref = torch.zeros(2, ref.HIST_BINS, dtype=torch.int64, device=DEV)
            be.score_histogram_(s1, s2, method, 1.0, h, shift, prefix)
            ref.histogram_(sc, h_ref, shift, prefix)
            assert torch.equal(h, h_ref)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_score_histogram_into_replicas(be, seed, replicas):
    """A histogram of R replicas (what the selection gives GPU kernels): the replicas sum
    to the reference's one histogram, and with several blocks more than one is used."""
    gen = _gen(seed)
    n = 5000  # 5 Triton programs, 20 CUDA blocks
    s1, s2 = rnd(n, gen), rnd(n, gen).abs()
    sc = be.score(s1, s2, "piece-s", 1.0)
    for shift, prefix in ((16, 0), (0, int(ref._bits(sc)[n // 3]) >> 16)):
        start = torch.randint(0, 7, (replicas * ref.HIST_BINS,), generator=gen).to(DEV)
        h = start.clone()
        h_ref = torch.zeros(ref.HIST_BINS, dtype=torch.int64, device=DEV)
        be.score_histogram_(s1, s2, "piece-s", 1.0, h, shift, prefix)
        ref.histogram_(sc, h_ref, shift, prefix)
        added = (h - start).view(replicas, ref.HIST_BINS)
        assert torch.equal(added.sum(0), h_ref), (shift, prefix)
        if replicas > 1 and shift == 16:
            assert int((added.sum(1) > 0).sum()) > 1, "every block counted into one replica"


def test_reference_histogram_replicas_and_bad_sizes(seed):
    gen = _gen(seed)
    sc = rnd(300, gen).abs()
    h = torch.zeros(3 * ref.HIST_BINS, dtype=torch.int64)
    one = torch.zeros(ref.HIST_BINS, dtype=torch.int64)
    ref.histogram_(sc, h, 16, 0)
    ref.histogram_(sc, one, 16, 0)
    assert torch.equal(h.view(3, -1).sum(0), one)
    with pytest.raises(ValueError, match="65536 bins"):
        ref.histogram_(sc, torch.zeros(1000, dtype=torch.int64), 16, 0)


def test_global_topk_with_replicated_histograms(tbe, seed, monkeypatch):
    """The selection path GPUs take (R replicas per pass, summed) selects exactly what
    one histogram selects; run here with the Triton kernels on any device."""
    from piece_optim import _select

    gen = _gen(seed)
    sums = [(rnd(n, gen), rnd(n, gen).abs()) for n in (7, 2500, 1031)]
    total = sum(s2.numel() for _, s2 in sums)

    def run(k):
        srcs = [ScoreSource(s1, s2, s2.numel(), torch.int32, tbe) for s1, s2 in sums]
        return global_topk(srcs, k, "piece-s", 1.0)

    ks = (1, int(torch.randint(2, total, (1,), generator=gen)), total)
    want = [run(k) for k in ks]
    monkeypatch.setattr(
        _select, "_new_hist",
        lambda device: torch.zeros(4 * ref.HIST_BINS, dtype=torch.int64, device=device),
    )  # fmt: skip
    for k, w in zip(ks, want, strict=True):
        got = run(k)
        assert sum(i.numel() for i in got) == k
        for a, b in zip(got, w, strict=True):
            assert torch.equal(a, b), f"k={k}"


# -- compaction and global top-k --------------------------------------------------------
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_compact_matches_reference(be, seed, index_dtype):
    gen = _gen(seed)
    for n in (1, 7, 1031, 2500):
        sc = _scores_with_ties(n, gen)
        bits = ref._bits(sc)
        for thr in {int(bits[0]), int(bits[n // 2]), int(bits.max()), 0}:
            n_eq_all = int((bits == thr).sum())
            for take_eq in sorted({0, 1, n_eq_all // 2, n_eq_all, n_eq_all + 3, n}):  # n: all
                idx, n_eq = be.compact(sc, thr, take_eq, index_dtype)
                idx_ref, n_eq_ref = ref.compact(sc, thr, take_eq, index_dtype)
                assert n_eq == n_eq_ref, (n, thr, take_eq)
                assert idx.dtype == index_dtype
                assert torch.equal(idx, idx_ref), (n, thr, take_eq)
    empty, n_eq = be.compact(torch.empty(0, device=DEV), 5, 3, torch.int32)
    assert empty.numel() == 0 and n_eq == 0


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_score_compact_fused(be, seed, method):
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


def _topk_case(gen, method, kind):
    sizes = (1, 7, 1031, 300)
    sums = []
    for n in sizes:
        s1 = rnd(n, gen)
        s2 = rnd(n, gen).abs()
        if kind == "all_equal":
            s1.fill_(0.75)
            s2.fill_(2.0)
        elif kind == "ties":
            s1 = s1.round()
            s2 = s2.ceil()
        sums.append((s1 if method == "piece-s" else None, s2))
    return sums


@pytest.mark.parametrize("kind", ["random", "ties", "all_equal"])
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_global_topk_equals_reference_backend(be, seed, kind, method):
    gen = _gen(seed)
    sums = _topk_case(gen, method, kind)
    total = sum(s2.numel() for _, s2 in sums)
    torch_be = RefOnKernelScores(be)

    def run(backend, k):
        srcs = [ScoreSource(s1, s2, s2.numel(), torch.int32, backend) for s1, s2 in sums]
        return global_topk(srcs, k, method, 1.0)

    for k in (1, int(torch.randint(2, total, (1,), generator=gen)), total):
        got, want = run(be, k), run(torch_be, k)
        assert sum(i.numel() for i in got) == k
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"k={k}"
    if kind == "all_equal":  # the lower global position wins every tie
        got = run(be, 9)
        assert [i.tolist() for i in got] == [[0], list(range(7)), [0], []]


# -- sparse AdamW -----------------------------------------------------------------------
_ADAMW_CASES = [(F32, F32, False), (BF16, BF16, True), (BF16, BF16, False), (F16, F16, True),
                (F16, F32, False), (BF16, F32, True)]  # fmt: skip


@pytest.mark.parametrize(
    "pdtype,gdtype,use_master,mode",
    [(*case, mode) for case in _ADAMW_CASES for mode in ("idx32", "dense", "sparse_grad")]
    + [(F32, F32, False, "idx64"), (BF16, BF16, True, "idx64")],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_adamw_matches_reference(be, seed, pdtype, gdtype, use_master, mode):
    gen = _gen(seed)
    for n in (1, 1031):
        p = rnd(n, gen, pdtype, spread=4)
        if mode == "dense":
            idx = None
            k = n
        else:
            k = 1 if n == 1 else int(torch.randint(1, n, (1,), generator=gen))
            idx = torch.randperm(n, generator=gen)[:k].sort().values
            idx = idx.to(torch.int64 if mode == "idx64" else torch.int32).to(DEV)
        m, v = torch.zeros(2, k, device=DEV)
        if mode == "dense":
            m, v = m.view(p.shape), v.view(p.shape)
        w = (p.float().clone() if idx is None else p.float()[idx.long()]) if use_master else None
        p_r, m_r, v_r = p.clone(), m.clone(), v.clone()
        w_r = w.clone() if w is not None else None
        tol_p, tol_w = WeightTol(), WeightTol()
        p0 = p.clone()
        for step in range(1, 8):
            p_old, w_old = p_r.clone(), (w_r.clone() if w_r is not None else None)
            beta1 = (0.9, 0.3, 0.5)[step % 3]  # 1-beta1 < 0.5 and >= 0.5: both lerp forms
            hyper = dict(
                lr=1e-3 / step,
                beta1=beta1,
                beta2=(0.999, 0.95)[step % 2],
                eps=1e-8 if step < 5 else 1e-3,
                weight_decay=0.1 * (step % 3),
            )
            if mode == "sparse_grad":
                g = rnd(k, gen, gdtype, spread=6)
            else:
                g = rnd(n, gen, gdtype, spread=6)
            sparse = mode == "sparse_grad"
            be.adamw_step_(p, g, idx, m, v, w, step=step, grad_is_sparse=sparse, **hyper)
            ref.adamw_step_(p_r, g, idx, m_r, v_r, w_r, step=step, grad_is_sparse=sparse, **hyper)
            # moments: exact on CPU while the weights never fed back into them
            assert_ulp(m, m_r, ACC_ULP * step, f"exp_avg n={n} step={step}")
            assert_ulp(v, v_r, ACC_ULP * step, f"exp_avg_sq n={n} step={step}")
            if w is not None:
                tol_w.check(w, w_r, w_old, f"master n={n} step={step}")
            tol_p.check(p, p_r, p_old, f"param n={n} step={step}")
        if idx is not None:  # entries outside idx: never written, bit for bit
            outside = torch.ones(n, dtype=torch.bool, device=DEV)
            outside[idx.long()] = False
            assert torch.equal(p[outside], p0[outside])
            if k < n:
                assert not torch.equal(p, p0)


def test_adamw_nonfinite_grads_propagate_like_reference(be, seed):
    gen = _gen(seed)
    p = rnd(50, gen)
    idx = torch.arange(0, 50, 2, dtype=torch.int32, device=DEV)
    g = rnd(50, gen)
    g[[0, 4, 8]] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=DEV)
    m, v = rnd(25, gen), rnd(25, gen).abs()
    p_r, m_r, v_r, p_old = p.clone(), m.clone(), v.clone(), p.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3)
    be.adamw_step_(p, g, idx, m, v, None, **hyper)
    ref.adamw_step_(p_r, g, idx, m_r, v_r, None, **hyper)
    WeightTol().check(p, p_r, p_old, "param")
    assert_ulp(m, m_r, ACC_ULP, "exp_avg")
    assert_ulp(v, v_r, ACC_ULP, "exp_avg_sq")
    assert p[:5].isnan().sum() >= 2 and not p[1::2].isnan().any()  # odd entries untouched


def test_adamw_many_batches_small_tensors(be, seed, monkeypatch):
    from piece_optim.kernels import adamw

    monkeypatch.setattr(adamw, "BATCH_NUMEL", 600)
    gen = _gen(seed)
    # (numel, k or None for dense, param dtype, master, step)
    spec = [(7, 3, F32, False, 2), (1, 1, F32, False, 2), (40, 0, F32, False, 2),
            (1031, 700, F32, False, 2), (900, 500, F32, False, 2), (9, None, F32, False, 2),
            (33, 11, BF16, True, 2), (60, 30, BF16, True, 2), (50, 20, F32, False, 5)]  # fmt: skip
    ours, theirs = [], []
    for n, k, dt, master, step in spec:
        p = rnd(n, gen, dt, spread=4)
        if k is None:
            idx, kk = None, n
        else:
            idx = torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32).to(DEV)
            kk = k
        m, v = rnd(kk, gen, spread=6), rnd(kk, gen, spread=6).abs()
        w = p.float()[idx.long()] if master else None
        g = rnd(n, gen, dt, spread=6)
        ours.append([p, g, idx, m, v, w, step])
        theirs.append([t.clone() if isinstance(t, torch.Tensor) else t for t in ours[-1]])
    old = [[t.clone() if isinstance(t, torch.Tensor) else t for t in row] for row in ours]
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.05)
    be.adamw_step_many_(*[list(col) for col in zip(*ours, strict=True)], **hyper)
    for p, g, idx, m, v, w, step in theirs:
        ref.adamw_step_(p, g, idx, m, v, w, step=step, **hyper)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_ulp(a[3], b[3], ACC_ULP, f"exp_avg #{i}")
        assert_ulp(a[4], b[4], ACC_ULP, f"exp_avg_sq #{i}")
        for j in (0, 5):  # param, master
            if a[j] is not None:
                WeightTol().check(a[j], b[j], old[i][j], f"tensor #{i} field {j}")


def test_runtime_scalars_are_not_constexpr():
    """lr, betas, eps, weight decay and step enter as runtime arguments: no recompiles."""
    from piece_optim.kernels import accumulate, adamw, compact, histogram, score

    kernels = [adamw._adamw_kernel, adamw._adamw_many_kernel, accumulate._accumulate_kernel,
               accumulate._accumulate_many_kernel, score._score_kernel,
               histogram._histogram_kernel, compact._compact_count_kernel,
               compact._compact_kernel]  # fmt: skip
    runtime = {"decay", "lerp_c", "lerp_small", "beta2", "one_m_beta2", "bc2_sqrt", "eps",
               "neg_step_size", "shift", "prefix", "thr", "take_eq", "n"}  # fmt: skip
    for kern in kernels:
        params = inspect.signature(getattr(kern, "fn", kern)).parameters.values()
        const = {p.name for p in params if "constexpr" in str(p.annotation)}
        assert const, kern
        assert all(c.isupper() for c in const), const
        assert not const & runtime


def test_large_tensor_end_to_end_ops(be, seed):
    """The one-pass ops on a few hundred thousand elements (272 blocks): accumulate, a fused
    histogram pass, and an AdamW step gathering from all over the tensor.  (Two-pass
    selection is covered on smaller multi-block tensors above; the interpreter is slow.)"""
    gen = _gen(seed)
    n = 278011
    g = rnd(n, gen, BF16)
    s1, s2 = rnd(n, gen), rnd(n, gen).abs()
    r1, r2 = s1.clone(), s2.clone()
    be.accumulate_(g, s1, s2)
    ref.accumulate_(g, r1, r2)
    assert_ulp(s2, r2, ACC_ULP, "sum_g2")
    assert_ulp(s1, r1, ACC_ULP, "sum_g")
    hist, hist_ref = torch.zeros(2, ref.HIST_BINS, dtype=torch.int64, device=DEV)
    be.score_histogram_(s1, s2, "piece-f", 1.0, hist, 16, 0)
    ref.histogram_(ref.score(r1, r2, "piece-f", 1.0), hist_ref, 16, 0)
    assert torch.equal(hist, hist_ref)
    k = 1 + int(torch.randint(0, 5000, (1,), generator=gen))
    idx = torch.randperm(n, generator=gen)[:k].sort().values.to(DEV)
    idx[-1] = n - 1
    p = rnd(n, gen, spread=4)
    m, v = torch.zeros(2, k, device=DEV)
    p_r, m_r, v_r, p_old = p.clone(), m.clone(), v.clone(), p.clone()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    be.adamw_step_(p, g, idx, m, v, None, **hyper)
    ref.adamw_step_(p_r, g, idx, m_r, v_r, None, **hyper)
    WeightTol().check(p, p_r, p_old, "param")
    assert_ulp(m, m_r, ACC_ULP, "exp_avg")


# -- dispatch and the public classes ----------------------------------------------------
def test_dispatch_rules(monkeypatch):
    from piece_optim._triton_backend import TritonBackend

    tb = TritonBackend()
    assert tb.supports(torch.device("cuda"))[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = tb.supports(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.supports(torch.device("cpu"))[0]
    monkeypatch.delenv("PIECE_OPTIM_BACKEND", raising=False)
    assert get_backend("auto", "cpu").name != "triton"  # the interpreter is never automatic
    assert get_backend("triton", DEV).name == "triton"


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


@pytest.mark.parametrize("kernels", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("accum_dtype", [F32, BF16], ids=str)
def test_estimator_triton_equals_torch(seed, no_env_backend, kernels, method, accum_dtype):
    torch.manual_seed(seed)
    model = TinyNet().to(DEV)
    results = {}
    for key, backend in (("triton", kernels), ("torch", "torch")):  # "triton": the kernels
        est = po.ImportanceEstimator(model, method=method, accum_dtype=accum_dtype,
                                     backend=backend)  # fmt: skip
        for x, y in batches(3, seed):
            model.loss(x.to(DEV), y.to(DEV)).backward()
            est.collect()
        results[key] = (est.scores(), est.select(ratio=0.05), est.select(k=1))
        est.close()
    (sc_t, m_t, k1_t), (sc_r, m_r, k1_r) = results["triton"], results["torch"]
    assert sc_t.keys() == sc_r.keys()
    for name in sc_t:
        assert_ulp(sc_t[name], sc_r[name], score_ulp(method), name)
    for mask, k in ((m_t, m_r.numel_selected()), (k1_t, 1)):
        want = _brute_force_mask(sc_t, k)
        assert mask.numel_selected() == k
        assert sorted(mask.names()) == sorted(want)
        for name, idx in want.items():
            assert mask[name].tolist() == idx, name
    if method == "piece-f" and not _GPU:  # bit-identical scores: identical masks
        assert m_t == m_r and k1_t == k1_r


@pytest.mark.parametrize("kernels", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_sparse_adamw_triton_equals_torch(seed, no_env_backend, kernels, dtype, tmp_path):
    """8 steps with a state_dict save/reload after step 4; params and every state tensor
    compared.  Both models get the same gradients (the torch model's), so the weights'
    few-ulp differences (see the module doc) do not feed back through the loss."""
    torch.manual_seed(seed)
    base = TinyNet().to(DEV, dtype)
    mask = {n: torch.randperm(p.numel())[: max(1, p.numel() // 7)].sort().values.int()
            for n, p in base.named_parameters() if p.numel() and p.requires_grad}  # fmt: skip
    models = {b: TinyNet().to(DEV, dtype) for b in ("triton", "torch")}
    for m in models.values():
        m.load_state_dict(base.state_dict())

    def make(b: str) -> po.SparseAdamW:
        return po.SparseAdamW(models[b].named_parameters(), mask=mask, lr=1e-2,
                              betas=(0.9, 0.95), weight_decay=0.1,
                              backend=kernels if b == "triton" else b)  # fmt: skip

    opts = {b: make(b) for b in models}
    pt, pr = dict(models["triton"].named_parameters()), dict(models["torch"].named_parameters())
    tols = {key: WeightTol() for name in pt for key in (name, name + ".master")}
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
        models["torch"].loss(x.to(DEV), y.to(DEV)).backward()
        for name, p in pr.items():
            if p.grad is not None:
                pt[name].grad = p.grad.clone()
        for o in opts.values():
            o.step()
        if step == 4:
            for b in models:
                torch.save(opts[b].state_dict(), tmp_path / f"{b}.pt")
                opts[b] = make(b)
                opts[b].load_state_dict(torch.load(tmp_path / f"{b}.pt"))
        for name in pt:
            tols[name].check(pt[name], pr[name], old[name], f"{name} step {step}")
            st, sr = opts["triton"].state[pt[name]], opts["torch"].state[pr[name]]
            assert st.keys() == sr.keys()
            for key in st:
                if key == "idx":
                    assert torch.equal(st[key], sr[key])
                elif key == "master":
                    # before step 1 the master did not exist: it starts as the param's entries
                    mo = old.get(name + ".master", old[name].reshape(-1)[sr["idx"].long()])
                    tols[name + ".master"].check(st[key], sr[key], mo, f"{name}.master {step}")
                elif key != "step":
                    assert_ulp(st[key], sr[key], ACC_ULP * step, f"{name}.{key} step {step}")
                else:
                    assert float(st[key]) == float(sr[key]) == step
