"""The C++ CPU kernels (csrc/cpu, via CpuBackend) against piece_optim._reference.

Exactness: the kernels do the reference's fp32 operations in the same order and put an fma
exactly where torch's own vectorised CPU kernels have one (addcmul_ -> fma(c*g, g, s),
lerp_ -> fma); so on a torch whose CPU capability is AVX2/AVX512 (fma-contracted kernels)
results are bit-identical and the tests use torch.equal.  A torch running its DEFAULT
(non-fma) kernels rounds those two ops twice: there the bound is 2 ulp per step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyNet, batches

import piece_optim as po
from piece_optim import _reference as ref
from piece_optim._backends import TorchBackend
from piece_optim._reference import HIST_BINS
from piece_optim._select import ScoreSource, global_topk

# the CUDA kernels (CudaBackend) are checked by test_triton_kernels.py's be=cuda
pytestmark = pytest.mark.cpu_only("the C++ CPU kernels")

try:
    from piece_optim._ext_backend import CpuBackend

    BE = CpuBackend()
except ImportError as exc:  # only when the extension neither built nor JIT-compiled
    pytest.skip(f"C++ extension unavailable: {exc}", allow_module_level=True)

TORCH_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
SIZES = [1, 4097, 140001]  # 140001 > 2 chunks of 65536: the multi-thread path
IO_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(a: torch.Tensor, b: torch.Tensor, steps: int = 1, what: str = "") -> None:
    """Bit-equal where torch's kernels use fma, else within 2 ulp per step."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if TORCH_FMA:
        assert torch.equal(a, b), f"{what}: {(a != b).sum().item()} of {a.numel()} differ"
    else:
        ulp = torch.finfo(a.dtype).eps
        torch.testing.assert_close(a, b, rtol=2 * steps * ulp, atol=0, msg=what)


# ------------------------------------------------------------------------------ accumulate
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("gdt", IO_DTYPES, ids=str)
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_sum_g", [True, False])
def test_accumulate_equals_reference(seed, n, gdt, adt, with_sum_g):
    g = _gen(seed)
    s1 = torch.randn(n, generator=g).to(adt) if with_sum_g else None
    s2 = torch.rand(n, generator=g).to(adt)
    r1 = s1.clone() if with_sum_g else None
    r2 = s2.clone()
    for _ in range(3):  # three terms
        grad = (torch.randn(n, generator=g) * 3).to(gdt)
        BE.accumulate_(grad, s1, s2)
        ref.accumulate_(grad, r1, r2)
    assert_same(s2, r2, 3, "sum_g2")
    if with_sum_g:
        assert torch.equal(s1, r1), "sum_g"  # a plain add: exact everywhere


