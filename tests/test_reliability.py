"""Issue 13: bad numbers, bad files and misuse never corrupt a model or pass silently.

One section per numbered item of the issue; each test failed before its fix.  They run in
every backend stage of scripts/test.sh: ``backend="auto"`` follows PIECE_OPTIM_BACKEND,
and the tests of one backend's kernels build that backend object directly.  CPU only
(see the marker); the GPU paths of items 1 and 3 are in test_reliability_gpu.py.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyNet, batches
from torch import nn

import piece_optim as po
from piece_optim import backends
from piece_optim import functional as F
from piece_optim.backends import reference as ref

pytestmark = [
    pytest.mark.cpu_only(
        "CPU models, files, the C++ kernels and the Triton interpreter; "
        "the GPU paths: test_reliability_gpu.py"
    ),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]
NAN, INF = float("nan"), float("inf")


def _backends() -> list:
    """Every backend object that runs on CPU tensors here (the stage's env is ignored)."""
    f32 = (torch.float32, torch.float32)
    cpu = torch.device("cpu")
    return [
        backends.load(name)
        for name in backends.names()
        if not backends.explain("adamw", cpu, f32)[name]
    ]


BACKENDS = _backends()


def _calibrate(model: nn.Module, est: po.ImportanceEstimator, seed: int, n: int = 2) -> None:
    for x, y in batches(n, seed):
        model.loss(x, y).backward()
        est.collect()


# -- 1. PIECE-S: NaN in -> NaN out, overflow visible, in every backend ------------------------
def test_score_rule_special_values_equal_reference_in_every_backend():
    s1 = torch.tensor([1.0, NAN, 2.0, 3.0, 1e-30, 0.0, NAN, INF, 5.0, -4.0, 1e-45])
    s2 = torch.tensor([1.0, NAN, 4.0, INF, 0.0, 0.0, 0.0, INF, NAN, 16.0, 0.0])
    for eps in (1.0, 0.0):
        want = ref.score(s1, s2, "piece-s", eps)
        assert torch.isnan(want[[1, 6, 7, 8]]).all()  # NaN in, NaN out
        assert want[3] == INF  # overflowed sum of squares: +inf, not 3/inf = 0
        assert want[5] == 0 and (eps or want[4] == 0)
        for be in BACKENDS:
            got = be.score(s1, s2, "piece-s", eps)
            assert torch.equal(got.isnan(), want.isnan()), be.name
            assert torch.equal(got[~want.isnan()], want[~want.isnan()]), be.name


@pytest.mark.parametrize("method", ["piece-s", "piece-f"])
@pytest.mark.parametrize("bad", ["nan", "huge"])
def test_bad_gradients_make_select_raise(seed, method, bad):
    """A NaN loss, or one finite gradient of 1e20 (g*g overflows fp32), must not select."""
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, method=method)
    _calibrate(model, est, seed)
    x, y = batches(1, seed + 1)[0]
    model.loss(x, y).backward()
    model.fc2.weight.grad[3, 4] = NAN if bad == "nan" else 1e20
    est.collect()
    with pytest.raises(FloatingPointError, match="NaN, infinite"):
        est.select(ratio=0.05)
    s = est.scores()["fc2.weight"][3, 4]
    assert s.isnan() if bad == "nan" else s == INF  # never a plausible finite score
    est.close()


