"""Distributed worker for tests/test_distributed.py (2 processes, gloo, CPU).

Launched once per test session by
``python -m torch.distributed.run --standalone --nproc_per_node=2 train.py OUT SEED``.
Every rank also runs the single-process reference itself (the model is tiny), so each
compares its own shard against it.  Rank 0 writes ``OUT/results.json`` with the measured
figures; every check that fails raises, so a non-zero exit fails the tests.

Scenarios
---------
* ``ties``: the sharded global top-k on heavily tied scores equals one process's.
* ``ddp``: DDP-wrapped model: estimate, select, 6 steps == one process on the same
  global batches; masks identical on every rank; broadcast_mask round-trips.
* ``ddp_hook`` (ddp_hook.py): with ``sparse_allreduce_hook``, 6 steps == one process
  and the bytes sent are k x 4 per step; gradients equal plain DDP's at the selected
  entries bit for bit (fp32 and bf16, no_sync accumulation, several buckets) and are
  zero elsewhere; ``mask=None`` is plain DDP; a param of another optimizer is reduced in
  full; ranks with different masks raise.
* ``fsdp``: fully_shard model: estimate (local grad shards), select (all-reduced
  histograms) gives the single-process mask bit for bit on every rank; 6 steps == one
  process.  After step 3 rank 0 saves the mask and all save a DCP checkpoint; a fresh
  model + optimizer loaded from it (unnamed params, ``mask.bind``) continue steps 4-6 bit
  for bit; the same checkpoint resumes on one rank (1-rank FSDP2 and a plain model,
  reshard.py), and a 1-rank checkpoint resumes on two.
* ``fsdp_dense``: ``mask=None`` under FSDP2 equals ``torch.optim.AdamW`` on FSDP2, and its
  DTensor state resumes in one plain process.
* ``fsdp_llama`` (when transformers is installed): a tiny LlamaForCausalLM with one
  fully_shard per decoder layer: estimate, select, 6 steps == one process.
* ``trainer`` (hf_trainer.py, when transformers is installed): the Hugging Face Trainer
  under DDP with SparseAdamW == a one-process loop on the same global batches, plain and
  with the comm hook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import ddp_hook
import reshard
import torch
import torch.distributed as dist
from common import (
    HP,
    LLAMA_TOL,
    N_CALIB,
    N_STEPS,
    RATIO,
    SAVE_AT,
    TOL,
    LossNet,
    check,
    estimate,
    full_weights,
    global_state,
    local_rows,
    log,
    make_model,
    rel_diffs,
    train,
)
from helpers import batches
from reshard import shard
from torch import nn

import piece_optim as po
from piece_optim import distributed as pd
from piece_optim.backends import get_backend
from piece_optim.functional import ScoreSource, global_topk


def check_in_backward_refused(model: nn.Module, what: str) -> None:
    """in_backward / sparse_grads hooks would see gradients before the cross-rank reduction."""
    try:
        po.ImportanceEstimator(model, in_backward=True)
    except NotImplementedError as e:
        check("in_backward=True" in str(e), f"{what}: unclear error {e}")
    else:
        check(False, f"{what}: in_backward=True was accepted")
    try:
        po.SparseAdamW(model.parameters(), mask=None, sparse_grads=True)
    except NotImplementedError as e:
        check("sparse_grads=True" in str(e), f"{what}: unclear sparse_grads error {e}")
    else:
        check(False, f"{what}: sparse_grads=True was accepted")


# -- scenarios ---------------------------------------------------------------------------
def scenario_ties(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    be = get_backend("auto", "cpu")
    sizes = (101, 1, 57, 3)
    full = [torch.randint(0, 4, (n,), generator=g).float() for n in sizes]  # heavy ties
    res = {}
    for k in (1, 7, 40, 100, 161):
        ref = global_topk(
            [ScoreSource(None, t, t.numel(), torch.int32, be) for t in full], k, "piece-f", 1.0
        )
        shards = [
            t.chunk(2)[dist.get_rank()] if t.numel() > 1 else (t if dist.get_rank() == 0 else t[:0])
            for t in full
        ]
        offs = [
            0 if dist.get_rank() == 0 else (t.numel() - s.numel())
            for t, s in zip(full, shards, strict=True)
        ]
        hooks = pd.topk_hooks(dist.group.WORLD)
        got = global_topk(
            [ScoreSource(None, s.contiguous(), s.numel(), torch.int32, be) for s in shards],
            k,
            "piece-f",
            1.0,
            **hooks,
        )
        for r_idx, l_idx, off in zip(ref, got, offs, strict=True):
            parts = [None, None]
            dist.all_gather_object(parts, l_idx.long() + off)
            check(torch.equal(torch.cat(parts), r_idx.long()), f"ties: k={k} masks differ")
        res[k] = sum(int(i.numel()) for i in ref)
        check(res[k] == k, f"ties: selected {res[k]} != k={k}")
    return {"ties_checked_k": list(res)}


def reference(seed: int, calib, data):
    model = make_model(seed)
    start = full_weights(model)
    mask = estimate(model, calib, split=False)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    train(model, opt, data[:SAVE_AT], split=False)
    mid = full_weights(model)
    train(model, opt, data[SAVE_AT:], split=False)
    return mask, start, mid, full_weights(model)


def scenario_ddp(seed: int, calib, data, ref) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref_mask, start, _, ref_w = ref
    model = DDP(make_model(seed))
    check_in_backward_refused(model, "ddp")
    mask = estimate(model, calib, split=True)
    pd.assert_same_mask(mask)
    got = {n.removeprefix("module."): mask[n] for n in mask.names()}
    check(list(got) == ref_mask.names(), "ddp: mask names differ from one process")
    check(all(torch.equal(got[n], ref_mask[n]) for n in got), "ddp: mask differs")
    # integrations.estimate_mask on the plain (unwrapped) model, as inside
    # Trainer.create_optimizer: it averages the grads across ranks itself
    from piece_optim.integrations import estimate_mask

    plain = LossNet(make_model(seed))
    hf = estimate_mask(
        plain,
        ({"x": local_rows(x), "y": local_rows(y)} for x, y in calib),
        n_batches=N_CALIB,
        ratio=RATIO,
        progress=False,
    )
    got = {n.removeprefix("net."): hf[n] for n in hf.names()}
    check(list(got) == ref_mask.names(), "estimate_mask (data parallel): names differ")
    check(all(torch.equal(got[n], ref_mask[n]) for n in got), "estimate_mask: mask differs")
    sent = pd.broadcast_mask(mask if dist.get_rank() == 0 else None)
    check(sent == mask and pd.mask_checksum(sent) == pd.mask_checksum(mask), "broadcast_mask")
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    check(set(opt.mask_indices()) == set(mask.names()), "ddp: optimizer mask names")
    train(model, opt, data, split=True)
    w, u = rel_diffs(full_weights(model), ref_w, start)
    check(w <= TOL, f"ddp: weights differ from one process by {w:.3g} (relative)")
    return {"ddp_max_rel_diff": w, "ddp_max_update_rel_diff": u, "k": ref_mask.numel_selected()}


def scenario_fsdp(seed: int, calib, data, ref, ckpt: str) -> tuple[dict, dict]:
    import torch.distributed.checkpoint as dcp

    ref_mask, start, ref_mid, ref_w = ref
    model = shard(make_model(seed))
    check_in_backward_refused(model, "fsdp")
    mask = estimate(model, calib, split=True)
    # global coordinates: the very mask one process selects, on every rank
    check(mask == ref_mask, "fsdp: the mask differs from one process's")
    check(pd.mask_checksum(mask) == pd.mask_checksum(ref_mask), "fsdp: mask checksum")
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    local_k = opt.trainable_numel()
    train(model, opt, data[:SAVE_AT], split=True)
    w_mid, _ = rel_diffs(full_weights(model), ref_mid, start)
    check(w_mid <= TOL, f"fsdp: after {SAVE_AT} steps weights differ by {w_mid:.3g}")

    if dist.get_rank() == 0:  # the global mask: one file, written once
        mask.save(os.path.join(ckpt, "mask.safetensors"))
    dcp.save(
        {"model": model.state_dict(), "optim": pd.sharded_optimizer_state_dict(opt, model)},
        checkpoint_id=ckpt,
    )
    saved_state = global_state(opt, model, dist.group.WORLD)
    train(model, opt, data[SAVE_AT:], split=True)
    final = full_weights(model)
    w, u = rel_diffs(final, ref_w, start)
    check(w <= TOL, f"fsdp: weights differ from one process by {w:.3g} (relative)")

    # resume: a fresh, differently initialised model + optimizer from the checkpoint
    model2 = shard(make_model(seed + 1))
    mask2 = po.SparseMask.load(os.path.join(ckpt, "mask.safetensors"))
    check(mask2 == mask, "fsdp: mask file round trip")
    # unnamed params (mask.bind), and a wrong lr that the checkpoint must overwrite
    opt2 = po.SparseAdamW(model2.parameters(), mask=mask2.bind(model2), **{**HP, "lr": 0.5})
    sd = {"model": model2.state_dict(), "optim": pd.sharded_optimizer_state_dict(opt2, model2)}
    dcp.load(sd, checkpoint_id=ckpt)
    model2.load_state_dict(sd["model"])
    pd.load_sharded_optimizer_state_dict(opt2, model2, sd["optim"])
    check(opt2.param_groups[0]["lr"] == HP["lr"], "fsdp: DCP did not restore param_groups")
    train(model2, opt2, data[SAVE_AT:], split=True)
    resumed = full_weights(model2)
    check(
        all(torch.equal(resumed[n], final[n]) for n in final),
        "fsdp: DCP resume does not continue exactly",
    )
    for p1, p2 in zip(opt.selected_params(), opt2.selected_params(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            check(torch.equal(opt.state[p1][key], opt2.state[p2][key]), f"resumed state {key}")
    local_ks: list = [None, None]
    dist.all_gather_object(local_ks, local_k)
    res = {
        "fsdp_max_rel_diff": w,
        "fsdp_max_update_rel_diff": u,
        "fsdp_mid_rel_diff": w_mid,
        "fsdp_local_k": local_ks,
        "fsdp_mask_equals_one_process": True,
        "dcp_resume_exact": True,
    }
    return res, saved_state


def scenario_fsdp_dense(seed: int, data) -> dict:
    """mask=None under FSDP2: SparseAdamW is torch's AdamW, on local shards."""
    ours, theirs = shard(make_model(seed)), shard(make_model(seed))
    opt_a = po.SparseAdamW(ours.parameters(), **HP)
    opt_b = torch.optim.AdamW(theirs.parameters(), foreach=False, **HP)
    train(ours, opt_a, data[:2], split=True)
    train(theirs, opt_b, data[:2], split=True)
    a, b = full_weights(ours), full_weights(theirs)
    d = max((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].numel())
    check(d <= 1e-6, f"fsdp dense: SparseAdamW(mask=None) differs from AdamW by {d:.3g}")
    return {"fsdp_dense_max_abs_diff": d}


