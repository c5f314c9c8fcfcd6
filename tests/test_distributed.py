"""DDP and FSDP2 with 2 processes (gloo, CPU), plus the distributed helpers in one process.

One ``torch.distributed.run --standalone --nproc_per_node=2`` launch (a free port is
picked by the c10d rendezvous) runs every multi-process scenario of
``tests/dist_workers/train.py``; each rank checks itself against the single-process run
and raises on any mismatch, rank 0 writes the measured figures, and the tests below
assert on them.  Workers inherit the environment, so ``PIECE_OPTIM_BACKEND`` /
``TRITON_INTERPRET`` select their backend as they do this process's.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, fresh_seed

import piece_optim as po
from piece_optim import distributed as pd
from piece_optim.backends import get_backend
from piece_optim.functional import ScoreSource, global_topk

pytestmark = pytest.mark.cpu_only("2 processes with the gloo backend on CPU")

WORKER = Path(__file__).parent / "dist_workers" / "train.py"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    seed = fresh_seed()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(out),
        str(seed),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    log = (proc.stdout + proc.stderr)[-6000:]
    print(f"seed={seed}\n{log}")
    assert proc.returncode == 0, f"distributed worker failed (seed={seed}):\n{log}"
    return json.loads((out / "results.json").read_text())


def test_fsdp2_matches_one_process(dist_run: dict) -> None:
    assert dist_run["world"] == 2
    # the mask selected on 2 FSDP2 ranks is the single-process mask bit for bit (checked
    # on each rank in the worker); each rank trains its shard's part of it
    assert dist_run["fsdp_mask_equals_one_process"] is True
    assert sum(dist_run["fsdp_local_k"]) == dist_run["k"]
    assert min(dist_run["fsdp_local_k"]) > 0
    assert dist_run["fsdp_max_rel_diff"] <= 1e-5
    assert dist_run["fsdp_mid_rel_diff"] <= 1e-5


def test_fsdp2_llama_matches_one_process(dist_run: dict) -> None:
    pytest.importorskip("transformers")
    assert dist_run["llama_k"] > 0
    assert dist_run["llama_fsdp_max_rel_diff"] < 1e-4


def test_ddp_matches_one_process(dist_run: dict) -> None:
    assert dist_run["ddp_max_rel_diff"] <= 1e-5


def test_ddp_sparse_allreduce_hook(dist_run: dict) -> None:
    """The hook: one process's weights, k x 4 bytes per step (<= 2 x ratio of DDP's)."""
    assert dist_run["hook_max_rel_diff"] <= 1e-5
    assert dist_run["hook_bytes_sent_per_step"] == dist_run["k"] * 4
    assert dist_run["hook_sent_ratio"] <= 2 * dist_run["ratio"]
    assert dist_run["hook_grads_exact_float32"] is True
    assert dist_run["hook_grads_exact_bfloat16"] is True
    assert dist_run["hook_two_optimizers_max_rel_diff"] <= 1e-5
    assert dist_run["hook_refuses_different_masks"] is True


def test_dcp_resume_continues_exactly(dist_run: dict) -> None:
    assert dist_run["dcp_resume_exact"] is True


def test_dcp_resume_across_world_sizes(dist_run: dict) -> None:
    """2 -> 1 (1-rank FSDP2 and a plain model) and 1 -> 2: the state loads bit for bit
    (checked in the worker) and the run continues as the uninterrupted one."""
    for key in (
        "resume_2to1_fsdp1",
        "resume_2to1_plain",
        "resume_1to2",
        "resume_dense_2to1",
        "rank_without_entries",
    ):
        assert dist_run[f"{key}_max_rel_diff"] <= 1e-5, key
    assert min(dist_run["resume_1to2_local_k"]) > 0


def test_fsdp2_dense_is_adamw(dist_run: dict) -> None:
    assert dist_run["fsdp_dense_max_abs_diff"] <= 1e-6


def test_sharded_topk_with_ties(dist_run: dict) -> None:
    assert dist_run["ties_checked_k"] == [1, 7, 40, 100, 161]


def test_trainer_under_ddp_matches_one_process(dist_run: dict) -> None:
    pytest.importorskip("transformers")
    assert dist_run["trainer_max_rel_diff"] < 1e-4  # LLAMA_TOL of the worker
    assert dist_run["trainer_hook_max_rel_diff"] < 1e-4


# -- one process --------------------------------------------------------------------------
def _mask(seed: int) -> po.SparseMask:
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model)
    x = torch.randint(0, 37, (3, 5))
    model.loss(x, x).backward()
    est.collect()
    return est.select(ratio=0.05)


def test_mask_checksum(seed: int) -> None:
    m = _mask(seed)
    assert pd.mask_checksum(m) == pd.mask_checksum(_mask(seed))
    name = m.names()[0]
    idx = m[name].clone()
    idx[-1] = idx[-1] + 1 if int(idx[-1]) + 1 < torch.Size(m.shape(name)).numel() else idx[-1] - 1
    idx = torch.unique(idx)
    other = po.SparseMask(
        {**dict(m.items()), name: idx}, {n: m.shape(n) for n in m.names()}, m.numel_total()
    )
    assert pd.mask_checksum(other) != pd.mask_checksum(m)


def test_helpers_need_a_process_group(seed: int) -> None:
    m = _mask(seed)
    for fn in (pd.assert_same_mask, pd.broadcast_mask):
        with pytest.raises(RuntimeError, match="init_process_group"):
            fn(m)
    with pytest.warns(DeprecationWarning, match="numel_selected"):
        assert pd.numel_selected_global(m) == m.numel_selected()


def test_sparse_allreduce_hook_needs_the_optimizer() -> None:
    with pytest.raises(TypeError, match="SparseAdamW as state"):
        pd.sparse_allreduce_hook(None, object())


def test_comm_stats_do_not_keep_the_optimizer_alive() -> None:
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(4))
    opt = po.SparseAdamW([p])
    assert pd.comm_stats(opt).bytes_sent == 0
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None


def test_plain_tensors_pass_through() -> None:
    p = torch.nn.Parameter(torch.randn(3, 4))
    assert pd.local_tensor(p) is p
    assert not pd.is_dtensor(p)
    assert pd.sharded_group([p]) is None
    assert pd.topk_hooks(None) == {}
    idx = torch.tensor([1, 5, 11], dtype=torch.int32)
    assert pd.shard_range(p) == (0, 12)
    assert pd.shard_indices(p, idx) is idx
    assert torch.equal(pd.global_indices(p, idx), idx)


@pytest.mark.parametrize("k", [1, 5, 33, 80])
def test_share_ties_hook_keeps_one_process_order(seed: int, k: int) -> None:
    """A one-rank share_ties (keep the first take_eq in order) equals no hook at all."""
    g = torch.Generator().manual_seed(seed)
    be = get_backend("auto", "cpu")
    ts = [torch.randint(0, 3, (n,), generator=g).float() for n in (41, 1, 39)]
    src = [ScoreSource(None, t, t.numel(), torch.int32, be) for t in ts]
    calls = []

    def share_ties(local_eq: list[int], take_eq: int) -> list[int]:
        calls.append((list(local_eq), take_eq))
        out = []
        for n in local_eq:
            out.append(min(n, take_eq))
            take_eq -= out[-1]
        return out

    want = global_topk(src, k, "piece-f", 1.0)
    got = global_topk(src, k, "piece-f", 1.0, share_ties=share_ties)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert sum(int(i.numel()) for i in got) == k
    allv = torch.cat(ts)
    thr = allv.sort(descending=True).values[k - 1]
    if int((allv >= thr).sum()) > k:  # the tie at the threshold is cut: the hook decides
        assert calls == [([int((t == thr).sum()) for t in ts], k - int((allv > thr).sum()))]
    else:
        assert calls == []


def _train(model: TinyNet, opt: po.SparseAdamW, xs: list[torch.Tensor]) -> None:
    for x in xs:
        model.loss(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_sharded_optimizer_state_dict_round_trip(seed: int) -> None:
    """One process (key "rank0"): the DCP-shaped state_dict restores a run exactly."""
    mask = _mask(seed)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(0, 37, (3, 5), generator=g) for _ in range(4)]
    torch.manual_seed(seed)
    model = TinyNet()
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2)
    _train(model, opt, xs[:2])
    sd = pd.sharded_optimizer_state_dict(opt, model)
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == set(mask.names())
    for n in mask.names():  # one process: the global indices are the mask's
        assert torch.equal(sd["state"][n]["idx"], mask[n])
    saved = copy.deepcopy(sd)
    twin = copy.deepcopy(model)
    opt2 = po.SparseAdamW(twin.named_parameters(), mask=mask, lr=0.5)
    pd.load_sharded_optimizer_state_dict(opt2, twin, saved)
    assert opt2.param_groups[0]["lr"] == 1e-2
    _train(model, opt, xs[2:])
    _train(twin, opt2, xs[2:])
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True)
    )

    other = po.SparseMask(
        {n: mask[n][:-1] for n in mask.names()},
        {n: mask.shape(n) for n in mask.names()},
        mask.numel_total(),
    )
    m3 = copy.deepcopy(model)
    opt3 = po.SparseAdamW(m3.named_parameters(), mask=other)
    with pytest.raises(ValueError, match="different mask"):
        pd.load_sharded_optimizer_state_dict(opt3, m3, saved)
    with pytest.raises(ValueError, match="per-rank state"):  # the earlier layout
        pd.load_sharded_optimizer_state_dict(opt2, twin, {"rank0": {}, "param_groups": []})