def test_accumulate_many_mixed_and_strided(seed):
    """One call over tensors of odd sizes, with and without sum_g, a strided grad, an empty one."""
    g = _gen(seed)
    shapes = [(7, 13), (0,), (300, 301), (1,), (4097,)]
    grads = [torch.randn(s, generator=g) for s in shapes]
    grads[2] = torch.randn(301, 300, generator=g).t()  # non-contiguous
    s1 = [torch.randn(int(torch.tensor(s).prod()), generator=g) for s in shapes]
    s1[3] = None
    s2 = [torch.rand(int(torch.tensor(s).prod()), generator=g) for s in shapes]
    r1 = [None if t is None else t.clone() for t in s1]
    r2 = [t.clone() for t in s2]
    BE.accumulate_many_(grads, s1, s2)
    for gr, a, b in zip(grads, r1, r2, strict=True):
        ref.accumulate_(gr, a, b)
    for a, b in zip(s2, r2, strict=True):
        assert_same(a, b)
    for a, b in zip(s1, r1, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


# ---------------------------------------------------------------------------------- scores
def _sums(seed: int, n: int, adt: torch.dtype, zeros: bool = False):
    g = _gen(seed)
    s1 = (torch.randn(n, generator=g) * 4).to(adt)
    s2 = (torch.rand(n, generator=g) * 10).to(adt)
    if zeros:  # eps = 0 and both sums 0: the score is defined as 0
        z = torch.rand(n, generator=g) < 0.1
        s1[z] = 0
        s2[z] = 0
    return s1, s2


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,eps", [("piece-f", 1.0), ("piece-s", 1.0), ("piece-s", 0.0)])
def test_score_equals_reference(seed, n, adt, method, eps):
    s1, s2 = _sums(seed, n, adt, zeros=eps == 0)
    out = BE.score(s1, s2, method, eps)
    expect = ref.score(s1, s2, method, eps)
    assert torch.equal(out, expect)  # no fma involved: exact on every machine


# ------------------------------------------------------------------------------ histograms
@pytest.mark.parametrize("n", SIZES)
def test_histogram_both_levels(seed, n):
    g = _gen(seed)
    scores = torch.rand(n, generator=g) * torch.rand(n, generator=g) ** 8
    scores[::7] = scores[0]  # duplicates
    if n > 10:
        scores[1] = float("nan")
        scores[2] = -1.0
        scores[5] = float("inf")
    start = torch.randint(0, 1000, (HIST_BINS,), generator=g)  # the pass adds to it
    for shift, prefix in [(16, 0), (0, int(scores[0].view(torch.int32)) >> 16), (8, 0x3F)]:
        h, r = start.clone(), start.clone()
        BE.histogram_(scores, h, shift, prefix)
        ref.histogram_(scores, r, shift, prefix)
        assert torch.equal(h, r), (shift, prefix)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
def test_score_histogram_equals_reference(seed, n, adt, method):
    s1, s2 = _sums(seed, n, adt)
    sc = ref.score(s1, s2, method, 1.0)
    h, r = torch.zeros(HIST_BINS, dtype=torch.int64), torch.zeros(HIST_BINS, dtype=torch.int64)
    BE.score_histogram_(s1, s2, method, 1.0, h, 16, 0)
    ref.histogram_(sc, r, 16, 0)
    assert torch.equal(h, r)
    top = int(sc.view(torch.int32).max()) >> 16
    h.zero_()
    r.zero_()
    BE.score_histogram_(s1, s2, method, 1.0, h, 0, top)
    ref.histogram_(sc, r, 0, top)
    assert torch.equal(h, r)


@pytest.mark.parametrize("n", [15, 16, 17, 33, 4097, 140001])
def test_level2_filter_groups_and_tail(seed, n):
    """Level 2 tests 16 scores at a time and filters only groups that may match: matches at
    group edges, in the tail, in bins above the prefix, and ties, against the reference."""
    g = _gen(seed)
    s2 = torch.rand(n, generator=g) * 0.25  # top bits below the prefix bin
    top = int(torch.tensor(1.5).view(torch.int32)) >> 16
    pos = torch.randint(0, n, (max(1, n // 50),), generator=g).tolist() + [0, n - 1]
    pos += [p for p in (15, 16, 31, 32, n - 17, n - 16) if 0 <= p < n]
    s2[pos] = 1.5 + torch.randint(0, 3, (len(pos),), generator=g).float() / 1024  # in-bin ties
    s2[torch.randint(0, n, (max(1, n // 200),), generator=g)] = 3.0  # above the bin
    h, r = torch.zeros(HIST_BINS, dtype=torch.int64), torch.zeros(HIST_BINS, dtype=torch.int64)
    BE.score_histogram_(None, s2, "piece-f", 0.0, h, 16, 0)  # new selection: cache cleared
    h.zero_()
    BE.score_histogram_(None, s2, "piece-f", 0.0, h, 0, top)
    ref.histogram_(s2, r, 0, top)
    assert torch.equal(h, r) and int(h.sum()) > 0
    cand = BE._cand.pop(id(s2))[2]
    expect = torch.nonzero((s2.view(torch.int32) >> 16) >= top).flatten()
    assert torch.equal(cand.to(torch.int64), expect)


# ------------------------------------------------------------------------------ compaction
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_compact_equals_reference_with_ties(seed, n, index_dtype):
    g = _gen(seed)
    scores = torch.randint(0, 5, (n,), generator=g).float() / 4  # few levels: many ties
    bits = scores.view(torch.int32)
    for thr in {int(bits[0]), int(bits.max()), int(bits.min())}:
        n_eq_all = int((bits == thr).sum())
        for take_eq in {0, 1, n_eq_all // 2, n_eq_all + 3}:
            idx, n_eq = BE.compact(scores, thr, take_eq, index_dtype)
            e_idx, e_eq = ref.compact(scores, thr, take_eq, index_dtype)
            assert idx.dtype == index_dtype and torch.equal(idx, e_idx), (thr, take_eq)
            assert n_eq == e_eq


@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=str)
def test_global_topk_equals_torch_backend(seed, method, adt):
    """The whole selection (both levels, candidates, compaction) over odd-sized sources."""
    g = _gen(seed)
    sizes = [1, 4097, 140001, 33]
    sums = [_sums(seed + i, n, adt) for i, n in enumerate(sizes)]
    # quantised sums: ties across and within tensors
    sums = [(a, (b * 4).round() / 4) for a, b in sums]
    total = sum(sizes)
    for k in [1, int(torch.randint(2, total, (1,), generator=g)), total // 1000, total]:
        out = []
        for be in (BE, TorchBackend()):
            src = [ScoreSource(a if method == "piece-s" else None, b, b.numel(),
                               torch.int64 if i == 2 else torch.int32, be)
                   for i, (a, b) in enumerate(sums)]  # fmt: skip
            out.append(global_topk(src, k, method, 1.0))
        for a, b in zip(*out, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), k
        assert sum(a.numel() for a in out[0]) == k


def test_candidate_cache_used_and_invalidated(seed):
    s1, s2 = _sums(seed, 140001, torch.float32)
    sc = ref.score(s1, s2, "piece-s", 1.0)
    top = int(sc.view(torch.int32).max()) >> 16
    h = torch.zeros(HIST_BINS, dtype=torch.int64)
    BE.score_histogram_(s1, s2, "piece-s", 1.0, h, 16, 0)  # a new selection: cache cleared
    BE.score_histogram_(s1, s2, "piece-s", 1.0, h, 0, top)
    assert id(s2) in BE._cand, "the 2nd-level pass kept no candidates"
    thr = int(sc.view(torch.int32).max())
    idx, n_eq = BE.score_compact(s1, s2, "piece-s", 1.0, thr, 1, torch.int32)
    assert id(s2) not in BE._cand
    assert torch.equal(idx, ref.compact(sc, thr, 1, torch.int32)[0]) and n_eq == 1
    # a tensor changed after the histogram pass must not be served from the cache
    BE.score_histogram_(s1, s2, "piece-s", 1.0, h, 0, top)
    s2.mul_(0.25)
    thr = int(ref.score(s1, s2, "piece-s", 1.0).view(torch.int32).kthvalue(140001 - 100).values)
    idx, n_eq = BE.score_compact(s1, s2, "piece-s", 1.0, thr, 5, torch.int32)
    e_idx, e_eq = ref.compact(ref.score(s1, s2, "piece-s", 1.0), thr, 5, torch.int32)
    assert torch.equal(idx, e_idx) and n_eq == e_eq and idx.numel() > 50


# ----------------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("n,wd", [(1, 0.1), (4097, 0.0), (140001, 0.1)])
@pytest.mark.parametrize("pdt", IO_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["dense", "int32", "int64", "sparse-grad"])
def test_adamw_equals_reference(seed, n, wd, pdt, mode):
    g = _gen(seed)
    p = torch.randn(n, generator=g).to(pdt)
    orig = p.clone()
    if mode == "dense":
        idx = None
        k = n
    else:
        k = max(1, n // 3)
        idx = torch.randperm(n, generator=g)[:k].sort().values
        idx = idx.to(torch.int64 if mode == "int64" else torch.int32)
    lowp = pdt != torch.float32
    state = {
        "m": torch.zeros(k),
        "v": torch.zeros(k),
        "w": (p.float() if idx is None else p.float()[idx.long()]).clone() if lowp else None,
    }
    mine = {key: None if t is None else t.clone() for key, t in state.items()}
    p_ref = p.clone()
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd)
    sparse = mode == "sparse-grad"
    for step in range(1, 8):
        grad = torch.randn(k if sparse else n, generator=g).to(pdt)
        BE.adamw_step_(p, grad, idx, mine["m"], mine["v"], mine["w"], step=step,
                       grad_is_sparse=sparse, **hp)  # fmt: skip
        ref.adamw_step_(p_ref, grad, idx, state["m"], state["v"], state["w"], step=step,
                        grad_is_sparse=sparse, **hp)  # fmt: skip
    assert_same(p, p_ref, 7, "param")
    assert_same(mine["m"], state["m"], 7, "exp_avg")
    assert_same(mine["v"], state["v"], 7, "exp_avg_sq")
    if lowp:
        assert_same(mine["w"], state["w"], 7, "master")
    if idx is not None:
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx.long()] = False
        assert torch.equal(p[keep], orig[keep]), "an unselected entry changed"


def test_adamw_many_one_call_mixed(seed):
    """fp32 + bf16 (master) + fp16 (no master) + an empty selection in one kernel call."""
    g = _gen(seed)
    ps = [torch.randn(4097, generator=g), torch.randn(70001, generator=g).bfloat16(),
          torch.randn(13, generator=g).half()]  # fmt: skip
    idxs = [torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // 5)].sort().values
            .int() for p in ps]  # fmt: skip
    ms = [torch.rand(i.numel(), generator=g) for i in idxs]
    vs = [torch.rand(i.numel(), generator=g) for i in idxs]
    ws = [None, ps[1].float()[idxs[1].long()], None]
    steps = [3, 9, 1]
    grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]
    rp, rm, rv = [p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs]
    rw = [None if w is None else w.clone() for w in ws]
    hp = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05)
    BE.adamw_step_many_(ps, grads, idxs, ms, vs, ws, steps, **hp)
    for i in range(3):
        ref.adamw_step_(rp[i], grads[i], idxs[i], rm[i], rv[i], rw[i], step=steps[i], **hp)
        assert_same(ps[i], rp[i], 1, f"param {i}")
        assert_same(ms[i], rm[i], 1, f"m {i}")
        assert_same(vs[i], rv[i], 1, f"v {i}")
    assert_same(ws[1], rw[1], 1, "master")


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["piece-f", "piece-s"])
@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_estimator_and_optimizer_cpu_equal_torch(seed, method, accum_dtype, monkeypatch):
    monkeypatch.delenv("PIECE_OPTIM_BACKEND", raising=False)  # compare the two backends
    torch.manual_seed(seed)
    base = TinyNet(vocab=41, dim=17, hidden=23)
    data = batches(3, seed + 1, vocab=41)
    train = batches(7, seed + 2, vocab=41)
    results = {}
    for backend in ("cpu", "torch"):
        model = copy.deepcopy(base)
        est = po.ImportanceEstimator(model, method=method, accum_dtype=accum_dtype,
                                     backend=backend)  # fmt: skip
        for x, y in data:
            model.loss(x, y).backward()
            est.collect()
        scores = est.scores()
        mask = est.select(ratio=0.05)
        est.close()
        opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2, betas=(0.9, 0.95),
                             weight_decay=0.1, backend=backend)  # fmt: skip
        for x, y in train:
            opt.zero_grad()
            model.loss(x, y).backward()
            opt.step()
        results[backend] = (scores, mask, dict(model.named_parameters()), opt)
    (sc_a, m_a, p_a, o_a), (sc_b, m_b, p_b, o_b) = results["cpu"], results["torch"]
    for n in sc_b:
        assert_same(sc_a[n], sc_b[n], 3, n)
    assert m_a == m_b
    for n in p_b:
        assert_same(p_a[n].detach(), p_b[n].detach(), 7, n)
    for sa, sb in zip(o_a.state.values(), o_b.state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same(sa[key], sb[key], 7, key)


# -------------------------------------------------------------------------- ops and errors
def test_ops_schemas_and_fakes():
    """torch.library.opcheck: schemas (mutation marks) and fake implementations."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(300, generator=g), torch.rand(300, generator=g)
    hist = torch.zeros(HIST_BINS, dtype=torch.int64)
    ops = torch.ops.piece_optim
    torch.library.opcheck(ops.accumulate_.default, (torch.randn(300, generator=g), s1, s2))
    torch.library.opcheck(ops.score.default, (s1, s2, "piece-s", 1.0))
    torch.library.opcheck(ops.histogram_.default, (s2, hist, 16, 0))
    p, m, v = torch.randn(300, generator=g), torch.zeros(300), torch.zeros(300)
    torch.library.opcheck(
        ops.adamw_step_many_.default,
        ([p], [torch.randn(300, generator=g)], [None], [m], [v], [torch.empty(0)], [0.1], [0.3],
         1e-3, 0.9, 0.999, 1e-8, 0.0, False),
    )  # fmt: skip


def test_bad_input_errors():
    ops = torch.ops.piece_optim
    with pytest.raises(RuntimeError, match="hist must be a contiguous int64"):
        ops.histogram_(torch.rand(10), torch.zeros(HIST_BINS, dtype=torch.int32), 16, 0)
    with pytest.raises(RuntimeError, match="method must be 'piece-f' or 'piece-s'"):
        ops.score(None, torch.rand(10), "fisher", 1.0)
    with pytest.raises(RuntimeError, match="piece-s needs sum_g"):
        ops.score(None, torch.rand(10), "piece-s", 1.0)
    with pytest.raises(RuntimeError, match="grad has 9 elements but sum_g2 has 10"):
        ops.accumulate_(torch.rand(9), None, torch.rand(10))
    with pytest.raises(RuntimeError, match="index_dtype must be torch.int32 or torch.int64"):
        ops.compact(None, torch.rand(10), "piece-f", 0.0, 0, 0, torch.int16)


def test_unsupported_inputs_fall_back_to_reference(seed):
    """float64 gradients are not a kernel dtype: the backend still gives the reference result."""
    g = _gen(seed)
    grad = torch.randn(4097, generator=g, dtype=torch.float64)
    s2 = torch.rand(4097, generator=g)
    r2 = s2.clone()
    BE.accumulate_(grad, None, s2)
    ref.accumulate_(grad, None, r2)
    assert torch.equal(s2, r2)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(seed, threads):
    """Serial path (1 thread) and more threads than cores: same results as the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s1, s2 = _sums(seed, 140001, torch.float32)
        grad = torch.randn(140001, generator=_gen(seed + 1))
        r1, r2 = s1.clone(), s2.clone()
        BE.accumulate_(grad, s1, s2)
        ref.accumulate_(grad, r1, r2)
        assert_same(s2, r2)
        assert torch.equal(s1, r1)
        sc = ref.score(s1, s2, "piece-s", 1.0)
        h, r = torch.zeros(HIST_BINS, dtype=torch.int64), torch.zeros(HIST_BINS, dtype=torch.int64)
        BE.score_histogram_(s1, s2, "piece-s", 1.0, h, 16, 0)
        ref.histogram_(sc, r, 16, 0)
        assert torch.equal(h, r)
        thr = int(sc.view(torch.int32).kthvalue(140001 - 500).values)
        idx, n_eq = BE.score_compact(s1, s2, "piece-s", 1.0, thr, 1, torch.int32)
        e_idx, e_eq = ref.compact(sc, thr, 1, torch.int32)
        assert torch.equal(idx, e_idx) and n_eq == e_eq
    finally:
        torch.set_num_threads(before)