def scenario_fsdp_llama(seed: int) -> dict:
    """A tiny LlamaForCausalLM, one fully_shard per decoder layer: FSDP2 == one process."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=67,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    g = torch.Generator().manual_seed(seed + 21)
    ids = [torch.randint(0, 67, (4, 9), generator=g) for _ in range(N_CALIB + N_STEPS)]

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).float()

    def run(model: nn.Module, split: bool) -> po.SparseMask:
        est = po.ImportanceEstimator(model)
        for x in ids[:N_CALIB]:
            x = local_rows(x) if split else x
            model(input_ids=x, labels=x).loss.backward()
            est.collect()
        mask = est.select(ratio=RATIO)
        est.close()
        opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
        for x in ids[N_CALIB:]:
            x = local_rows(x) if split else x
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return mask

    ref_model = make()
    start = full_weights(ref_model)
    ref_mask = run(ref_model, split=False)
    from torch.distributed.fsdp import fully_shard

    model = make()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    mask = run(model, split=True)
    check(mask == ref_mask, "llama: the FSDP2 mask differs from one process's")
    w, u = rel_diffs(full_weights(model), full_weights(ref_model), start)
    check(w < LLAMA_TOL, f"llama: FSDP2 weights differ from one process by {w:.3g}")
    return {
        "llama_fsdp_max_rel_diff": w,
        "llama_fsdp_max_update_rel_diff": u,
        "llama_k": ref_mask.numel_selected(),
    }


def main() -> None:
    out, seed = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    g1 = dist.new_group([0])  # "one process": rank 0 alone
    t0 = time.perf_counter()
    secs = {}

    def timed(name: str, fn, *args) -> dict:
        t = time.perf_counter()
        r = fn(*args)
        secs[name] = round(time.perf_counter() - t, 2)
        log(f"{name} ok")
        return r

    calib = batches(N_CALIB, seed + 11)
    data = batches(N_STEPS, seed + 12)
    res: dict = {
        "seed": seed,
        "world": dist.get_world_size(),
        "ratio": RATIO,
        "backend_env": os.environ.get("PIECE_OPTIM_BACKEND", ""),
    }
    res.update(timed("ties", scenario_ties, seed))
    ref = reference(seed, calib, data)
    res.update(timed("ddp", scenario_ddp, seed, calib, data, ref))
    res.update(timed("ddp_hook", ddp_hook.scenario_hook_matches_one_process, seed, data, ref))
    res.update(timed("ddp_hook_grads", ddp_hook.scenario_hook_grads, seed, data, ref[0]))
    res.update(
        timed("ddp_hook_two_optimizers", ddp_hook.scenario_hook_other_optimizer, seed, data, ref[0])
    )
    res.update(
        timed("ddp_hook_masks_differ", ddp_hook.scenario_hook_refuses_different_masks, seed, ref[0])
    )
    ckpt = os.path.join(out, "ckpt")
    fsdp_res, saved_state = timed("fsdp", scenario_fsdp, seed, calib, data, ref, ckpt)
    res.update(fsdp_res)
    res.update(
        timed("resume_2to1", reshard.scenario_two_to_one, seed, data, ref, ckpt, saved_state, g1)
    )
    res.update(
        timed(
            "resume_1to2",
            reshard.scenario_one_to_two,
            seed,
            data,
            ref,
            os.path.join(out, "ckpt_1rank"),
            g1,
        )
    )
    res.update(
        timed(
            "rank_without_entries",
            reshard.scenario_rank_without_entries,
            seed,
            data,
            os.path.join(out, "ckpt_one_rank_entries"),
            g1,
        )
    )
    res.update(timed("fsdp_dense", scenario_fsdp_dense, seed, data))
    res.update(
        timed(
            "resume_dense_2to1",
            reshard.scenario_dense_two_to_one,
            seed,
            data,
            os.path.join(out, "ckpt_dense"),
            g1,
        )
    )
    if importlib.util.find_spec("transformers") is not None:
        res.update(timed("fsdp_llama", scenario_fsdp_llama, seed))
        import hf_trainer

        res.update(
            timed("trainer", hf_trainer.scenario_trainer, seed, os.path.join(out, "trainer"))
        )
    res["seconds"] = time.perf_counter() - t0
    res["scenario_seconds"] = secs
    if dist.get_rank() == 0:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter finalization: gloo's C++ worker threads can still hold objects with
    # Python references then, and tearing those down aborts the process now and again
    # ("terminate called without an active exception", SIGABRT; seen once in ~30 CI runs,
    # cf. pytorch/pytorch#65231 and #179291).  Everything is written and the group is
    # destroyed by now, so a hard exit loses nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
