"""Property-based tests (hypothesis): every backend against the reference, on any input.

The backend under test is the stage's (``PIECE_OPTIM_BACKEND``: torch, cpu, triton; the
default stage resolves "auto", i.e. the C++ kernels); the oracle is
:mod:`piece_optim.backends.reference`.  Inputs: random shapes (0-size, 1-element, odd sizes and
the kernels' block and threading boundaries, non-contiguous gradients and parameters),
dtypes, masks, gradients with NaN / +-inf / huge (g*g overflows) / denormal / signed-zero
entries, and tie-heavy score distributions.  Invariants checked:

1. accumulate: the sums equal the reference's (bit for bit; NaN exactly where it has NaN).
2. scores (both methods, eps 0 / 1e-8 / 1): NaN where the reference has NaN, +inf where
   it has +inf, finite scores equal (PIECE-S within the documented 2 ulp for Triton).
3. selection: it raises FloatingPointError exactly when some score is NaN/inf; otherwise
   the mask equals an independent oracle (a stable sort by score, ties to the lower
   global position) on the backend's own scores, whole or chunked: exactly k entries,
   sorted, unique.
4. AdamW step: moments equal the reference's, weights within the documented bound (C++:
   bit for bit where torch's CPU kernels use fma, else 2 ulp per step; Triton: W_ULP),
   and every entry outside the selection is bit-identical to before.
5. errors leave everything unchanged: a corrupted optimizer index raises IndexError with
   params and state untouched; a failing apply_delta (strict check or a failed write)
   leaves the model untouched.
6. files: a mask / delta round trip is exact, and a single flipped bit anywhere in the file
   makes loading raise ValueError (never a different mask or delta).
7. index validation accepts exactly the sorted, unique, in-range integer tensors, of any
   integer dtype (unsigned included), and returns their values.

Budget: hypothesis runs derandomized (a fixed seed per test, no example database), so CI
takes the same examples, and the same time, every run.  Examples per test per stage are
in ``_EXAMPLES`` (the Triton interpreter stage takes few and smaller sizes); set
``PIECE_OPTIM_PROPERTY_EXAMPLES_SCALE=10`` to multiply every budget, and
``PIECE_OPTIM_PROPERTY_RANDOM=1`` to draw fresh examples (a local search for new failures).
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from helpers import assert_ulp, tol_of, ulp_of  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import piece_optim as po  # noqa: E402
from piece_optim import backends  # noqa: E402
from piece_optim import functional as F  # noqa: E402
from piece_optim.backends import reference as ref  # noqa: E402
from piece_optim.mask import validate_indices  # noqa: E402

pytestmark = [
    pytest.mark.cpu_only("CPU tensors: the C++ kernels, the Triton interpreter, files"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

try:
    BE = backends.get_backend("auto", "cpu")  # the stage's backend (PIECE_OPTIM_BACKEND wins)
except backends.BackendUnavailableError:  # a GPU stage (compiled Triton): cpu_only deselects us
    BE = backends.load("torch")
TRITON = BE.name == "triton"
W_ULP = tol_of("triton", torch.device("cpu")).w
TORCH_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
# Examples per test, (kernel-heavy tests, the others), per stage: the Triton interpreter
# runs each program in numpy (~100x slower), and a heavy example at the 65537 edge costs
# ~0.2 s on CI's 2 cores; these keep each stage's property tests near 20 s there.
_EXAMPLES = {"triton": (6, 12), "torch": (20, 40), "cpu": (30, 60)}
_SCALE = float(os.environ.get("PIECE_OPTIM_PROPERTY_EXAMPLES_SCALE", "1"))
HEAVY, LIGHT = (max(1, int(n * _SCALE)) for n in _EXAMPLES.get(BE.name, (30, 60)))
settings.register_profile(
    "piece_ci",
    max_examples=LIGHT,
    derandomize=os.environ.get("PIECE_OPTIM_PROPERTY_RANDOM", "0") != "1",
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
PROFILE = settings.get_profile("piece_ci")
KERNELS = settings(PROFILE, max_examples=HEAVY)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# sizes around the kernels' boundaries: Triton BLOCK 1024; C++ 1024-score blocks, 2**15
# serial histogram, 2**16 chunks, AdamW threads from 4096 entries and 256-entry blocks
_EDGES = [0, 1, 2, 3, 7, 255, 256, 257, 1023, 1024, 1025, 2047, 2049]
if not TRITON:
    _EDGES += [4095, 4096, 4097, 32767, 32768, 32769, 65535, 65536, 65537]
SIZES = st.one_of(st.sampled_from(_EDGES), st.integers(0, 3000 if TRITON else 20000))
SPECIALS = [
    float("nan"),
    float("inf"),
    -float("inf"),
    1e20,
    -3e19,
    1e-40,
    -1e-42,
    0.0,
    -0.0,
    3.0e38,
]


@st.composite
def values(draw, n: int, dtype: torch.dtype = F32, specials: bool = True) -> torch.Tensor:
    """n values with many exponents, and (maybe) special values at random places."""
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0, 4, 12]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-spread, spread + 1, (n,), generator=g).double())
    if specials and n and draw(st.booleans()):
        kinds = draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=4))
        frac = draw(st.sampled_from([0.001, 0.05, 0.5]))
        hit = torch.rand(n, generator=g) < frac
        pick = torch.randint(0, len(kinds), (n,), generator=g)
        spec = torch.tensor(kinds, dtype=torch.float64)[pick]
        x = torch.where(hit, spec, x)
    return x.to(dtype)


def _maybe_strided(draw, t: torch.Tensor) -> torch.Tensor:
    """The same values, sometimes as a non-contiguous view."""
    if t.numel() > 1 and draw(st.booleans()):
        buf = torch.empty(t.numel() * 2, dtype=t.dtype)
        view = buf[::2]
        view.copy_(t)
        return view
    return t


def _same_bits_or_nan(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN positions differ"
    keep = ~b.isnan()
    assert torch.equal(a[keep], b[keep]), f"{what}: {(a[keep] != b[keep]).sum()} entries differ"


# -- 1, 2: accumulate and scores --------------------------------------------------------------
@settings(KERNELS)
@given(
    data=st.data(), n=SIZES, gdt=st.sampled_from([F32, BF16, F16]), adt=st.sampled_from([F32, BF16])
)
def test_accumulate_and_scores_equal_reference(data, n, gdt, adt):
    s1 = data.draw(values(n, F32, specials=False)).to(adt)
    s2 = data.draw(values(n, F32, specials=False)).abs().to(adt)
    r1, r2 = s1.clone(), s2.clone()
    for _ in range(data.draw(st.integers(1, 2))):
        g = data.draw(values(n, F32)).to(gdt)
        g = _maybe_strided(data.draw, g)
        BE.accumulate_many_([g], [s1], [s2])
        ref.accumulate_(g, r1, r2)
    _same_bits_or_nan(s1, r1, "sum_g")
    if TORCH_FMA or BE.name == "torch":
        _same_bits_or_nan(s2, r2, "sum_g2")
    else:  # torch's default (non-fma) CPU kernels round addcmul twice
        assert_ulp(s2, r2, 2, "sum_g2")
    for method in ("piece-f", "piece-s"):
        eps = data.draw(st.sampled_from([0.0, 1e-8, 1.0]))
        got = BE.score(s1, s2, method, eps)
        want = ref.score(s1, s2, method, eps)
        assert torch.equal(got.isnan(), want.isnan()), f"{method}: NaN positions"
        assert torch.equal(got == float("inf"), want == float("inf")), f"{method}: +inf"
        ok = want.isfinite()
        assert_ulp(got[ok], want[ok], 2 if TRITON and method == "piece-s" else 0, method)


# -- 3: selection -----------------------------------------------------------------------------
@st.composite
def score_sums(draw, n: int, method: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    kind = draw(st.sampled_from(["continuous", "ties", "all_equal", "zeros_and_ties"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        s2 = torch.rand(n, generator=g) * torch.exp2(torch.randint(-20, 5, (n,), generator=g))
    elif kind == "ties":
        s2 = torch.randint(0, 5, (n,), generator=g).float() * 0.25
    elif kind == "all_equal":
        s2 = torch.full((n,), 0.5)
    else:
        s2 = torch.randint(0, 2, (n,), generator=g).float() * torch.randint(1, 3, (n,), generator=g)
    s1 = None
    if method == "piece-s":
        s1 = torch.randint(-3, 4, (n,), generator=g).float() * 0.5 * s2.sqrt()
    if draw(st.integers(0, 9)) == 0 and n:  # sometimes a bad gradient made it into the sums
        where = int(torch.randint(0, n, (1,), generator=g))
        s2[where] = draw(st.sampled_from([float("nan"), float("inf")]))
    return s1, s2


def _oracle(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Stable sort by score bits, descending: ties go to the lower global position."""
    bits = torch.cat([s.view(torch.int32).long() & 0xFFFFFFFF for s in scores])
    order = torch.sort(-bits, stable=True).indices[:k]
    keep = torch.zeros(bits.numel(), dtype=torch.bool)
    keep[order] = True
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].nonzero().view(-1))
        start += s.numel()
    return out


