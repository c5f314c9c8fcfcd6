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
* ``fsdp``: fully_shard model: estimate (local grad shards), select (all-reduced
  histograms), 6 steps == one process; the union of local masks is the single-process
  mask (exactly k).  After step 3 a DCP checkpoint is saved; a fresh model + optimizer
  loaded from it (unnamed params, ``mask.bind``) continue steps 4-6 bit for bit.
* ``fsdp_dense``: ``mask=None`` under FSDP2 equals ``torch.optim.AdamW`` on FSDP2.
* ``fsdp_llama`` (when transformers is installed): a tiny LlamaForCausalLM with one
  fully_shard per decoder layer: estimate, select, 6 steps == one process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import TinyNet, batches  # noqa: E402

import piece_optim as po  # noqa: E402
from piece_optim import distributed as pd  # noqa: E402
from piece_optim._backends import get_backend  # noqa: E402
from piece_optim._select import ScoreSource, global_topk  # noqa: E402

RATIO = 0.05
N_CALIB, N_STEPS, SAVE_AT = 3, 6, 3
HP = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Net(TinyNet):
    """TinyNet without its zero-size param: FSDP2's reduce-scatter rejects empty grads
    (``_chunk_cat expects non-empty tensor``, torch 2.13)."""

    def __init__(self) -> None:
        super().__init__()
        del self.empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(self.embed(x))) + 0 * self.frozen.sum()
        return self.fc2(h)


class LossNet(nn.Module):
    """HF-style: ``model(**batch)`` returns a dict with the loss."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": loss_fn(self.net, x, y)}


def make_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's half of a global batch (the data-parallel split)."""
    return t.chunk(dist.get_world_size())[dist.get_rank()]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # through the wrapper's forward: DDP's reducer hooks in there
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def estimate(model: nn.Module, calib, split: bool) -> po.SparseMask:
    est = po.ImportanceEstimator(model, method="piece-s")
    for x, y in calib:
        if split:
            x, y = local_rows(x), local_rows(y)
        loss = loss_fn(model, x, y)
        loss.backward()
        est.collect()
    mask = est.select(ratio=RATIO)
    est.close()
    return mask


def train(model: nn.Module, opt: po.SparseAdamW, data, split: bool) -> None:
    for x, y in data:
        if split:
            x, y = local_rows(x), local_rows(y)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        n = n.removeprefix("module.")
        out[n] = (p.full_tensor() if pd.is_dtensor(p) else p).detach().clone()
    return out


def rel_diffs(got: dict, ref: dict, start: dict) -> tuple[float, float]:
    """(max over params of max|got-ref| / max|ref|, same for the updates got-start)."""
    w = u = 0.0
    for n in ref:
        d = (got[n].double() - ref[n].double()).abs().max().item() if ref[n].numel() else 0.0
        if ref[n].numel():
            w = max(w, d / max(ref[n].double().abs().max().item(), 1e-30))
            du = (ref[n] - start[n]).double().abs().max().item()
            if du > 0:
                u = max(u, d / du)
    return w, u


