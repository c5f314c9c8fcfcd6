"""SparseAdamW under torch.autocast and torch.amp.GradScaler (fp16), sparse_grads=False,
on the test device."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, TinyNet, batches, rel_err

import piece_optim as po


def _run(model, opt, data, scaler=None, dtype=torch.float16):
    for x, y in data:
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss = model.loss(x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_with_grad_scaler_equals_torch_adamw(seed, dtype):
    """mask=None under autocast + GradScaler takes the same steps as torch's AdamW."""
    torch.manual_seed(seed)
    ref = TinyNet()
    ours = copy.deepcopy(ref)
    data = batches(8, seed + 1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    opt = po.SparseAdamW(ours.named_parameters(), mask=None, lr=1e-2, weight_decay=0.05)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10) for _ in range(2)]
    for step, batch in enumerate(data):
        _run(ref, opt_ref, [batch], scalers[0], dtype)
        _run(ours, opt, [batch], scalers[1], dtype)
        assert scalers[1].get_scale() == scalers[0].get_scale(), step
        for (n, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
            if a.numel():
                assert rel_err(b, a) < 1e-6, (step, n)
        # Each step is compared from the same weights.  Run on, a last-bit weight
        # difference (the kernels' IEEE sqrt vs torch's CPU sqrt, <= 1 ulp) flips fp16
        # roundings in the next autocast forward and Adam makes that a step-sized
        # difference: 2.5e-5 after 8 steps with the Triton backend on one seed in 10-20.
        with torch.no_grad():
            for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
                b.copy_(a)


def test_grad_scaler_skips_the_step_on_inf(seed):
    """A non-finite gradient: GradScaler skips step(), so weights and state stay as they were."""
    torch.manual_seed(seed)
    model = TinyNet()
    mask = {"fc1.weight": torch.arange(0, model.fc1.weight.numel(), 5)}
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    data = batches(2, seed + 1)
    _run(model, opt, data[:1], scaler)  # one good step: state exists
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[model.fc1.weight].items()}
    scale = scaler.get_scale()
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = model.loss(*data[1])
    scaler.scale(loss).backward()
    model.fc1.weight.grad.view(-1)[7] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    for k, v in opt.state[model.fc1.weight].items():
        assert torch.equal(v, state[k]), k
    assert scaler.get_scale() == scale / 2


def test_masked_fp16_autocast_trains_only_selected(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    mask = {"fc2.weight": torch.arange(3, model.fc2.weight.numel(), 11)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2)
    _run(model, opt, batches(3, seed + 1), torch.amp.GradScaler(DEVICE.type, init_scale=2.0**6))
    changed = (model.fc2.weight.detach() != before["fc2.weight"]).view(-1)
    selected = torch.zeros_like(changed)
    selected[mask["fc2.weight"]] = True
    assert changed[selected].any() and not changed[~selected].any()
    for n, p in model.named_parameters():
        if n != "fc2.weight":
            assert torch.equal(p.detach(), before[n]), n