@settings(KERNELS)
@given(
    data=st.data(),
    method=st.sampled_from(["piece-f", "piece-s"]),
    sizes=st.lists(SIZES, min_size=1, max_size=4),
)
def test_selection_is_exact_k_and_equals_the_oracle(data, method, sizes):
    if sum(sizes) == 0:
        sizes = [*sizes, 1]
    eps = data.draw(st.sampled_from([0.0, 1.0]))
    sums = [data.draw(score_sums(n, method)) for n in sizes]
    sources = [F.ScoreSource(s1, s2, s2.numel(), torch.int32, BE) for s1, s2 in sums]
    scores = [BE.score(s1, s2, method, eps) for s1, s2 in sums]
    total = sum(sizes)
    k = data.draw(st.one_of(st.integers(1, total), st.sampled_from([1, total])))
    chunk = data.draw(st.sampled_from([1 << 20, 97, 1024]))
    if any(not s.isfinite().all() for s in scores):
        with pytest.raises(FloatingPointError, match="NaN, infinite"):
            F.global_topk(sources, k, method, eps)
        return
    want = _oracle(scores, k)
    got = F.global_topk(sources, k, method, eps)
    BE.select_chunk = chunk  # the pieces selection hands a backend that asks for them
    try:
        chunked = F.select_topk([s1 for s1, _ in sums], [s2 for _, s2 in sums], k, method, eps)
    finally:
        del BE.select_chunk  # the class's own value again
    assert sum(i.numel() for i in got) == k
    for a, b, w in zip(got, chunked, want, strict=True):
        assert torch.equal(a.long(), w) and torch.equal(b.long(), w)
        assert a.dtype == torch.int32


