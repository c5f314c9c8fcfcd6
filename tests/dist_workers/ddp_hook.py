"""DDP with piece_optim.distributed.sparse_allreduce_hook (2 processes, gloo, CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import (
    HP,
    N_STEPS,
    RATIO,
    TOL,
    check,
    local_rows,
    loss_fn,
    make_model,
    prefixed,
    rel_diffs,
    train,
)
from torch.nn.parallel import DistributedDataParallel as DDP

import piece_optim as po
from piece_optim import distributed as pd


def _hooked(model: torch.nn.Module, opt_mask, **ddp_kw) -> tuple[DDP, po.SparseAdamW]:
    ddp = DDP(model, **ddp_kw)
    opt = po.SparseAdamW(ddp.named_parameters(), mask=opt_mask, **HP)
    ddp.register_comm_hook(opt, pd.sparse_allreduce_hook)
    return ddp, opt


def _trainable_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def scenario_hook_matches_one_process(seed: int, data, ref) -> dict:
    """The issue's check: the hook == one process on the same global batches, and bytes."""
    ref_mask, start, _, ref_w = ref
    model, opt = _hooked(make_model(seed), prefixed(ref_mask, "module."))
    train(model, opt, data, split=True)
    w, u = rel_diffs(
        {n.removeprefix("module."): p.detach() for n, p in model.named_parameters()}, ref_w, start
    )
    check(w <= TOL, f"ddp hook: weights differ from one process by {w:.3g} (relative)")
    st = pd.comm_stats(opt)
    k = ref_mask.numel_selected()
    dense = _trainable_bytes(model)
    check(st.bytes_dense == N_STEPS * dense, f"ddp hook: dense bytes {st.bytes_dense}")
    check(st.bytes_sent == N_STEPS * k * 4, f"ddp hook: sent {st.bytes_sent} != k*4 per step")
    sent_ratio = st.bytes_sent / st.bytes_dense
    check(sent_ratio <= 2 * RATIO, f"ddp hook: sent {sent_ratio:.4f} of DDP's bytes")
    return {
        "hook_max_rel_diff": w,
        "hook_max_update_rel_diff": u,
        "hook_sent_ratio": sent_ratio,
        "hook_bytes_sent_per_step": st.bytes_sent // N_STEPS,
        "hook_bytes_dense_per_step": st.bytes_dense // N_STEPS,
    }


def _grads_after(model: DDP, micro) -> dict[str, torch.Tensor]:
    """One step's gradients: all micro-batches but the last under no_sync (accumulation)."""
    for i, (x, y) in enumerate(micro):
        x, y = local_rows(x), local_rows(y)
        if i < len(micro) - 1:
            with model.no_sync():
                loss_fn(model, x, y).backward()
        else:
            loss_fn(model, x, y).backward()
    out = {
        n.removeprefix("module."): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return out


def scenario_hook_grads(seed: int, data, ref_mask: po.SparseMask) -> dict:
    """Gradients after backward, hook vs plain DDP, fp32 and bf16, with no_sync accumulation:
    equal bit for bit at the selected entries, zero elsewhere; mask=None is plain DDP.
    The bf16 run uses ``gradient_as_bucket_view=True`` (``p.grad`` is the bucket)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        plain = DDP(make_model(seed).to(dtype))
        # small buckets, each mixing selected and frozen params (DDP puts everything in one
        # bucket for the first backward and rebuilds the buckets for the second)
        hooked, opt = _hooked(
            make_model(seed).to(dtype),
            prefixed(ref_mask, "module."),
            bucket_cap_mb=0.002,
            gradient_as_bucket_view=dtype == torch.bfloat16,
        )
        dense, _ = _hooked(make_model(seed).to(dtype), None)
        for micro in (data[:3], data[3:5]):
            want = _grads_after(plain, micro)
            got = _grads_after(hooked, micro)
            for n, g in want.items():
                sel = ref_mask[n].long() if n in ref_mask else torch.empty(0, dtype=torch.long)
                gf, wf = got[n].reshape(-1), g.reshape(-1)
                check(torch.equal(gf[sel], wf[sel]), f"hook {dtype}: {n} selected grads differ")
                rest = torch.ones(gf.numel(), dtype=torch.bool)
                rest[sel] = False
                check(bool((gf[rest] == 0).all()), f"hook {dtype}: {n} unselected grads not 0")
            got = _grads_after(dense, micro)
            check(all(torch.equal(got[n], want[n]) for n in want), f"hook {dtype}: mask=None")
        n_buckets = pd.comm_stats(opt).buckets
        check(n_buckets >= 3, f"hook: expected several buckets, got {n_buckets} calls")
        out[f"hook_grads_exact_{str(dtype).removeprefix('torch.')}"] = True
    return out


def scenario_hook_other_optimizer(seed: int, data, ref_mask: po.SparseMask) -> dict:
    """A param the SparseAdamW does not hold (trained by torch's AdamW) is all-reduced in
    full: the pair of optimizers under DDP + hook equals the same pair in one process."""
    other = "fc2.bias"
    mask = po.SparseMask(
        {n: ref_mask[n] for n in ref_mask.names() if n != other},
        {n: ref_mask.shape(n) for n in ref_mask.names() if n != other},
        ref_mask.numel_total(),
    )

    def run(model: torch.nn.Module, wrap: bool, split: bool) -> dict[str, torch.Tensor]:
        prefix = "module." if wrap else ""
        if wrap:
            model = DDP(model, bucket_cap_mb=0.002)
        named = [(n, p) for n, p in model.named_parameters() if n != prefix + other]
        sparse = po.SparseAdamW(named, mask=prefixed(mask, prefix), **HP)
        dense = torch.optim.AdamW(
            [dict(model.named_parameters())[prefix + other]], foreach=False, **HP
        )
        if wrap:
            model.register_comm_hook(sparse, pd.sparse_allreduce_hook)
        for x, y in data:
            if split:
                x, y = local_rows(x), local_rows(y)
            loss_fn(model, x, y).backward()
            sparse.step()
            dense.step()
            model.zero_grad(set_to_none=True)
        return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}

    start = {n: p.detach().clone() for n, p in make_model(seed).named_parameters()}
    ref = run(make_model(seed), wrap=False, split=False)
    got = run(make_model(seed), wrap=True, split=True)
    w, _ = rel_diffs(got, ref, start)
    check(w <= TOL, f"hook + a second optimizer: differs from one process by {w:.3g}")
    check(not torch.equal(got[other], start[other]), "the other optimizer's param did not train")
    return {"hook_two_optimizers_max_rel_diff": w}


def scenario_hook_refuses_different_masks(seed: int, ref_mask: po.SparseMask) -> dict:
    """Ranks with different masks: every rank raises (no hang, no silent mix-up)."""
    name = ref_mask.names()[0]
    idx = ref_mask[name][:-1] if dist.get_rank() == 1 else ref_mask[name]
    mask = po.SparseMask(
        {**dict(ref_mask.items()), name: idx},
        {n: ref_mask.shape(n) for n in ref_mask.names()},
        ref_mask.numel_total(),
    )
    model, _ = _hooked(make_model(seed), prefixed(mask, "module."))
    x = torch.randint(0, 37, (2, 7))
    try:
        loss_fn(model, x, x).backward()
    except RuntimeError as e:
        check("same mask" in str(e), f"unclear error for different masks: {e}")
    else:
        check(False, "different masks on the ranks were not detected")
    return {"hook_refuses_different_masks": True}