# -- 2. an in_backward estimator dropped without close() ------------------------------------
def test_dropped_in_backward_estimator_stops_consuming_gradients(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    with pytest.warns(UserWarning, match=r"ImportanceEstimator\(in_backward=True\).*garbage"):
        po.ImportanceEstimator(model, in_backward=True)  # made and dropped, never closed
        gc.collect()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.fc1.weight.detach().clone()
    model.loss(*batches(1, seed)[0]).backward()
    assert model.fc1.weight.grad is not None
    opt.step()
    assert not torch.equal(model.fc1.weight, before)


def test_dropped_sparse_grads_optimizer_removes_its_hooks_quietly(seed):
    """Decision: no warning (Trainer and deepcopy drop optimizers they never close), but the
    hooks go with the optimizer and gradients stay dense."""
    torch.manual_seed(seed)
    model = TinyNet()
    mask = {"fc1.weight": torch.tensor([0, 5]), "fc2.bias": torch.tensor([3])}
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, sparse_grads=True)
    assert model.fc1.weight._post_accumulate_grad_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del opt
        gc.collect()
    assert not model.fc1.weight._post_accumulate_grad_hooks
    model.loss(*batches(1, seed)[0]).backward()
    assert type(model.fc1.weight.grad) is torch.Tensor  # dense, not a SparseGrad
    po.ImportanceEstimator(model, in_backward=True).close()  # nothing holds the params


def test_closed_owners_do_not_warn(seed):
    model = TinyNet()
    with po.ImportanceEstimator(model, in_backward=True):
        pass
    opt = po.SparseAdamW(model.named_parameters(), sparse_grads=True)
    opt.close()
    del opt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc.collect()


# -- 3. indices: private copies, and a range check in every step path -------------------------
def _sparse_setup(seed: int, backend: str = "auto"):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8, bias=False)  # 128 entries
    idx = torch.tensor([1, 5, 7, 100], dtype=torch.int32)
    opt = po.SparseAdamW(lin.named_parameters(), mask={"weight": idx}, backend=backend)
    return lin, idx, opt


