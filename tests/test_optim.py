"""SparseAdamW against torch.optim.AdamW and a hand-written AdamW oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, TinyNet, adamw_oracle, batches, rel_err

import piece_optim as po


def _random_mask(model: torch.nn.Module, frac: float, seed: int, skip=("embed",)) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.numel() == 0 or any(s in name for s in skip):
            continue
        k = max(1, int(frac * p.numel()))
        out[name] = torch.randperm(p.numel(), generator=g)[:k].sort().values
    return out


@pytest.mark.parametrize(
    "schedule", ["cosine", "onecycle", "step", "plateau"], ids=lambda s: f"sched={s}"
)
def test_dense_equals_torch_adamw(seed, schedule):
    """mask=None is torch's AdamW: two groups (lr, wd differ), a scheduler, 25 steps."""
    torch.manual_seed(seed)
    ref = TinyNet()
    ours = copy.deepcopy(ref)

    def groups(m):
        return [
            {"params": [m.embed.weight, m.fc1.weight, m.fc1.bias], "lr": 3e-3, "weight_decay": 0.1},
            {"params": [m.fc2.weight, m.fc2.bias], "lr": 1e-2, "weight_decay": 0.0},
        ]

    opt_ref = torch.optim.AdamW(groups(ref), betas=(0.9, 0.95), eps=1e-8)
    opt = po.SparseAdamW(groups(ours), mask=None, betas=(0.9, 0.95), eps=1e-8)

    def sched(o):
        if schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=25)
        if schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[5e-3, 2e-2], total_steps=25)
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1)

    s_ref, s = sched(opt_ref), sched(opt)
    for x, y in batches(25, seed + 1):
        for model, o, sc in ((ref, opt_ref, s_ref), (ours, opt, s)):
            o.zero_grad()
            loss = model.loss(x, y)
            loss.backward()
            o.step()
            sc.step(loss.item()) if schedule == "plateau" else sc.step()
    for (n, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        if b.numel():
            assert rel_err(a, b) < 1e-6, n
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_ref.param_groups]


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_masked_equals_oracle_and_frozen_entries_untouched(seed, wd):
    torch.manual_seed(seed)
    model = TinyNet()
    mask = _random_mask(model, 0.2, seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = dict(lr=2e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=wd)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **hp)
    # oracle state, float64, on the selected entries only
    w = {n: start[n].view(-1)[i.long()].double() for n, i in mask.items()}
    m = {n: torch.zeros_like(w[n]) for n in mask}
    v = {n: torch.zeros_like(w[n]) for n in mask}
    for step, (x, y) in enumerate(batches(9, seed + 1), start=1):
        opt.zero_grad()
        model.loss(x, y).backward()
        grads = {
            n: p.grad.view(-1)[mask[n].long()].double()
            for n, p in model.named_parameters()
            if n in mask
        }
        opt.step()
        for n in mask:
            w[n], m[n], v[n] = adamw_oracle(
                w[n],
                grads[n],
                m[n],
                v[n],
                lr=2e-2,
                beta1=0.8,
                beta2=0.9,
                eps=1e-6,
                wd=wd,
                step=step,
            )
    for n, p in model.named_parameters():
        flat, orig = p.detach().view(-1), start[n].view(-1)
        if n in mask:
            idx = mask[n].long()
            assert rel_err(flat[idx], w[n]) < 1e-5, n
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(flat[keep], orig[keep]), f"{n}: an unselected entry changed"
            assert not torch.equal(flat[idx], orig[idx]), f"{n}: selected entries never moved"
        else:
            assert torch.equal(flat, orig), f"{n}: a frozen parameter changed"
    # state only for selected params, sized k
    assert {opt._names[p] for p in opt.state} == set(mask)
    for p, st in opt.state.items():
        k = mask[opt._names[p]].numel()
        assert st["exp_avg"].shape == (k,) and st["exp_avg"].dtype == torch.float32
        assert st["idx"].dtype == torch.int32


def test_state_bytes_and_ratio(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(300, 301), torch.nn.Linear(301, 299)).to(DEVICE)
    n = sum(p.numel() for p in model.parameters())
    mask = _random_mask(model, 1e-3, seed, skip=())
    k = sum(i.numel() for i in mask.values())
    opt = po.SparseAdamW(model.named_parameters(), mask=mask)
    dense = torch.optim.AdamW(copy.deepcopy(model).parameters())
    x = torch.randn(3, 300, device=DEVICE)
    model(x).square().mean().backward()
    opt.step()
    # 4 B index + 4 B m + 4 B v per selected entry, plus a 4 B step counter per tensor
    assert opt.state_bytes() == 12 * k + 4 * len(mask)
    assert opt.trainable_numel() == k
    dense_model = dense.param_groups[0]["params"]
    sum(p.sum() for p in dense_model).backward()
    dense.step()
    dense_bytes = sum(
        t.numel() * t.element_size() for st in dense.state.values() for t in st.values()
    )
    assert dense_bytes >= 8 * n
    assert dense_bytes / opt.state_bytes() > 500