def global_mask_of(local: po.SparseMask, model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather FSDP2 local-shard masks into global flat indices, per parameter name."""
    world = dist.get_world_size()
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad or p.numel() == 0:
            continue
        lp = p.to_local()
        row = p[0].numel() if p.dim() else 1
        # rank r's shard starts at row sum_{s<r} rows_s (Shard(0) = torch.chunk order)
        rows = torch.tensor([lp.shape[0] if lp.dim() else lp.numel()], dtype=torch.int64)
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        offset = int(sum(int(r) for r in all_rows[: dist.get_rank()])) * row
        idx = local[n].long() + offset if n in local else torch.empty(0, dtype=torch.int64)
        parts = [None] * world
        dist.all_gather_object(parts, idx)
        cat = torch.cat(parts)
        if cat.numel():
            out[n] = cat
    return out


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


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
        shards = [t.chunk(2)[dist.get_rank()] if t.numel() > 1 else
                  (t if dist.get_rank() == 0 else t[:0]) for t in full]  # fmt: skip
        offs = [0 if dist.get_rank() == 0 else (t.numel() - s.numel()) for t, s in
                zip(full, shards, strict=True)]  # fmt: skip
        hooks = pd.topk_hooks(dist.group.WORLD)
        got = global_topk(
            [ScoreSource(None, s.contiguous(), s.numel(), torch.int32, be) for s in shards],
            k, "piece-f", 1.0, **hooks,
        )  # fmt: skip
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
    hf = estimate_mask(plain, ({"x": local_rows(x), "y": local_rows(y)} for x, y in calib),
                       n_batches=N_CALIB, ratio=RATIO, progress=False)  # fmt: skip
    got = {n.removeprefix("net."): hf[n] for n in hf.names()}
    check(list(got) == ref_mask.names(), "estimate_mask (data parallel): names differ")
    check(all(torch.equal(got[n], ref_mask[n]) for n in got), "estimate_mask: mask differs")
    sent = pd.broadcast_mask(mask if dist.get_rank() == 0 else None)
    check(sent == mask and pd.mask_checksum(sent) == pd.mask_checksum(mask), "broadcast_mask")
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    check(set(opt.mask_indices()) == set(mask.names()), "ddp: optimizer mask names")
    train(model, opt, data, split=True)
    w, u = rel_diffs(full_weights(model), ref_w, start)
    check(w < 1e-4, f"ddp: weights differ from one process by {w:.3g} (relative)")
    return {"ddp_max_rel_diff": w, "ddp_max_update_rel_diff": u,
            "k": ref_mask.numel_selected()}  # fmt: skip


def shard(model: Net) -> Net:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    return model


def scenario_fsdp(seed: int, calib, data, ref, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp

    ref_mask, start, ref_mid, ref_w = ref
    model = shard(make_model(seed))
    check_in_backward_refused(model, "fsdp")
    mask = estimate(model, calib, split=True)
    k = ref_mask.numel_selected()
    n_glob = pd.numel_selected_global(mask)
    check(n_glob == k, f"fsdp: {n_glob} selected over all ranks, one process selects k={k}")
    gm = global_mask_of(mask, model)
    check(list(gm) == ref_mask.names(), f"fsdp: mask names {list(gm)} != {ref_mask.names()}")
    check(all(torch.equal(gm[n], ref_mask[n].long()) for n in gm), "fsdp: mask differs")
    for n in mask.names():  # local-shard coordinates
        check(mask.shape(n) == tuple(dict(model.named_parameters())[n].to_local().shape),
              f"fsdp: mask shape of {n} is not the local shard's")  # fmt: skip
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
    train(model, opt, data[:SAVE_AT], split=True)
    w_mid, _ = rel_diffs(full_weights(model), ref_mid, start)
    check(w_mid < 1e-4, f"fsdp: after {SAVE_AT} steps weights differ by {w_mid:.3g}")

    mask.save(os.path.join(ckpt, f"mask_rank{dist.get_rank()}.safetensors"))
    dcp.save({"model": model.state_dict(), "optim": pd.sharded_optimizer_state_dict(opt, model)},
             checkpoint_id=ckpt)  # fmt: skip
    train(model, opt, data[SAVE_AT:], split=True)
    final = full_weights(model)
    w, u = rel_diffs(final, ref_w, start)
    check(w < 1e-4, f"fsdp: weights differ from one process by {w:.3g} (relative)")

    # resume: a fresh, differently initialised model + optimizer from the checkpoint
    model2 = shard(make_model(seed + 1))
    mask2 = po.SparseMask.load(os.path.join(ckpt, f"mask_rank{dist.get_rank()}.safetensors"))
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
    check(all(torch.equal(resumed[n], final[n]) for n in final),
          "fsdp: DCP resume does not continue exactly")  # fmt: skip
    for p1, p2 in zip(opt.selected_params(), opt2.selected_params(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            check(torch.equal(opt.state[p1][key], opt2.state[p2][key]), f"resumed state {key}")
    return {
        "fsdp_max_rel_diff": w,
        "fsdp_max_update_rel_diff": u,
        "fsdp_mid_rel_diff": w_mid,
        "fsdp_local_k": mask.numel_selected(),
        "dcp_resume_exact": True,
    }


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
        vocab_size=67, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
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
    check(pd.numel_selected_global(mask) == ref_mask.numel_selected(), "llama: k differs")
    gm = global_mask_of(mask, model)
    check(list(gm) == ref_mask.names(), "llama: FSDP2 mask names differ from one process")
    check(all(torch.equal(gm[n], ref_mask[n].long()) for n in gm), "llama: FSDP2 mask differs")
    w, u = rel_diffs(full_weights(model), full_weights(ref_model), start)
    check(w < 1e-4, f"llama: FSDP2 weights differ from one process by {w:.3g}")
    return {"llama_fsdp_max_rel_diff": w, "llama_fsdp_max_update_rel_diff": u,
            "llama_k": ref_mask.numel_selected()}  # fmt: skip


def main() -> None:
    out, seed = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    t0 = time.perf_counter()
    calib = batches(N_CALIB, seed + 11)
    data = batches(N_STEPS, seed + 12)
    res: dict = {"seed": seed, "world": dist.get_world_size(),
                 "backend_env": os.environ.get("PIECE_OPTIM_BACKEND", "")}  # fmt: skip
    res.update(scenario_ties(seed))
    log("ties ok")
    ref = reference(seed, calib, data)
    res.update(scenario_ddp(seed, calib, data, ref))
    log("ddp ok")
    ckpt = os.path.join(out, "ckpt")
    res.update(scenario_fsdp(seed, calib, data, ref, ckpt))
    log("fsdp ok")
    res.update(scenario_fsdp_dense(seed, data))
    if importlib.util.find_spec("transformers") is not None:
        res.update(scenario_fsdp_llama(seed))
        log("llama ok")
    local_k = [None, None]
    dist.all_gather_object(local_k, res["fsdp_local_k"])
    res["fsdp_local_k"] = local_k
    res["seconds"] = time.perf_counter() - t0
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