def _step(lin: nn.Module, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lin.weight.grad = torch.randn(lin.weight.shape, generator=g)
    opt.step()


def test_caller_and_mask_tensors_cannot_change_the_optimizer(seed):
    lin, idx, opt = _sparse_setup(seed)
    idx[3] = 130  # the caller's tensor: the optimizer holds its own copy
    before = lin.weight.detach().clone()
    _step(lin, opt, seed)
    changed = (lin.weight != before).view(-1).nonzero().view(-1)
    assert changed.tolist() == [1, 5, 7, 100]
    opt.mask_indices()["weight"][0] = 3  # a copy too
    assert opt.mask_indices()["weight"].tolist() == [1, 5, 7, 100]
    mask = po.SparseMask({"w": torch.tensor([0, 2])}, {"w": (4,)}, 4)
    mask["w"][0] = 3
    list(mask.values())[0][1] = 3
    mask.bind(nn.ParameterDict({"w": nn.Parameter(torch.ones(4))}))
    assert mask["w"].tolist() == [0, 2]


@pytest.mark.parametrize("bad", [128, 130, 10**9, -1])
def test_corrupted_state_index_raises_and_writes_nothing(seed, bad):
    lin, _, opt = _sparse_setup(seed)
    _step(lin, opt, seed)
    st = opt.state[lin.weight]
    st["idx"][3] = bad  # through the optimizer's own state: the step must refuse
    snap = [lin.weight.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()]
    with pytest.raises(IndexError, match=f"index {bad} .*outside its parameter of 128"):
        _step(lin, opt, seed + 1)
    for a, b in zip(snap, [lin.weight, st["exp_avg"], st["exp_avg_sq"]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("be", BACKENDS, ids=lambda b: b.name)
def test_every_step_path_checks_indices_behind_the_version_counter(seed, be):
    """An index changed through ``.data`` (no version bump): the compiled paths still
    refuse (C++: before writing; Triton: skips the entry and raises); the reference's
    index ops raise."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(128, generator=g)
    grad = torch.randn(128, generator=g)
    idx = torch.tensor([1, 5, 7, 100], dtype=torch.int32)
    m, v = torch.zeros(4), torch.zeros(4)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    step2 = F.adamw_scalars(**hyper, step=2)
    F.sparse_adamw([p], [grad], [idx], [m], [v], [None], [1], **hyper, backend=be.name)
    idx.data[3] = 1000  # the functional layer's check (once per version) does not see it
    before = p.clone()
    with pytest.raises(IndexError):
        be.adamw_step_many_([p], [grad], [idx], [m], [v], [None], [step2])
    outside = torch.ones(128, dtype=torch.bool)
    outside[[1, 5, 7]] = False
    assert torch.equal(p[outside], before[outside])  # nothing outside the selection written


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter only")
def test_triton_kernel_skips_and_flags_out_of_range_indices(seed):
    from piece_optim.kernels.adamw import adamw_triton

    g = torch.Generator().manual_seed(seed)
    p = torch.randn(64, generator=g)
    pad = torch.randn(64, generator=g)
    both = torch.cat([p, pad])  # the param is the first half: index 64+ lands in `pad`
    param = both[:64]
    idx = torch.tensor([3, 9, 70, -2], dtype=torch.int64)
    m, v = torch.zeros(4), torch.zeros(4)
    err = torch.zeros(1, dtype=torch.int32)
    sc = F.adamw_scalars(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)
    adamw_triton(param, torch.randn(64, generator=g), idx, m, v, None, sc, err=err)
    assert int(err[0]) == 1
    assert torch.equal(both[64:], pad)  # not written past the parameter
    assert m[2] == 0 and m[3] == 0 and v[2] == 0 and (m[:2] != 0).all()


def test_step_op_schema_with_status_passes_opcheck(seed):
    """The adamw_step_many_ schema gained ``Tensor(e!)? status`` (the CUDA kernels' flag)."""
    if backends.load("cpu") is None:
        pytest.skip("C++ extension unavailable")
    g = torch.Generator().manual_seed(seed)
    p, m, v = torch.randn(300, generator=g), torch.zeros(7), torch.zeros(7)
    idx = torch.tensor([0, 3, 9, 50, 51, 200, 299], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.piece_optim.adamw_step_many_.default,
        (
            [p],
            [torch.randn(300, generator=g)],
            [idx],
            [m],
            [v],
            [torch.empty(0)],
            [0.1],
            [0.3],
            1.0,
            0.1,
            0.999,
            1e-3,
            1e-8,
            False,
            torch.zeros(1, dtype=torch.int32),
        ),
    )


# -- 4. torch backend, dense, bf16/fp16 params with 2+ dims -----------------------------------
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dense_low_precision_matrix_params_equal_fp32_adamw_on_master(
    seed, dtype, backend, monkeypatch
):
    monkeypatch.delenv("PIECE_OPTIM_BACKEND", raising=False)
    torch.manual_seed(seed)
    lin = nn.Linear(12, 7).to(dtype)
    master = [nn.Parameter(p.detach().float().clone()) for p in lin.parameters()]
    opt = po.SparseAdamW(lin.parameters(), lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(master, lr=1e-2)
    for step in range(3):
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed + step))
        opt.zero_grad()
        lin(x.to(dtype)).square().sum().backward()
        for q, p in zip(master, lin.parameters(), strict=True):
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    for q, p in zip(master, lin.parameters(), strict=True):
        if backend == "triton":  # IEEE sqrt: <= 4 ulp of |w| per step off torch's (helpers.tol_of
            # "triton"): 3 steps, |w| <= 0.5, lr 1e-2 -> 2e-6 relative, 1e-8 abs
            torch.testing.assert_close(opt.state[p]["master"], q.detach(), rtol=2e-6, atol=1e-8)
            continue
        assert torch.equal(opt.state[p]["master"], q.detach())
        assert torch.equal(p.detach(), q.detach().to(dtype))


def test_tensor_lr_path_handles_matrix_masters_and_float64(seed):
    """The torch-ops path (Tensor lr, torch.compile) has the same conventions: a dense
    bf16 matrix's master is shaped like it, float64 is computed in float64."""
    torch.manual_seed(seed)
    lin = nn.Linear(12, 7).to(torch.bfloat16)
    twin = copy.deepcopy(lin)
    a = po.SparseAdamW(lin.parameters(), lr=torch.tensor(1e-2))
    b = po.SparseAdamW(twin.parameters(), lr=1e-2)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    for m, o in ((lin, a), (twin, b)):
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(lin.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.state[p]["master"], b.state[q]["master"], rtol=1e-5, atol=1e-8)
    p64 = nn.Parameter(torch.randn(40, dtype=torch.float64, generator=torch.Generator()))
    ref64 = nn.Parameter(p64.detach().clone())
    o64 = po.SparseAdamW([p64], lr=torch.tensor(1e-2, dtype=torch.float64))
    r64 = torch.optim.AdamW([ref64], lr=torch.tensor(1e-2, dtype=torch.float64), foreach=False)
    for _ in range(3):
        p64.grad = torch.randn(40, dtype=torch.float64)
        ref64.grad = p64.grad.clone()
        o64.step()
        r64.step()
    torch.testing.assert_close(p64.detach(), ref64.detach(), rtol=1e-14, atol=0)


# -- 5. apply_delta / revert_delta: all or nothing ---------------------------------------------
class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(6, 5))
        self.b = nn.Parameter(torch.randn(8, 6).t())  # non-contiguous
        self.c = nn.Parameter(torch.randn(9))


def _tuned(base: nn.Module, seed: int) -> nn.Module:
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.3))
    return tuned


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_delta_on_non_contiguous_params_round_trips(tmp_path, seed):
    torch.manual_seed(seed)
    base = _Mixed()
    tuned = _tuned(base, seed)
    path = tmp_path / "d.safetensors"
    po.save_delta(base, tuned, path)
    m = copy.deepcopy(base)
    assert not m.b.is_contiguous()
    po.apply_delta(m, path)
    assert _same(m, tuned)
    po.revert_delta(m, path)
    assert _same(m, base)


