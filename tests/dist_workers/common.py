"""Shared pieces of the distributed worker scenarios (2 processes, gloo, CPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import TinyNet  # noqa: E402

import piece_optim as po  # noqa: E402
from piece_optim import distributed as pd  # noqa: E402

RATIO = 0.05
N_CALIB, N_STEPS, SAVE_AT = 3, 6, 3
HP = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
# Max relative weight difference against one process (the bound); measured
# 7e-8 to 4e-7 (FSDP2 / DDP sum the ranks' halves in another order than one process).
TOL = 1e-5
# Tiny LlamaForCausalLM runs: typically 1e-7 too, but one seed of 9 reached 1.5e-5 over 6
# Adam steps (reduction-order differences amplified by g / sqrt(v) where v is small).
LLAMA_TOL = 1e-4


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


def train(model: nn.Module, opt: torch.optim.Optimizer, data, split: bool) -> None:
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


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def prefixed(mask: po.SparseMask, prefix: str) -> po.SparseMask:
    """The same mask under names with ``prefix`` (DDP's ``module.``)."""
    return po.SparseMask(
        {prefix + n: mask[n] for n in mask.names()},
        {prefix + n: mask.shape(n) for n in mask.names()},
        mask.numel_total(),
    )


def global_state(opt: po.SparseAdamW, model: nn.Module, group=None) -> dict[str, dict]:
    """Every param's sparse optimizer state in global coordinates, on every rank of ``group``.

    ``{name: {"idx": global positions, "exp_avg", "exp_avg_sq", "step"}}`` (idx sorted), so
    states on different world sizes compare directly.  ``group=None``: this process alone.
    """
    names = {p: n.removeprefix("module.") for n, p in model.named_parameters()}
    mine = {}
    for p in opt.selected_params():
        st = opt.state[p]
        if not st:
            continue
        mine[names[p]] = {
            "idx": pd.global_indices(p, st["idx"]).long(),
            "exp_avg": st["exp_avg"].clone(),
            "exp_avg_sq": st["exp_avg_sq"].clone(),
            "step": float(st["step"]),
        }
    if group is None:
        return mine
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    out: dict[str, dict] = {}
    for part in parts:  # rank order = global order of each param's entries
        for n, st in part.items():
            if n not in out:
                out[n] = {k: v for k, v in st.items()}
            else:
                for k in ("idx", "exp_avg", "exp_avg_sq"):
                    out[n][k] = torch.cat([out[n][k], st[k]])
                check(out[n]["step"] == st["step"], f"{n}: ranks differ in step")
    return out


def same_state(a: dict, b: dict, what: str) -> None:
    check(sorted(a) == sorted(b), f"{what}: params {sorted(a)} != {sorted(b)}")
    for n in a:
        for k in ("idx", "exp_avg", "exp_avg_sq"):
            check(torch.equal(a[n][k], b[n][k]), f"{what}: {n}.{k} differs")
        check(a[n]["step"] == b[n]["step"], f"{what}: {n}.step {a[n]['step']} != {b[n]['step']}")