def test_state_dict_reload_continues_bit_identically(seed, tmp_path):
    torch.manual_seed(seed)
    base = TinyNet()
    mask = _random_mask(base, 0.3, seed)
    data = batches(10, seed + 1)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)

    def run(model, opt, data):
        for x, y in data:
            opt.zero_grad()
            model.loss(x, y).backward()
            opt.step()

    a = copy.deepcopy(base)
    opt_a = po.SparseAdamW(a.named_parameters(), mask=mask, **hp)
    run(a, opt_a, data)

    b = copy.deepcopy(base)
    opt_b = po.SparseAdamW(b.named_parameters(), mask=mask, **hp)
    run(b, opt_b, data[:4])
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    c = TinyNet()
    c.load_state_dict(ck["model"])
    opt_c = po.SparseAdamW(c.named_parameters(), mask=mask, **hp)
    opt_c.load_state_dict(ck["opt"])
    run(c, opt_c, data[4:])
    for (n, pa), pc in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pc), n
    for pa, pc in zip(opt_a.state.values(), opt_c.state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "idx", "step"):
            assert torch.equal(pa[key], pc[key]), key


def test_load_state_dict_keeps_fp32_state_for_bf16_params(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(17, 9).to(DEVICE, torch.bfloat16)
    mask = {"weight": torch.tensor([0, 5, 100, 152]), "bias": torch.tensor([3])}
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-3)
    model(torch.randn(2, 17, dtype=torch.bfloat16, device=DEVICE)).float().square().sum().backward()
    opt.step()
    sd = opt.state_dict()
    opt2 = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-3)
    opt2.load_state_dict(sd)
    for st, st0 in zip(opt2.state.values(), opt.state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "master"):
            assert st[key].dtype == torch.float32, key
            assert torch.equal(st[key], st0[key]), key
        assert st["idx"].dtype == torch.int32