# -- 4: the AdamW step ------------------------------------------------------------------------
class _WeightBound:
    """The documented bound on |w_backend - w_reference| over AdamW steps: none (bit for bit)
    for C++ and the reference where torch's CPU kernels use fma, and for float64 (every
    backend computes it with the reference); else per step ``ulps`` fp32 ulps of
    ``|w_old| + |w_new|`` (Triton: W_ULP, the reference's faithful sqrt; C++ on a non-fma
    torch: 2) plus one ulp of the storage dtype, carried over from step to step, as
    helpers.WeightTol does."""

    def __init__(self) -> None:
        self.tol: torch.Tensor | float = 0.0

    def check(self, got: torch.Tensor, want: torch.Tensor, old: torch.Tensor, what: str) -> None:
        if want.dtype == F64 or not TRITON and (TORCH_FMA or BE.name == "torch"):
            _same_bits_or_nan(got, want, what)
            return
        nan = want.float().isnan()
        assert torch.equal(got.float().isnan(), nan), f"{what}: NaN positions"
        ulps = W_ULP if TRITON else 2
        scale = want.float().abs() + old.float().abs()
        store = ulp_of(want, want.dtype) if want.dtype != F32 else 0.0
        self.tol = self.tol + ulps * ulp_of(scale, F32) + store
        same = (got.float() == want.float()) | nan  # infinities included
        err = (got.float() - want.float()).abs()
        bad = ~same & (err > self.tol)
        assert not bad.any(), f"{what}: {err[bad].max()} over the bound"