def test_delta_write_failure_rolls_back(tmp_path, seed, monkeypatch):
    torch.manual_seed(seed)
    base = _Mixed()
    tuned = _tuned(base, seed)
    path = tmp_path / "d.safetensors"
    po.save_delta(base, tuned, path)
    m = copy.deepcopy(base)
    real = torch.Tensor.__setitem__
    calls = []

    def flaky(self, key, value):
        calls.append(1)
        if len(calls) == 2:  # the second parameter's write fails
            raise RuntimeError("injected write failure")
        return real(self, key, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        po.apply_delta(m, path)
    monkeypatch.undo()
    assert _same(m, base)  # the first parameter's write was put back


# -- 6. a torch state_dict asking for maximize / amsgrad / L2 ----------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: torch.optim.AdamW(ps, maximize=True), "maximize=True"),
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad=True"),
        (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), "decoupled_weight_decay=False"),
    ],
)
def test_foreign_adam_state_dict_flags_are_refused(seed, make, match):
    torch.manual_seed(seed)
    lin = nn.Linear(4, 3)
    torch_opt = make(lin.parameters())
    lin(torch.randn(2, 4)).sum().backward()
    torch_opt.step()
    opt = po.SparseAdamW(lin.parameters())

    def hyper():
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    groups = hyper()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(torch_opt.state_dict())
    assert not opt.state and hyper() == groups  # nothing changed


def test_plain_adamw_state_dict_still_loads(seed):
    torch.manual_seed(seed)
    lin = nn.Linear(4, 3)
    torch_opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 4)).sum().backward()
    torch_opt.step()
    opt = po.SparseAdamW(lin.parameters())
    opt.load_state_dict(torch_opt.state_dict())
    assert torch.equal(opt.state[lin.weight]["exp_avg"], torch_opt.state[lin.weight]["exp_avg"])


# -- 7. float64 params are computed in float64 -------------------------------------------------
def _kernels_forced() -> bool:
    """A stage that forces a kernel backend: float64 is refused there, by name (the kernels
    compute fp32; "auto" runs float64 on the reference, in float64)."""
    return backends.requested_backend("auto") not in ("auto", "torch")


