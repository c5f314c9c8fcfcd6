"""FSDP2 masks and checkpoints across world sizes (2 processes, gloo, CPU).

"One rank" runs on rank 0 alone: a 1-rank FSDP2 model on a mesh over ``new_group([0])``
(DTensors, sharded state), and a plain model (no FSDP); rank 1 waits.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from common import (
    HP,
    SAVE_AT,
    TOL,
    check,
    full_weights,
    global_state,
    make_model,
    rel_diffs,
    same_state,
    train,
)
from torch.distributed.device_mesh import DeviceMesh

import piece_optim as po
from piece_optim import distributed as pd


def shard(model: torch.nn.Module, mesh: DeviceMesh | None = None) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def one_rank_mesh(group) -> DeviceMesh:
    return DeviceMesh.from_group(group, "cpu")


def resume(
    model: torch.nn.Module, mask: po.SparseMask, ckpt: str, group=None, *, dense: bool = False
) -> po.SparseAdamW:
    """Fresh optimizer (a wrong lr the checkpoint must overwrite) + DCP load of ``ckpt``."""
    opt = po.SparseAdamW(
        model.named_parameters(), mask=None if dense else mask, **{**HP, "lr": 0.5}
    )
    sd = {"model": model.state_dict(), "optim": pd.sharded_optimizer_state_dict(opt, model)}
    dcp.load(sd, checkpoint_id=ckpt, process_group=group)
    model.load_state_dict(sd["model"])
    pd.load_sharded_optimizer_state_dict(opt, model, sd["optim"])
    check(opt.param_groups[0]["lr"] == HP["lr"], "DCP did not restore param_groups")
    return opt


def save(model: torch.nn.Module, opt: po.SparseAdamW, ckpt: str, group=None) -> None:
    sd = {"model": model.state_dict(), "optim": pd.sharded_optimizer_state_dict(opt, model)}
    dcp.save(sd, checkpoint_id=ckpt, process_group=group)


def scenario_two_to_one(seed: int, data, ref, ckpt: str, saved_state: dict, g1) -> dict:
    """The 2-rank FSDP2 checkpoint (mask saved by rank 0) resumes on one rank, sharded or
    plain: the state loads bit for bit and steps 4-6 match the uninterrupted run."""
    _, start, _, ref_w = ref
    res = {}
    if dist.get_rank() == 0:
        mask = po.SparseMask.load(os.path.join(ckpt, "mask.safetensors"))
        for kind in ("fsdp1", "plain"):
            model = make_model(seed + 1)
            if kind == "fsdp1":
                model = shard(model, one_rank_mesh(g1))
            opt = resume(model, mask, ckpt, g1)
            same_state(global_state(opt, model), saved_state, f"2->1 {kind}: loaded state")
            train(model, opt, data[SAVE_AT:], split=False)
            w, _ = rel_diffs(full_weights(model), ref_w, start)
            check(w <= TOL, f"2->1 {kind}: differs from the uninterrupted run by {w:.3g}")
            res[f"resume_2to1_{kind}_max_rel_diff"] = w
    dist.barrier()
    return res


def one_sided(mask: po.SparseMask) -> po.SparseMask:
    """``mask`` with fc1.bias selected in rank 0's rows only and fc2.bias in rank 1's only
    (2 ranks: rows [0, 15) / [15, 29) and [0, 19) / [19, 37)), so each rank has a param
    with no selected entry in its shard: no state there, yet its step must survive."""
    idx = {n: mask[n] for n in mask.names()}
    idx["fc1.bias"] = torch.tensor([0, 3, 14], dtype=torch.int32)
    idx["fc2.bias"] = torch.tensor([19, 30, 36], dtype=torch.int32)
    order = [n for n, _ in make_model(0).named_parameters() if n in idx]
    shapes = {n: tuple(p.shape) for n, p in make_model(0).named_parameters()}
    return po.SparseMask(
        {n: idx[n] for n in order}, {n: shapes[n] for n in order}, mask.numel_total()
    )


def scenario_one_to_two(seed: int, data, ref, ckpt: str, g1) -> dict:
    """A 1-rank FSDP2 run saves at step 3; 2 ranks resume it and match the uninterrupted
    one-process run (each rank holding a param with no selected entry in its shard)."""
    _, start, _, _ = ref
    mask0 = one_sided(ref[0])
    uninterrupted = make_model(seed)
    train(
        uninterrupted,
        po.SparseAdamW(uninterrupted.named_parameters(), mask=mask0, **HP),
        data,
        split=False,
    )
    ref_w = full_weights(uninterrupted)
    saved: list = [None]
    if dist.get_rank() == 0:
        model = shard(make_model(seed), one_rank_mesh(g1))
        opt = po.SparseAdamW(model.named_parameters(), mask=mask0, **HP)
        train(model, opt, data[:SAVE_AT], split=False)
        mask0.save(os.path.join(ckpt, "mask.safetensors"))
        save(model, opt, ckpt, g1)
        saved = [global_state(opt, model)]
    dist.broadcast_object_list(saved, src=0)
    mask = po.SparseMask.load(os.path.join(ckpt, "mask.safetensors"))
    model = shard(make_model(seed + 1))
    opt = resume(model, mask, ckpt)
    same_state(global_state(opt, model, dist.group.WORLD), saved[0], "1->2: loaded state")
    mine = {id(p) for p in opt.selected_params()}
    held = {n for n, p in model.named_parameters() if id(p) in mine}
    check(("fc1.bias" in held) == (dist.get_rank() == 0), "1->2: fc1.bias on rank 0 only")
    check(("fc2.bias" in held) == (dist.get_rank() == 1), "1->2: fc2.bias on rank 1 only")
    local_k = opt.trainable_numel()
    train(model, opt, data[SAVE_AT:], split=True)
    w, _ = rel_diffs(full_weights(model), ref_w, start)
    check(w <= TOL, f"1->2: differs from the uninterrupted run by {w:.3g}")
    ks: list = [None, None]
    dist.all_gather_object(ks, local_k)
    check(sum(ks) == mask.numel_selected() and min(ks) > 0, f"1->2: local k {ks}")
    # and back to one rank: the step of a param a rank held no state for is kept
    save(model, opt, ckpt + "_back")
    final = global_state(opt, model, dist.group.WORLD)
    if dist.get_rank() == 0:
        plain = make_model(seed + 2)
        opt1 = resume(plain, mask, ckpt + "_back", g1)
        same_state(global_state(opt1, plain), final, "1->2->1: loaded state")
    dist.barrier()
    return {"resume_1to2_max_rel_diff": w, "resume_1to2_local_k": ks, "resume_1to2_k": sum(ks)}


def scenario_dense_two_to_one(seed: int, data, ckpt: str, g1) -> dict:
    """mask=None (DTensor moments) saved on 2 ranks, resumed in one plain process."""
    model = shard(make_model(seed))
    opt = po.SparseAdamW(model.parameters(), **HP)
    train(model, opt, data[:2], split=True)
    save(model, opt, ckpt)
    twin = {"w": None}
    if dist.get_rank() == 0:
        plain = make_model(seed + 1)
        opt1 = resume(plain, None, ckpt, g1, dense=True)
        train(plain, opt1, data[2:3], split=False)
        twin["w"] = full_weights(plain)
    train(model, opt, data[2:3], split=True)
    got = full_weights(model)
    res = {}
    if dist.get_rank() == 0:
        start = full_weights(make_model(seed))
        w, _ = rel_diffs(twin["w"], got, start)
        check(w <= TOL, f"dense 2->1: differs from the 2-rank run by {w:.3g}")
        res["resume_dense_2to1_max_rel_diff"] = w
    dist.barrier()
    return res


def scenario_rank_without_entries(seed: int, data, ckpt: str, g1) -> dict:
    """A mask whose entries all sit in rank 0's shard: rank 1's optimizer trains nothing
    (no error, no state), training equals one process, and the checkpoint (with rank 1
    contributing no piece) resumes in one process with the state bit for bit."""
    model0 = make_model(seed)
    shapes = {n: tuple(p.shape) for n, p in model0.named_parameters()}
    total = sum(p.numel() for p in model0.parameters() if p.requires_grad)
    mask = po.SparseMask(
        {"fc1.bias": torch.tensor([0, 3, 14], dtype=torch.int32)},
        {"fc1.bias": shapes["fc1.bias"]},
        total,
    )
    start = full_weights(model0)
    train(model0, po.SparseAdamW(model0.named_parameters(), mask=mask, **HP), data[:3], False)
    model = shard(make_model(seed))
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    check((opt.trainable_numel() == 0) == (dist.get_rank() == 1), "rank 1 should train nothing")
    train(model, opt, data[:3], split=True)
    w, _ = rel_diffs(full_weights(model), full_weights(model0), start)
    check(w <= TOL, f"rank without entries: differs from one process by {w:.3g}")
    save(model, opt, ckpt)
    saved = global_state(opt, model, dist.group.WORLD)
    if dist.get_rank() == 0:
        plain = make_model(seed + 1)
        same_state(global_state(resume(plain, mask, ckpt, g1), plain), saved, "no entries: load")
    dist.barrier()
    return {"rank_without_entries_max_rel_diff": w}