@settings(KERNELS)
@given(
    data=st.data(),
    n=SIZES,
    # float64: the reference only (the kernels compute fp32 and refuse it, tested in
    # test_backends.py; "auto" hands it to the reference)
    pdt=st.sampled_from([F32, BF16, F16, F64] if BE.name == "torch" else [F32, BF16, F16]),
    mode=st.sampled_from(["idx32", "idx64", "dense", "sparse_grad"]),
)
def test_adamw_step_equals_reference_and_leaves_the_rest(data, n, pdt, mode):
    n = max(n, 1)
    p = data.draw(values(n, F32, specials=False)).to(pdt)
    if mode == "dense":
        idx, k = None, n
    else:
        k = data.draw(st.integers(0, n))
        seed = data.draw(st.integers(0, 2**31 - 1))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
        idx = idx.to(torch.int64 if mode == "idx64" else torch.int32)
    mdt = ref.compute_dtype(pdt)
    m, v = torch.zeros(k, dtype=mdt), torch.zeros(k, dtype=mdt)
    use_master = pdt in (BF16, F16) and data.draw(st.booleans())
    w = (p.float().clone() if idx is None else p.float()[idx.long()]) if use_master else None
    p_r, m_r, v_r = p.clone(), m.clone(), v.clone()
    w_r = None if w is None else w.clone()
    p0 = p.clone()
    gdt = pdt if pdt == F64 else data.draw(st.sampled_from([pdt, F32]))
    steps = data.draw(st.integers(1, 3))
    bound_p, bound_w = _WeightBound(), _WeightBound()
    for step in range(1, steps + 1):
        hyper = dict(
            lr=data.draw(st.sampled_from([1e-3, 3e-2, 0.0])),
            beta1=data.draw(st.sampled_from([0.9, 0.3, 0.0])),
            beta2=data.draw(st.sampled_from([0.999, 0.95])),
            eps=data.draw(st.sampled_from([1e-8, 1e-3])),
            weight_decay=data.draw(st.sampled_from([0.0, 0.1])),
        )
        sparse = mode == "sparse_grad"
        g = data.draw(values(k if sparse else n, F32)).to(gdt)
        p_old, w_old = p_r.clone(), (None if w_r is None else w_r.clone())
        sc = F.adamw_scalars(**hyper, step=step)
        BE.adamw_step_many_([p], [g], [idx], [m], [v], [w], [sc], sparse)
        ref.adamw_step_(p_r, g, idx, m_r, v_r, w_r, step=step, grad_is_sparse=sparse, **hyper)
        _same_bits_or_nan(m, m_r, "exp_avg")
        _same_bits_or_nan(v, v_r, "exp_avg_sq")
        if w is not None:
            bound_w.check(w, w_r, w_old, "master")
        bound_p.check(p, p_r, p_old, "param")
    if idx is not None:  # outside the selection: the same bits as before
        outside = torch.ones(n, dtype=torch.bool)
        outside[idx.long()] = False
        iv = {F32: torch.int32, F64: torch.int64}.get(pdt, torch.int16)
        assert torch.equal(p[outside].view(iv), p0[outside].view(iv))


# -- 5: errors leave the model and the optimizer unchanged -------------------------------------
@settings(PROFILE)
@given(data=st.data(), n=st.integers(1, 300), dtype=st.sampled_from([F32, BF16]))
def test_a_corrupted_index_raises_and_changes_nothing(data, n, dtype):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(n, generator=g).to(dtype)) for _ in range(3)]
    mask = {}
    for p in params:
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        mask[p] = torch.randperm(n, generator=g)[:k].sort().values
    opt = po.SparseAdamW(params, mask=mask, lr=1e-2)
    for p in params:
        p.grad = torch.randn(n, generator=g).to(dtype)
    opt.step()
    victim = params[data.draw(st.integers(0, 2))]
    idx = opt.state[victim]["idx"]
    pos = data.draw(st.integers(0, idx.numel() - 1))
    idx[pos] = data.draw(st.sampled_from([n, n + 1, 2**31 - 1, -1, -(2**31)]))
    snap = [[p.detach().clone()] + [t.clone() for t in opt.state[p].values()] for p in params]
    with pytest.raises(IndexError, match="outside its parameter"):
        opt.step()
    for p, before in zip(params, snap, strict=True):
        now = [p.detach()] + list(opt.state[p].values())
        assert all(torch.equal(a, b) for a, b in zip(before, now, strict=True))


def _model_with(data, dtype) -> nn.Module:
    m = nn.Module()
    shapes = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=4)
    for i, shape in enumerate(data.draw(shapes)):
        t = data.draw(values(int(torch.tensor(shape).prod()), F32, specials=False))
        t = t.to(dtype).view(shape)
        if len(shape) > 1 and data.draw(st.booleans()):
            t = t.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous
        m.register_parameter(f"p{i}", nn.Parameter(t))
    return m