def test_closure_zero_grad_and_unnamed_params_with_bound_mask(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    named = _random_mask(model, 0.1, seed)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    smask = po.SparseMask(named, {n: p.shape for n, p in model.named_parameters()}, total)
    opt = po.SparseAdamW(model.parameters(), mask=smask.bind(model), lr=1e-2)
    x, y = batches(1, seed)[0]

    def closure():
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        return loss

    before = model.fc1.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert not torch.equal(before, model.fc1.weight)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_frozen_and_zero_size_params_are_held_like_adamw(seed):
    """A frozen param is held and untouched; a zero-size one gets (empty) state, as in AdamW."""
    torch.manual_seed(seed)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt = po.SparseAdamW(model.named_parameters(), mask=None, lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x, y = batches(1, seed)[0]
    for m, o in ((model, opt), (ref, opt_ref)):
        m.loss(x, y).backward()
        o.step()
    frozen = ref.frozen.detach()
    assert torch.equal(model.frozen, frozen) and model.empty.numel() == 0
    assert model.frozen not in opt.state and ref.frozen not in opt_ref.state
    assert opt.state[model.empty].keys() == opt_ref.state[ref.empty].keys()
    assert opt.state[model.empty]["step"] == opt_ref.state[ref.empty]["step"] == 1


def test_unsupported_flags_raise():
    p = [torch.nn.Parameter(torch.randn(3))]
    flags = ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"]
    for flag, value in [(f, True) for f in flags]:
        with pytest.raises(ValueError, match=flag):
            po.SparseAdamW(p, **{flag: value})


@pytest.mark.parametrize(
    "mask, match",
    [
        ({"fc1.weight": torch.tensor([0, 10_000])}, "out of range"),
        ({"fc1.weight": torch.tensor([-1, 3])}, "out of range"),
        ({"fc1.weight": torch.tensor([3, 3, 4])}, "duplicated"),
        ({"fc1.weight": torch.tensor([5, 3])}, "not sorted"),
        ({"fc1.weight": torch.tensor([0.0, 1.0])}, "integer"),
        ({"fc1.weight": torch.tensor([[0, 1]])}, "1-D"),
        ({"nonexistent.weight": torch.tensor([0])}, "does not hold"),
    ],
    ids=["oob", "negative", "dup", "unsorted", "float", "2d", "unknown-name"],
)
def test_bad_masks_raise(mask, match):
    model = TinyNet()
    with pytest.raises(ValueError, match=match):
        po.SparseAdamW(model.named_parameters(), mask=mask)


def test_named_mask_needs_names():
    model = TinyNet()
    with pytest.raises(ValueError, match="named_parameters"):
        po.SparseAdamW(model.parameters(), mask={"fc1.weight": torch.tensor([0])})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "learning rate"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"master_weights": "yes"}, "master_weights"),
        ({"backend": "gpu"}, "backend"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        po.SparseAdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_state_dict_from_other_mask_or_shape_is_refused_and_changes_nothing(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    m1 = {"fc1.weight": torch.tensor([1, 2, 3]), "fc2.bias": torch.tensor([0])}
    m2 = {"fc1.weight": torch.tensor([1, 2, 4]), "fc2.bias": torch.tensor([0])}
    x, y = batches(1, seed)[0]
    o1 = po.SparseAdamW(model.named_parameters(), mask=m1, lr=1e-2)
    model.loss(x, y).backward()
    o1.step()
    sd = o1.state_dict()
    o2 = po.SparseAdamW(model.named_parameters(), mask=m2, lr=1e-2)
    o2.zero_grad()
    model.loss(x, y).backward()
    o2.step()
    before = copy.deepcopy(o2.state_dict())
    with pytest.raises(ValueError, match="different mask"):
        o2.load_state_dict(sd)
    after = o2.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for k, st in before["state"].items():
        for key, val in st.items():
            assert torch.equal(val, after["state"][k][key])
    # a dense state_dict into a sparse optimizer, and a sparse one into a dense optimizer
    o3 = po.SparseAdamW(model.named_parameters(), mask=None, lr=1e-2)
    model.loss(x, y).backward()
    o3.step()
    with pytest.raises(ValueError, match="different mask|dense"):
        o1.load_state_dict(o3.state_dict())
    with pytest.raises(ValueError, match="different mask"):
        o3.load_state_dict(sd)
    # another model's shape
    other = TinyNet(hidden=31)
    o4 = po.SparseAdamW(other.named_parameters(), mask=None)
    with pytest.raises(ValueError):
        o4.load_state_dict(o3.state_dict())


def test_mask_shape_mismatch_raises():
    model = TinyNet()
    smask = po.SparseMask({"fc1.weight": torch.tensor([0])}, {"fc1.weight": (3, 3)}, 9)
    with pytest.raises(ValueError, match="shape"):
        po.SparseAdamW(model.named_parameters(), mask=smask)
    with pytest.raises(ValueError, match="shape"):
        smask.bind(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_master_weights(seed, dtype):
    """The fp32 master accumulates updates below the storage resolution."""
    torch.manual_seed(seed)
    p = torch.nn.Parameter(
        (torch.full((64,), 1.0, dtype=dtype) + torch.rand(64, dtype=dtype) / 8).to(DEVICE)
    )
    start = p.detach().clone()
    idx = torch.arange(0, 64, 3)
    opt = po.SparseAdamW([("p", p)], mask={"p": idx}, lr=1e-4, weight_decay=0.0)
    for _ in range(40):  # lr 1e-4 per step, far below bf16's spacing of 2**-7 at 1.0
        p.grad = torch.ones_like(p)
        opt.step()
    master = next(iter(opt.state.values()))["master"]
    expected = start.float()[idx] - 40 * 1e-4
    assert rel_err(master, expected) < 1e-5
    # the stored param is the master rounded to the param dtype
    assert torch.equal(p.detach()[idx], master.to(dtype))
    assert p.detach()[idx].float().sub(start.float()[idx]).abs().max() > 0


def test_mask_that_trains_nothing_raises_naming_the_cause(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    mask = {"fc1.weight": torch.tensor([0, 7]), "fc2.bias": torch.tensor([3])}
    model.fc1.weight.requires_grad_(False)
    model.fc2.bias.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"nothing to train.*frozen.*'fc1\.weight'.*requires_grad_"
    ):
        po.SparseAdamW(model.named_parameters(), mask=mask)
    model.fc2.bias.requires_grad_(True)  # one trainable: fine, the frozen one trains if unfrozen
    po.SparseAdamW(model.named_parameters(), mask=mask)
    empty = po.SparseMask({}, {}, 10)
    with pytest.raises(ValueError, match="no entry"):
        po.SparseAdamW(model.named_parameters(), mask=empty)
    # names changed by a wrapper: said so, with the fix
    wrapped = torch.nn.ModuleDict({"module": model})
    with pytest.raises(ValueError, match=r"does not hold.*wrapper.*mask\.for_model"):
        po.SparseAdamW(wrapped.named_parameters(), mask=mask)
    # a bound mask whose params were not passed because they are frozen (Trainer's way)
    bound = po.SparseMask(mask, {n: model.get_parameter(n).shape for n in mask}, 999).bind(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"'fc1\.weight'.*frozen.*not hold|frozen"):
        po.SparseAdamW(trainable, mask=bound)


def test_mask_for_model_follows_wrapper_renaming(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    mask = po.SparseMask(
        {"fc1.weight": torch.tensor([1, 4]), "fc2.bias": torch.tensor([2])}, shapes, 500
    )
    wrapped = torch.nn.ModuleDict({"module": torch.nn.ModuleDict({"_orig_mod": model})})
    remapped = mask.for_model(wrapped)
    assert remapped.names() == ["module._orig_mod.fc1.weight", "module._orig_mod.fc2.bias"]
    assert remapped.numel_total() == 500 and torch.equal(
        remapped[remapped.names()[0]], mask["fc1.weight"]
    )
    assert remapped.for_model(model) == mask  # and back
    assert mask.rename({"fc2.bias": "b"}).names() == ["fc1.weight", "b"]
    with pytest.raises(ValueError, match="same new name"):
        mask.rename(lambda n: "x")
    with pytest.raises(KeyError, match="no parameter of the model matches 'fc1.weight'"):
        mask.for_model(torch.nn.Linear(2, 2))
