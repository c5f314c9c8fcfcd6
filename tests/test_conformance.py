"""SparseAdamW against torch.optim.AdamW, on the patterns of PyTorch's own optimizer tests.

Modelled on ``test/optim/test_optim.py`` (``TestOptimRenewed``) with its ``OptimizerInfo``
table (``torch/testing/_internal/common_optimizers.py``): param groups, schedulers,
closures, params without a gradient, state_dict determinism and a reload mid-run, deepcopy
and pickle, step / state_dict / load_state_dict hooks, a Tensor lr, torch.compile, AdamW's
positional arguments, freezing and unfreezing.

Every test runs twice:

* ``mask=None``: SparseAdamW must equal ``torch.optim.AdamW`` on the same model, bit for
  bit (each model does its own forward and backward);
* with a mask: SparseAdamW must equal ``torch.optim.AdamW`` *restricted to the selected
  entries*: AdamW on leaf tensors holding the selected entries, fed the same gradient
  entries, bit for bit; every other entry never changes.

The backend is whatever the test stage selects (``PIECE_OPTIM_BACKEND``), so each stage of
``scripts/test.sh`` checks its backend.  Sizes stay tiny: the Triton stage interprets.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from helpers import DEVICE, TinyNet, batches
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import piece_optim as po
from piece_optim.backends import requested_backend
from piece_optim.optim import SparseGrad

# torch.compile's import of torch.jit warns; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


# Bit for bit with torch's CPU kernels: the reference and the C++ backend.  The Triton
# kernel (interpreted or on a GPU) takes an IEEE square root where torch's CPU AdamW takes
# MKL's faithful one (1 ulp off IEEE on ~17% of inputs), and torch's CUDA kernels order
# addcdiv differently: weights may differ in the last bits (see kernels/adamw.py), so: close.
EXACT = DEVICE.type == "cpu" and requested_backend("auto") in ("auto", "torch", "cpu")


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if EXACT:
        assert torch.equal(a, b), f"{what}: max abs diff {float((a - b).abs().max())}"
    else:  # a few ulp over these <= 8 steps, far below what any wrong formula gives
        # the message keeps torch's figures (mismatches, greatest differences): a GPU run
        # is rare, and 'embed.weight' alone did not say how far off it was
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


HP = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _mask(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random sorted indices in three tensors (a quarter of their entries); the rest frozen."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("fc1.weight", "fc1.bias", "fc2.weight"):
        n = model.get_parameter(name).numel()
        out[name] = torch.randperm(n, generator=g)[: n // 4 + 1].sort().values
    return out


def _two_groups(named: dict[str, nn.Parameter], lr2: float = 5e-2) -> list[dict]:
    first = ("embed.weight", "fc1.weight", "fc1.bias", "frozen", "empty")
    return [
        {"params": [(n, p) for n, p in named.items() if n in first]},
        {
            "params": [(n, p) for n, p in named.items() if n not in first],
            "lr": lr2,
            "weight_decay": 0.0,
        },
    ]


class Case:
    """SparseAdamW on ``model`` and its reference: AdamW on a twin, or on the selected entries.

    ``groups(named)`` maps ``{name: param}`` to param groups; the reference gets the same
    groups over its own tensors (the twin's params, or one leaf per selected tensor).
    """

    def __init__(
        self, seed: int, masked: bool, groups=None, sparse_grads: bool = False, **hp
    ) -> None:
        torch.manual_seed(seed)
        self.model = TinyNet()
        self.twin = copy.deepcopy(self.model)
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.mask = _mask(self.model, seed) if masked else None
        hp = {**HP, **hp}
        groups = groups or (lambda named: [{"params": list(named.items())}])
        self.opt = po.SparseAdamW(
            groups(dict(self.model.named_parameters())),
            mask=self.mask,
            sparse_grads=sparse_grads,
            **hp,
        )
        if masked:
            self.leaves = {
                n: nn.Parameter(self.start[n].view(-1)[i].clone()) for n, i in self.mask.items()
            }
            ref_groups = []
            for g in groups(dict(self.model.named_parameters())):
                ps = [(n, self.leaves[n]) for n, _ in g["params"] if n in self.leaves]
                if ps:
                    ref_groups.append({**g, "params": ps})
        else:
            ref_groups = groups(dict(self.twin.named_parameters()))
        # foreach=False: the single-tensor path, torch's CPU default (CUDA defaults to
        # foreach, which refuses a Tensor lr)
        self.ref = torch.optim.AdamW(ref_groups, foreach=False, **hp)

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.model.loss(x, y)
        loss.backward()
        if self.mask is None:
            self.twin.loss(x, y).backward()
        else:  # the reference is fed the same gradient entries
            for n, leaf in self.leaves.items():
                g = self.model.get_parameter(n).grad
                leaf.grad = (
                    g.selected_values if isinstance(g, SparseGrad) else g.reshape(-1)[self.mask[n]]
                ).clone()
        return loss

    def step(self, data, zero: bool = True) -> None:
        for x, y in data:
            self.backward(x, y)
            self.opt.step()
            self.ref.step()
            if zero:
                self.opt.zero_grad()
                self.ref.zero_grad()
                self.twin.zero_grad()

    def assert_equal(self) -> None:
        ours = dict(self.model.named_parameters())
        if self.mask is None:
            for n, p in self.twin.named_parameters():
                assert_same(ours[n], p, n)
            return
        for n, p in ours.items():
            flat, start = p.detach().view(-1), self.start[n].view(-1)
            if n not in self.mask:
                assert torch.equal(flat, start), f"{n}: a frozen parameter changed"
                continue
            idx = self.mask[n]
            assert_same(flat[idx], self.leaves[n].detach(), n)
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(flat[keep], start[keep]), f"{n}: an unselected entry changed"

    def moved(self) -> bool:
        return any(not torch.equal(p, self.start[n]) for n, p in self.model.named_parameters())


masked = pytest.mark.parametrize("masked", [False, True], ids=["mask=None", "mask"])


@masked
def test_param_groups_scheduler_and_closure(seed, masked):
    case = Case(seed, masked, groups=_two_groups)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[3e-2, 6e-2], total_steps=8)
        for o in (case.opt, case.ref)
    ]
    for x, y in batches(8, seed + 1):

        def closure(x=x, y=y):  # as torch's tests: forward and backward inside step()
            for o in (case.opt, case.ref, case.twin):
                o.zero_grad()
            return case.backward(x, y)

        loss = case.opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        case.ref.step()
        for s in scheds:
            s.step()
    assert [g["lr"] for g in case.opt.param_groups] == [g["lr"] for g in case.ref.param_groups]
    assert case.moved()
    case.assert_equal()


@masked
def test_params_without_grad_are_a_no_op(seed, masked):
    case = Case(seed, masked)
    case.opt.step()  # no gradient anywhere: nothing happens, no state
    assert not case.opt.state and not case.moved()
    x, y = batches(1, seed)[0]
    case.step([(x, y)])
    name = "fc1.weight"
    p = case.model.get_parameter(name)
    before = p.detach().clone()
    state = {k: v.clone() for k, v in case.opt.state[p].items()}
    case.backward(x, y)
    p.grad = None  # this param skips the step, the others take it
    case.opt.step()
    assert torch.equal(p, before)
    assert all(torch.equal(v, state[k]) for k, v in case.opt.state[p].items())


@masked
def test_state_dict_is_deterministic_and_reloads_mid_run(seed, masked):
    data = batches(7, seed + 1)
    full = Case(seed, masked)
    full.step(data)
    case = Case(seed, masked)
    case.step(data[:3])
    sd = case.opt.state_dict()
    assert_state_dicts_equal(sd, case.opt.state_dict())
    buf = io.BytesIO()
    torch.save({"model": case.model.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model = TinyNet()
    model.load_state_dict(ck["model"])
    opt = po.SparseAdamW(model.named_parameters(), mask=case.mask, **HP)
    opt.load_state_dict(ck["opt"])
    assert_state_dicts_equal(opt.state_dict(), sd)
    case.model, case.opt = model, opt  # continue on the reloaded pair
    case.step(data[3:])
    for (n, p), q in zip(full.model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), n
    for st, st2 in zip(full.opt.state.values(), opt.state.values(), strict=True):
        assert st.keys() == st2.keys()
        assert all(torch.equal(st[k], st2[k]) for k in st)


def test_adamw_state_dict_loads_into_mask_none_and_back(seed):
    """mask=None keeps AdamW's state layout: checkpoints move both ways mid-run."""
    data = batches(6, seed + 1)
    case = Case(seed, False)
    case.step(data[:3])
    model = copy.deepcopy(case.twin)
    opt = po.SparseAdamW(model.named_parameters(), **HP)
    opt.load_state_dict(case.ref.state_dict())  # AdamW's state_dict into SparseAdamW
    back = torch.optim.AdamW(case.model.parameters(), foreach=False, **HP)
    back.load_state_dict(case.opt.state_dict())  # and SparseAdamW's into AdamW
    for x, y in data[3:]:
        for m, o in ((model, opt), (case.twin, case.ref), (case.model, back)):
            m.loss(x, y).backward()
            o.step()
            o.zero_grad()
    for (n, p), q, r in zip(
        model.named_parameters(), case.twin.parameters(), case.model.parameters(), strict=True
    ):
        assert_same(p, q, n)
        assert_same(r, q, n)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k, st in a["state"].items():
        assert st.keys() == b["state"][k].keys()
        assert all(torch.equal(v, b["state"][k][key]) for key, v in st.items())
    ia, ib = a["piece_mask"]["indices"], b["piece_mask"]["indices"]
    assert ia.keys() == ib.keys()
    assert all((v is None and ib[k] is None) or torch.equal(v, ib[k]) for k, v in ia.items())


@pytest.mark.parametrize(
    "masked, how, sparse_grads",
    [
        (False, "deepcopy", False),
        (True, "deepcopy", True),
        (False, "pickle", True),
        (True, "pickle", False),
    ],
)
def test_deepcopy_and_pickle_give_a_working_optimizer(seed, masked, how, sparse_grads):
    data = batches(5, seed + 1)
    case = Case(seed, masked, sparse_grads=sparse_grads)
    case.step(data[:2])
    pair = (case.model, case.opt)
    model, opt = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert opt.param_groups[0]["params"][0] is next(model.parameters())  # holds the copies
    assert opt.sparse_grads == sparse_grads and opt.mask_indices().keys() == (
        case.opt.mask_indices().keys()
    )
    for x, y in data[2:]:
        for m, o in ((case.model, case.opt), (model, opt)):
            m.loss(x, y).backward()
            if sparse_grads and masked:  # the copy's hooks are installed on its own params
                assert isinstance(m.fc1.weight.grad, SparseGrad)
            o.step()
            o.zero_grad()
    for (n, p), q in zip(case.model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert case.moved()


@masked
def test_hooks_run_like_torchs(seed, masked):
    case = Case(seed, masked)
    calls = []
    case.opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    case.opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    handle = register_optimizer_step_pre_hook(
        lambda o, a, k: calls.append("global") if o is case.opt else None
    )
    try:
        case.step(batches(1, seed))
    finally:
        handle.remove()
    assert calls == ["global", "pre", "post"]

    case.opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    case.opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    sd = case.opt.state_dict()
    assert calls[-1] == "sd_pre" and sd["extra"] == 1 and "piece_mask" in sd

    def lr_pre(o, sd):  # load pre-hooks run first and may replace the state_dict
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 1.5e-2
        return sd

    other = po.SparseAdamW(case.model.named_parameters(), mask=case.mask, **HP)
    other.register_load_state_dict_pre_hook(lr_pre)
    other.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1.5e-2 and calls[-1] == "load_post"

    def corrupt(o, sd):  # the mask check sees what the pre-hooks made of the state_dict
        sd = copy.deepcopy(sd)
        sd["piece_mask"]["indices"].pop(next(iter(sd["piece_mask"]["indices"])))
        return sd

    third = po.SparseAdamW(case.model.named_parameters(), mask=case.mask, **HP)
    third.register_load_state_dict_pre_hook(corrupt)
    with pytest.raises(ValueError, match="different mask"):
        third.load_state_dict(sd)


@masked
def test_tensor_lr_is_treated_as_adamw_treats_it(seed, masked):
    """Tensor lr and betas (a scheduler writing into lr): fp32 scalar math, as AdamW's."""
    case = Case(seed, masked, lr=torch.tensor(2e-2), betas=(torch.tensor(0.8), torch.tensor(0.95)))
    scheds = [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.3, total_iters=5)
        for o in (case.opt, case.ref)
    ]
    for x, y in batches(8, seed + 1):
        case.step([(x, y)])
        for s in scheds:
            s.step()
    assert isinstance(case.opt.param_groups[0]["lr"], torch.Tensor)
    case.assert_equal()


@pytest.mark.parametrize(
    "masked, sparse_grads",
    [(False, False), (True, False), (True, True)],
    ids=["mask=None", "mask", "mask+sparse_grads"],
)
def test_compiled_step_has_no_graph_break_and_equals_compiled_adamw(seed, masked, sparse_grads):
    """torch.compile(step): no graph break torch's AdamW does not have, and AdamW's numbers."""
    from torch._dynamo.utils import counters

    case = Case(seed, masked, sparse_grads=sparse_grads)
    # the "eager" backend runs the traced graph as is, so both are compared as traced
    breaks = []
    steps = []
    for opt in (case.opt, case.ref):
        torch._dynamo.reset()
        counters.clear()
        steps.append(torch.compile(opt.step, backend="eager"))
        case.backward(*batches(1, seed)[0])  # a first step outside the comparison...
        steps[-1]()
        breaks.append(set(counters["graph_break"]))
    # ... only to count the breaks: torch's step decorator puts two user-inserted ones
    assert breaks[0] == breaks[1], breaks[0] - breaks[1]
    case = Case(seed, masked, sparse_grads=sparse_grads)
    steps = [torch.compile(o.step, backend="eager") for o in (case.opt, case.ref)]
    for x, y in batches(4, seed + 1):
        case.backward(x, y)
        for st in steps:
            st()
        for o in (case.opt, case.ref, case.twin):
            o.zero_grad()
    case.assert_equal()
    assert case.moved()


def test_positional_arguments_are_adamws(seed):
    ours = list(inspect.signature(po.SparseAdamW).parameters.values())
    theirs = list(inspect.signature(torch.optim.AdamW).parameters.values())
    positional = [p.name for p in theirs if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in ours if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    assert all(
        p.default == q.default
        for p, q in zip(ours, theirs, strict=False)
        if p.name in positional[1:]
    )
    torch.manual_seed(seed)
    a, b = TinyNet(), None
    b = copy.deepcopy(a)
    opt_a = po.SparseAdamW(a.parameters(), 3e-2, (0.7, 0.9), 1e-5, 0.2)
    opt_b = torch.optim.AdamW(b.parameters(), 3e-2, (0.7, 0.9), 1e-5, 0.2, foreach=False)
    for x, y in batches(3, seed + 1):
        for m, o in ((a, opt_a), (b, opt_b)):
            m.loss(x, y).backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert_same(p, q, n)
    with pytest.raises(ValueError, match="amsgrad"):
        po.SparseAdamW(a.parameters(), 1e-3, (0.9, 0.999), 1e-8, 0.0, True)
    with pytest.raises(TypeError):
        po.SparseAdamW(a.parameters(), 1e-3, (0.9, 0.999), 1e-8, 0.0, False, {"fc1.weight": 0})


@pytest.mark.parametrize("sparse_grads", [False, True], ids=["dense_grads", "sparse_grads"])
@masked
def test_freeze_then_unfreeze_trains_like_adamw(seed, masked, sparse_grads):
    """A param frozen when the optimizer is made is held: unfrozen later, it trains."""
    torch.manual_seed(seed)
    model = TinyNet()
    model.fc1.weight.requires_grad_(False)
    twin = copy.deepcopy(model)
    mask = _mask(model, seed) if masked else None
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, sparse_grads=sparse_grads, **HP)
    if masked:  # the reference: every selected entry as a leaf, frozen alike
        leaves = {
            n: nn.Parameter(model.get_parameter(n).detach().view(-1)[i].clone())
            for n, i in mask.items()
        }
        leaves["fc1.weight"].requires_grad_(False)
        ref = torch.optim.AdamW(list(leaves.values()), foreach=False, **HP)
    else:
        ref = torch.optim.AdamW(twin.parameters(), foreach=False, **HP)
    for step, (x, y) in enumerate(batches(6, seed + 1)):
        if step == 2:
            model.fc1.weight.requires_grad_(True)
            twin.fc1.weight.requires_grad_(True)
            if masked:
                leaves["fc1.weight"].requires_grad_(True)
        model.loss(x, y).backward()
        if masked:
            for n, leaf in leaves.items():
                g = model.get_parameter(n).grad
                if leaf.requires_grad and g is not None:
                    vals = g.selected_values if isinstance(g, SparseGrad) else g.view(-1)[mask[n]]
                    leaf.grad = vals.clone()
        else:
            # The twin steps on the very gradients the optimizer saw, as the masked branch
            # does; its own backward only checks them.  On a GPU a second backward may sum
            # in another order (atomics), and Adam turns a last-bit difference in a
            # near-zero gradient into a difference of up to lr: the H200 run's one failure
            # (this test, CUDA backend; the masked branch and the CPU stages never differ).
            twin.loss(x, y).backward()
            for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
                g = p.grad
                if g is None:
                    assert q.grad is None, n
                    continue
                dense = g.selected_values.view_as(p) if isinstance(g, SparseGrad) else g
                if EXACT:
                    assert torch.equal(dense, q.grad), n
                else:  # summation order only: ulps of the largest terms
                    scale = float(q.grad.abs().max()) if q.grad.numel() else 0.0
                    torch.testing.assert_close(dense, q.grad, rtol=1e-4, atol=1e-6 * scale)
                q.grad = dense.clone()
        if sparse_grads and masked and step >= 3:  # the hook came with the next step()
            assert isinstance(model.fc1.weight.grad, SparseGrad)
        opt.step()
        ref.step()
        for o in (opt, ref, twin):
            o.zero_grad()
    assert model.fc1.weight in opt.state  # it trained
    if masked:
        for n, leaf in leaves.items():
            assert_same(model.get_parameter(n).detach().view(-1)[mask[n]], leaf.detach(), n)
    else:
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert_same(p, q, n)
    opt.close()


@pytest.mark.parametrize("change", ["load_state_dict", "reinit", "zero_"])
def test_low_precision_master_follows_changes_made_outside(seed, change):
    """bf16: the fp32 master re-reads entries changed outside the optimizer, keeps the rest."""
    torch.manual_seed(seed)
    model = TinyNet().to(torch.bfloat16)
    mask = _mask(model, seed)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    data = batches(4, seed + 1)
    for x, y in data[:2]:
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    p = model.fc1.weight
    if change == "load_state_dict":
        model.load_state_dict(TinyNet().to(torch.bfloat16).state_dict())
    elif change == "reinit":
        nn.init.normal_(p)
    else:
        p.detach().zero_()
    # the reference: the same optimizer state, each master entry re-read from its param
    # where the param no longer holds what the last step wrote (the master, rounded)
    twin = copy.deepcopy(model)
    opt_t = po.SparseAdamW(twin.named_parameters(), mask=mask, **HP)
    opt_t.load_state_dict(opt.state_dict())
    for q, st in opt_t.state.items():
        cur = q.detach().view(-1)[st["idx"].long()]
        changed = cur != st["master"].to(cur.dtype)
        if q is twin.fc1.weight:
            assert changed.float().mean() > 0.9  # the change really reached the master
        st["master"] = torch.where(changed, cur.float(), st["master"])
    for m, o in ((model, opt), (twin, opt_t)):
        x, y = data[2]
        m.loss(x, y).backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), n
    if change == "zero_":
        # lr 0: nothing may move, so the zeros stay (the old master is not written back)
        for g in opt.param_groups:
            g["lr"] = 0.0
        model.zero_grad()
        model.loss(*data[3]).backward()
        before = p.detach().clone()
        opt.step()
        assert torch.equal(p, before)


def test_index_tensors_follow_the_param_device(seed):
    """The model moves after the optimizer is made (Trainer does this): indices follow.

    With the CPU as the test device the move is CPU to CPU; the GPU stage
    (PIECE_OPTIM_TEST_DEVICE=cuda) runs it CPU to CUDA.
    """
    torch.manual_seed(seed)
    model = TinyNet().cpu()
    mask = _mask(model, seed)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, sparse_grads=True, **HP)
    model.to(DEVICE)
    x, y = batches(1, seed)[0]
    model.loss(x, y).backward()
    opt.step()
    for p, st in opt.state.items():
        assert st["idx"].device == p.device == st["exp_avg"].device
    opt.close()