@settings(PROFILE)
@given(data=st.data(), dtype=st.sampled_from([F32, BF16, F16]))
def test_delta_round_trip_and_errors_are_all_or_nothing(data, dtype, tmp_path_factory):
    base = _model_with(data, dtype)
    tuned = copy.deepcopy(base)
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            hit = torch.rand(p.shape, generator=g) < 0.4
            p.add_((torch.randn(p.shape, generator=g) * hit).to(dtype))
    path = tmp_path_factory.mktemp("delta") / "d.safetensors"
    po.save_delta(base, tuned, path)

    def bits(m: nn.Module) -> list[torch.Tensor]:
        return [
            p.detach().clone().view(torch.int16 if dtype != F32 else torch.int32)
            for p in m.parameters()
        ]

    m = copy.deepcopy(base)
    po.apply_delta(m, path)
    assert all(torch.equal(a, b) for a, b in zip(bits(m), bits(tuned), strict=True))
    po.revert_delta(m, path)
    assert all(torch.equal(a, b) for a, b in zip(bits(m), bits(base), strict=True))
    # a model that differs from the base at one stored entry: strict apply refuses, unchanged
    stored = po.load_delta(path)
    if stored:
        name = data.draw(st.sampled_from(sorted(stored)))
        other = copy.deepcopy(base)
        with torch.no_grad():
            target = dict(other.named_parameters())[name]
            where = data.draw(st.sampled_from(stored[name]["idx"].tolist()))
            coords = torch.unravel_index(torch.tensor(where), target.shape)
            target[coords] = target[coords] + 1
        before = bits(other)
        with pytest.raises(ValueError, match="does not hold"):
            po.apply_delta(other, path)
        assert all(torch.equal(a, b) for a, b in zip(bits(other), before, strict=True))


# -- 6: files ---------------------------------------------------------------------------------
@st.composite
def masks(draw) -> po.SparseMask:
    shapes, idx = {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=2)))
        n = int(torch.tensor(shape).prod())
        sel = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 50)))
        dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.int16]))
        values_ = sorted(sel)
        if dtype in (torch.uint8,) and values_[-1] > 255 or dtype == torch.int16 and n > 30000:
            dtype = torch.int64
        shapes[f"layer{i}.weight"] = shape
        idx[f"layer{i}.weight"] = torch.tensor(values_, dtype=dtype)
    total = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    return po.SparseMask(idx, shapes, total + draw(st.integers(0, 100)))


@settings(PROFILE)
@given(mask=masks(), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_mask_round_trips_and_any_flipped_bit_is_refused(mask, where, bit, tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "m.safetensors"
    mask.save(path)
    assert po.SparseMask.load(path) == mask
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 1 << bit
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no path to a silent or merely-warned load
        with pytest.raises(ValueError, match=re.escape(str(path))):
            po.SparseMask.load(path)


@settings(PROFILE)
@given(data=st.data(), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_delta_any_flipped_bit_is_refused(data, where, bit, tmp_path_factory):
    base = _model_with(data, F32)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.5)
    path = tmp_path_factory.mktemp("delta") / "d.safetensors"
    po.save_delta(base, tuned, path)
    raw = bytearray(path.read_bytes())
    raw[int(where * len(raw))] ^= 1 << bit
    path.write_bytes(bytes(raw))
    m = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=re.escape(str(path))):
            po.apply_delta(m, path)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), base.parameters(), strict=True))


# -- 7: index validation ----------------------------------------------------------------------
_INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8] + [
    getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)
]


@settings(PROFILE)
@given(data=st.data(), dtype=st.sampled_from(_INT_DTYPES), numel=st.integers(1, 3000))
def test_index_validation_accepts_exactly_sorted_unique_in_range(data, dtype, numel):
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -5), min(info.max, numel + 5)
    vals = data.draw(st.lists(st.integers(lo, hi), max_size=40))
    if data.draw(st.booleans()):
        vals = sorted(set(vals))
    t = torch.tensor(vals, dtype=dtype) if vals else torch.empty(0, dtype=dtype)
    valid = all(0 <= x < numel for x in vals) and all(
        a < b for a, b in zip(vals, vals[1:], strict=False)
    )
    if not valid:
        with pytest.raises(ValueError, match="out of range|not sorted|duplicated"):
            validate_indices(t, numel, "idx")
        return
    out = validate_indices(t, numel, "idx")
    assert out.dtype == torch.int32 and out.tolist() == vals
    assert out.data_ptr() != t.data_ptr() or not vals  # a private copy