def test_float64_dense_equals_torch_adamw_bit_for_bit(seed):
    torch.manual_seed(seed)
    model = TinyNet().double()
    twin = copy.deepcopy(model)
    opt = po.SparseAdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    if _kernels_forced():
        model.loss(*batches(1, seed)[0]).backward()
        with pytest.raises(po.BackendUnavailableError, match="the parameter is float64"):
            opt.step()
        return
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    for x, y in batches(4, seed):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            m.loss(x, y).backward()
            o.step()
    assert _same(model, twin)
    assert opt.state[model.fc1.weight]["exp_avg"].dtype == torch.float64


def test_float64_masked_equals_torch_adamw_on_the_selection(seed):
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(40, dtype=torch.float64))
    idx = torch.tensor([0, 3, 17, 39])
    sel = nn.Parameter(p.detach()[idx].clone())
    opt = po.SparseAdamW([p], mask={p: idx}, lr=1e-2)
    ref_opt = torch.optim.AdamW([sel], lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(seed)
    if _kernels_forced():
        p.grad = torch.randn(40, generator=g, dtype=torch.float64)
        with pytest.raises(po.BackendUnavailableError, match="the parameter is float64"):
            opt.step()
        assert torch.equal(p.detach()[idx], sel.detach())  # nothing written
        return
    for _ in range(5):
        p.grad = torch.randn(40, generator=g, dtype=torch.float64)
        sel.grad = p.grad[idx].clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(p.detach()[idx], sel.detach())


# -- 8. one Parameter under two names -----------------------------------------------------------
def test_one_parameter_under_two_names_keeps_both_masks(seed):
    torch.manual_seed(seed)
    mod = nn.Module()
    mod.a = nn.Parameter(torch.randn(10))
    mod.b = mod.a  # tied: listed under both names with remove_duplicate=False
    mask = {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 6])}
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's own warning
        opt = po.SparseAdamW(mod.named_parameters(remove_duplicate=False), mask=mask, lr=1e-2)
    before = mod.a.detach().clone()
    mod.a.grad = torch.randn(10, generator=torch.Generator().manual_seed(seed))
    sel = [0, 1, 6]
    sub, m, v = before[sel].clone(), torch.zeros(3), torch.zeros(3)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=1)
    ref.adamw_step_(sub, mod.a.grad[sel], None, m, v, None, **hyper)
    opt.step()
    assert opt.mask_indices()["a"].tolist() == sel
    rest = torch.ones(10, dtype=torch.bool)
    rest[sel] = False
    assert torch.equal(mod.a.detach()[rest], before[rest])
    # both names' entries, stepped once (Triton's weights may differ by a few ulp)
    torch.testing.assert_close(mod.a.detach()[sel], sub, rtol=2e-6, atol=1e-8)
    assert opt.state[mod.a]["exp_avg"].tolist() == m.tolist()


# -- 9. unsorted unsigned indices --------------------------------------------------------------
def test_unsorted_uint8_indices_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not sorted"):
        po.SparseMask({"w": torch.tensor([5, 3], dtype=torch.uint8)}, {"w": (10,)}, 10)
    mask = po.SparseMask({"w": torch.tensor([3, 5], dtype=torch.uint8)}, {"w": (10,)}, 10)
    mask.save(tmp_path / "m.safetensors")
    assert po.SparseMask.load(tmp_path / "m.safetensors") == mask


