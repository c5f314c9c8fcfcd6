"""Benchmark of the C++ CPU backend against torch, measured side by side in one run.

(a) ``SparseAdamW.step()`` at N elements, ratio 1e-3, against a full
    ``torch.optim.AdamW(fused=True)`` step on the same N; and the step's index range check
    (every index in range before anything is written) timed alone.
(b) ``ImportanceEstimator.collect()`` + ``select(ratio=1e-3)`` (PIECE-F) against the torch
    baseline ``sum_g2.addcmul_(g, g)`` + ``torch.topk``, and the GB/s it moves against the
    machine's copy bandwidth (``dst.copy_(src)``, read + write bytes) measured in the same run.

Bytes of (b), per element: collect reads g and reads + writes sum_g2 (12 B); selection reads
sum_g2 twice (two histogram passes, 8 B); the compaction only re-reads the candidates the
2nd pass kept (about k entries).  20 B/element in all.

Usage: ``python benchmarks/bench_ext.py [--n 20000000] [--reps 7] [--csv out.csv]``.
``THP_MEM_ALLOC_ENABLE=1`` (read by torch's CPU allocator at start-up) backs large tensors
with transparent huge pages, for torch's tensors and ours alike: the sparse step's random
accesses then miss the TLB far less often (the dense fused AdamW barely changes).
Each figure is the median of ``--reps`` timed runs after 2 warm-up runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import piece_optim as po


def bench(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Flat(nn.Module):
    """A model that is only parameters: ``parts`` tensors totalling ``n`` elements."""

    def __init__(self, n: int, parts: int) -> None:
        super().__init__()
        sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in sizes])


def step_bench(n: int, ratio: float, reps: int) -> dict:
    k = int(ratio * n)
    p_full = nn.Parameter(torch.randn(n))
    p_full.grad = torch.randn(n)
    full = torch.optim.AdamW([p_full], lr=1e-3, fused=True)
    t_full = bench(full.step, reps)

    p = nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    idx = torch.randperm(n)[:k].sort().values.int()
    sparse = po.SparseAdamW([p], mask={p: idx}, lr=1e-3, backend="cpu")
    t_sparse = bench(sparse.step, reps * 20)
    # the index range check every C++ step runs before writing (csrc/ops.cpp), alone
    check = torch.ops.piece_optim._first_out_of_range
    t_check = bench(lambda: check(idx, n), reps * 20)
    return {
        "torch_fused_adamw_s": t_full,
        "sparse_step_s": t_sparse,
        "k": k,
        "speedup": t_full / t_sparse,
        "check_s": t_check,
    }


def select_bench(n: int, ratio: float, reps: int, parts: int) -> dict:
    k = int(ratio * n)
    # torch baseline on ONE flat tensor (its best case: no concatenation needed)
    g_flat = torch.randn(n)
    s_flat = torch.zeros(n)

    def baseline() -> None:
        s_flat.addcmul_(g_flat, g_flat)
        torch.topk(s_flat, k, sorted=False)

    t_base = bench(baseline, reps)

    model = Flat(n, parts)
    grads = [torch.randn_like(q) for q in model.ps]
    est = po.ImportanceEstimator(model, method="piece-f", exclude=(), backend="cpu")

    def ours() -> None:
        for q, g in zip(model.ps, grads, strict=True):
            q.grad = g
        est.collect()
        est.select(ratio=ratio)

    t_ours = bench(ours, reps)

    def collect_only() -> None:
        for q, g in zip(model.ps, grads, strict=True):
            q.grad = g
        est.collect()

    t_collect = bench(collect_only, reps)
    t_select = bench(lambda: est.select(ratio=ratio), reps)
    mask = est.select(ratio=ratio)
    assert mask.numel_selected() == k

    src, dst = torch.randn(n), torch.empty(n)
    t_copy = bench(lambda: dst.copy_(src), reps)
    copy_gbs = 8 * n / t_copy / 1e9
    bytes_moved = 20 * n
    return {
        "baseline_s": t_base,
        "ours_s": t_ours,
        "collect_s": t_collect,
        "select_s": t_select,
        "speedup": t_base / t_ours,
        "gbs": bytes_moved / t_ours / 1e9,
        "copy_gbs": copy_gbs,
        "floor_s": bytes_moved / (copy_gbs * 1e9),
        "k": k,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000_000)
    ap.add_argument("--ratio", type=float, default=1e-3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--parts", type=int, default=4, help="tensors the estimator's model has")
    ap.add_argument("--csv", default=None, help="append the results to this CSV file")
    a = ap.parse_args()

    from piece_optim import backends

    be = backends.load("cpu")
    if be is None:
        raise SystemExit(f"the C++ CPU backend does not load: {backends.explain('adamw')['cpu']}")
    hw = (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, isa {torch.ops.piece_optim.cpu_isa()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}, "
        f"ext {be.origin}"
    )
    print(f"# {hw}")
    st = step_bench(a.n, a.ratio, a.reps)
    print(
        f"(a) step N={a.n:,} k={st['k']:,}: torch AdamW(fused=True) full step "
        f"{st['torch_fused_adamw_s'] * 1e3:.2f} ms, SparseAdamW(cpu) "
        f"{st['sparse_step_s'] * 1e6:.1f} us -> {st['speedup']:.0f}x"
    )
    print(
        f"    of which the index range check: {st['check_s'] * 1e6:.1f} us alone "
        f"({st['check_s'] / st['sparse_step_s']:.1%} of the step)"
    )
    se = select_bench(a.n, a.ratio, a.reps, a.parts)
    print(
        f"(b) collect+select PIECE-F N={a.n:,} k={se['k']:,}: torch addcmul_+topk "
        f"{se['baseline_s'] * 1e3:.1f} ms, ours {se['ours_s'] * 1e3:.1f} ms "
        f"(collect {se['collect_s'] * 1e3:.1f} + select {se['select_s'] * 1e3:.1f}) -> "
        f"{se['speedup']:.1f}x"
    )
    print(
        f"    bandwidth: {se['gbs']:.1f} GB/s moved (20 B/element) vs copy "
        f"{se['copy_gbs']:.1f} GB/s; floor {se['floor_s'] * 1e3:.1f} ms -> "
        f"{se['ours_s'] / se['floor_s']:.2f}x the floor"
    )
    if a.csv:
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(
                    ["hardware", "n", "ratio", "step_speedup", "select_speedup", "gbs", "copy_gbs"]
                )
            w.writerow(
                [
                    hw,
                    a.n,
                    a.ratio,
                    f"{st['speedup']:.1f}",
                    f"{se['speedup']:.2f}",
                    f"{se['gbs']:.2f}",
                    f"{se['copy_gbs']:.2f}",
                ]
            )


if __name__ == "__main__":
    main()