# -- 10. the C++ level-2 histogram's uint32 counters -------------------------------------------
def test_cpu_histogram_chunks_keep_uint32_counts_below_2_31():
    """A pass is split so no chunk holds 2**31 scores (the per-thread uint32 counters are
    merged between chunks).  A direct overflow test needs 2**32 scores (8-16 GiB): the
    plan the kernel uses is checked instead, plus a 1-thread pass over equal scores."""
    be = backends.load("cpu")
    if be is None:
        pytest.skip("C++ extension unavailable")
    plan = torch.ops.piece_optim._hist_num_chunks
    for total in (2**31, 2**32 + 5, 5 * 10**9, 3 * 2**33):
        for threads in (1, 2, 64):
            nch = plan(total, threads)
            assert -(-total // nch) < 2**31, (total, threads, nch)
    assert plan(10**6, 1) == 1 and plan(10**6, 2) > 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 200_003  # above the serial threshold (2**15): the chunked, per-thread path
        s2 = torch.full((n,), 0.0)
        hist = torch.zeros(ref.HIST_BINS, dtype=torch.int64)
        be.score_histogram_many_([None], [s2], "piece-f", 0.0, hist, 16, 0)
        assert int(hist[0]) == n and int(hist.sum()) == n
    finally:
        torch.set_num_threads(threads)


# -- 11. files: clear errors, checksums, permissions, atomic writes ----------------------------
def _mask(seed: int) -> po.SparseMask:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(500, generator=g)[:40].sort().values
    return po.SparseMask({"w": idx, "b": torch.tensor([2])}, {"w": (20, 25), "b": (7,)}, 600)


def test_bad_mask_files_give_clear_errors_with_the_path(tmp_path, seed):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    _mask(seed).save(good)
    data = good.read_bytes()
    cases = {
        "empty": (b"", "is empty"),
        "truncated": (data[: len(data) // 2], "truncated, corrupted or not a safetensors"),
        "json": (json.dumps({"idx": [1, 2]}).encode(), "truncated, corrupted or not a safet"),
        "tiny": (b"\x00" * 5, "truncated, corrupted or not a safetensors"),
    }
    for name, (content, match) in cases.items():
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(content)
        with pytest.raises(ValueError, match=match) as info:
            po.SparseMask.load(f)
        assert str(f) in str(info.value), name
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a piece_optim mask file") as info:
        po.SparseMask.load(foreign)
    assert str(foreign) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        po.SparseMask.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a piece_optim sparse delta file"):
        po.load_delta(good)


def _flip_bits(path: Path, seed: int, count: int) -> list[int]:
    data = bytearray(path.read_bytes())
    g = np.random.default_rng(seed)
    where = [int(i) for i in g.integers(0, len(data), size=count)]
    for i in where:
        data[i] ^= 1 << int(g.integers(0, 8))
    path.write_bytes(bytes(data))
    return where


def test_bit_flips_in_mask_and_delta_payloads_are_detected(tmp_path, seed):
    mask = _mask(seed)
    path = tmp_path / "m.safetensors"
    mask.save(path)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    data[header + 5] ^= 0x04  # inside the first index tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted") as info:
        po.SparseMask.load(path)
    assert str(path) in str(info.value)

    torch.manual_seed(seed)
    base = nn.Linear(6, 5)
    tuned = _tuned(base, seed)
    dpath = tmp_path / "d.safetensors"
    po.save_delta(base, tuned, dpath)
    header = 8 + int.from_bytes(dpath.read_bytes()[:8], "little")
    data = bytearray(dpath.read_bytes())
    data[-3] ^= 0x10  # a stored value
    dpath.write_bytes(bytes(data))
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match="corrupted"):
        po.apply_delta(m, dpath)
    assert _same(m, base)


def test_files_without_checksum_load_with_a_warning(tmp_path, seed):
    from safetensors.torch import save_file

    mask = _mask(seed)
    meta = {
        "format": "piece_optim.SparseMask/1",
        "numel_total": "600",
        "shapes": json.dumps({"w": [20, 25], "b": [7]}),
        "order": json.dumps(["w", "b"]),
    }
    old = tmp_path / "old.safetensors"
    save_file({"idx/w": mask["w"], "idx/b": mask["b"]}, str(old), metadata=meta)
    with pytest.warns(UserWarning, match="no checksum"):
        assert po.SparseMask.load(old) == mask


def test_saved_files_follow_the_umask_and_keep_an_existing_mode(tmp_path, seed):
    mask = _mask(seed)
    old_umask = os.umask(0o022)
    try:
        new = tmp_path / "new.safetensors"
        mask.save(new)
        torch.save({"x": 1}, tmp_path / "torch.pt")
        want = stat.S_IMODE((tmp_path / "torch.pt").stat().st_mode)
        assert stat.S_IMODE(new.stat().st_mode) == want == 0o644
        os.chmod(new, 0o640)
        mask.save(new)  # overwrite: keeps the file's mode, as torch.save does
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_save_fsyncs_the_data_before_the_rename(tmp_path, seed, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    _mask(seed).save(tmp_path / "m.safetensors")
    assert events[:2] == ["fsync", "replace"]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("exc", [OSError(28, "No space left"), KeyboardInterrupt()], ids=repr)
def test_interrupted_save_leaves_the_old_file_and_no_temp(tmp_path, seed, monkeypatch, exc):
    import piece_optim._files as files_mod  # the writer SparseMask.save uses

    path = tmp_path / "m.safetensors"
    old = _mask(seed)
    old.save(path)

    def dying(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise exc

    monkeypatch.setattr(files_mod, "_write_payload", dying)
    with pytest.raises(type(exc)):
        _mask(seed + 1).save(path)
    with pytest.raises(type(exc)):
        po.save_delta({"w": torch.zeros(3)}, {"w": torch.ones(3)}, tmp_path / "d.safetensors")
    monkeypatch.undo()
    assert po.SparseMask.load(path) == old
    assert _temps(tmp_path) == [] and not (tmp_path / "d.safetensors").exists()


def test_sigkill_during_save_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path, seed):
    path = tmp_path / "m.safetensors"
    old = _mask(seed)
    old.save(path)
    ready = tmp_path / "ready"
    child = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        import torch
        import piece_optim as po
        import piece_optim._files as files_mod  # the writer SparseMask.save uses

        def stuck(fd, data):
            os.write(fd, data[: len(data) // 2])
            Path({str(ready)!r}).touch()
            time.sleep(60)

        files_mod._write_payload = stuck
        po.SparseMask({{"w": torch.tensor([1, 2])}}, {{"w": (4,)}}, 4).save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "the child never reached the write"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_temps(tmp_path)) == 1  # the killed writer's temp file
    assert po.SparseMask.load(path) == old  # the old file is intact
    new = _mask(seed + 1)
    new.save(path)
    assert _temps(tmp_path) == []  # the stale temp of the dead process is gone
    assert po.SparseMask.load(path) == new


# -- 12. a second consumer of the same gradients is named --------------------------------------
def test_second_gradient_hook_owner_is_refused_and_named(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, in_backward=True)
    with pytest.raises(RuntimeError, match=r"ImportanceEstimator\(in_backward=True\).*test_rel"):
        po.ImportanceEstimator(model)
    with pytest.raises(RuntimeError, match=r"gradient hooks of ImportanceEstimator"):
        po.SparseAdamW(model.named_parameters(), sparse_grads=True)
    with pytest.raises(RuntimeError, match=r"close\(\)"):
        po.SparseAdamW(model.parameters())
    est.close()
    mask = {"fc1.weight": torch.tensor([0, 5]), "fc2.bias": torch.tensor([3])}
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, sparse_grads=True)
    with pytest.raises(RuntimeError, match=r"SparseAdamW\(sparse_grads=True\) made at"):
        po.ImportanceEstimator(model, in_backward=True)
    opt.close()
    po.ImportanceEstimator(model, in_backward=True).close()
    # mask=None: the hooks keep every dense gradient, so an estimator coexists
    opt = po.SparseAdamW(model.named_parameters(), sparse_grads=True)
    po.ImportanceEstimator(model).close()
    opt.close()


def test_collect_names_the_owner_that_took_the_gradients(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model)  # no hooks of its own
    mask = {"fc1.weight": torch.tensor([0, 5]), "fc2.bias": torch.tensor([3])}
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, sparse_grads=True)
    model.loss(*batches(1, seed)[0]).backward()
    with pytest.raises(RuntimeError, match=r"hooks of SparseAdamW\(sparse_grads=True\)"):
        est.collect()
    opt.close()
    model.loss(*batches(1, seed)[0]).backward()  # adds into the SparseGrads left behind
    with pytest.raises(RuntimeError, match=r"SparseGrad.*close\(\).*zero_grad\(\)"):
        est.collect()
    model.zero_grad()
    model.loss(*batches(1, seed)[0]).backward()
    est.collect()
    est.close()


def test_collect_names_another_open_estimator_that_cleared_the_gradients(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    a = po.ImportanceEstimator(model, method="piece-f")
    b = po.ImportanceEstimator(model, method="piece-s")
    model.loss(*batches(1, seed)[0]).backward()
    a.collect()
    other = r"is open, ImportanceEstimator\(in_backward=False\) on TinyNet made at .*test_rel"
    with pytest.raises(RuntimeError, match=other):
        b.collect()
    model.loss(*batches(1, seed)[0]).backward()  # a backward before each collect(): fine
    b.collect()
    a.close()
    with pytest.raises(RuntimeError, match=r"call loss.backward\(\) before collect"):
        b.collect()  # a is closed: the plain advice again
    b.close()


# -- 13. numpy numbers, unsigned indices, meta params, a model changed mid-estimate -------------
def test_numpy_numbers_are_accepted(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, eps=np.float64(1.0), exclude=("embed",))
    _calibrate(model, est, seed)
    assert est.select(k=np.int64(9)) == est.select(k=9)
    r = np.float32(0.03)
    assert est.select(ratio=r) == est.select(ratio=float(r))
    est.close()


@pytest.mark.parametrize(
    "dtype",
    [getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)],
    ids=str,
)
def test_wide_unsigned_indices_are_handled(dtype):
    mask = po.SparseMask({"w": torch.tensor([1, 3], dtype=dtype)}, {"w": (10,)}, 10)
    assert mask["w"].dtype == torch.int32 and mask["w"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="not sorted"):
        po.SparseMask({"w": torch.tensor([3, 1], dtype=dtype)}, {"w": (10,)}, 10)


def test_meta_parameters_are_refused_clearly():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'0.weight' is on the meta device.*to_empty"):
        po.ImportanceEstimator(model)


@pytest.mark.parametrize("change", ["replace_layer", "add_param", "unfreeze"])
def test_model_changed_between_collect_and_select_raises(seed, change):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model)
    _calibrate(model, est, seed)
    if change == "replace_layer":
        model.fc1 = nn.Linear(13, 29)
        match = "replaced by a new tensor: 'fc1.weight', 'fc1.bias'"
    elif change == "add_param":
        model.extra = nn.Parameter(torch.randn(3))
        match = "added or unfrozen: 'extra'"
    else:
        model.frozen.requires_grad_(True)
        match = "added or unfrozen: 'frozen'"
    with pytest.raises(RuntimeError, match=match):
        est.select(ratio=0.05)
    with pytest.raises(RuntimeError, match="make a new ImportanceEstimator"):
        est.collect()
    est.close()


def test_model_changes_that_do_not_matter_pass(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model)
    _calibrate(model, est, seed)
    model.fc2.bias.requires_grad_(False)  # freezing: that entry just scores 0
    model.fc1.weight.data = model.fc1.weight.data.clone()  # same Parameter object
    assert est.select(ratio=0.05).numel_selected() == int(0.05 * est._numel_total)
    est.close()


def test_backend_follows_the_stage():
    """Sanity: the stage's backend is the one these tests exercise through "auto"."""
    want = os.environ.get("PIECE_OPTIM_BACKEND")
    got = backends.get_backend("auto", "cpu").name
    assert want is None or got == want
