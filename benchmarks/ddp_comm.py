"""DDP gradient bytes and step time: plain DDP vs ``sparse_allreduce_hook``.

Run: ``python benchmarks/ddp_comm.py [--ratios 1e-3 1e-2] [--csv PATH]``; it relaunches
itself under ``torch.distributed.run`` with 2 CPU processes (gloo over loopback, one
intra-op thread each).  Model: the ~10M-parameter LLaMA of ``state_bytes.py`` (fp32,
built from a config), one PIECE-S mask per ratio estimated on one calibration batch (the
same on both ranks: same seed and data, checked with ``assert_same_mask``), the same
``SparseAdamW`` in both runs.  Per ratio it measures, on one machine in one run:

* bytes handed to ``all_reduce`` per step on each rank: plain DDP = every trainable
  gradient (the hook's ``bytes_dense`` counter, checked against the model's size), the
  hook = ``comm_stats(opt).bytes_sent``;
* the median step time (forward + backward + ``opt.step()``, after 2 warm-up steps, as
  DDP rebuilds its buckets after the first) of both, interleaved step by step;
* the ``all_reduce`` of each payload alone.

It then projects the all-reduce time of one step of a 7B model (bf16 gradients, 14 GB) on
8 GPUs over a 100 GB/s link from the measured byte ratio, with the ring all-reduce model
(each rank sends and receives 2 (N-1)/N of the payload): bandwidth term only, no latency,
no overlap with backward, no gather/scatter cost (k entries, small next to the payload).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import piece_optim as po  # noqa: E402
from benchmarks.harness import Timing, append_rows, iqr, make_row, median, provenance, time_fn  # noqa: E402
from benchmarks.state_bytes import model_10m  # noqa: E402
from piece_optim import distributed as pd  # noqa: E402

# One sequence of 32 tokens per rank: small enough that on CPU the backward compute does
# not hide the all-reduce DDP overlaps with it (at 2x32 it hid most of it).
VOCAB, BATCH, SEQ = 8000, 1, 32
PROJ_PARAMS, PROJ_BYTES, PROJ_RANKS, PROJ_GBPS = 7e9, 2, 8, 100.0


def ring_seconds(payload_bytes: float, ranks: int = PROJ_RANKS, gbps: float = PROJ_GBPS) -> float:
    """Bandwidth term of a ring all-reduce: each rank moves 2 (N-1)/N of the payload."""
    return 2 * (ranks - 1) / ranks * payload_bytes / (gbps * 1e9)


def make_step(model: torch.nn.Module, opt: po.SparseAdamW, xs: list) -> Callable[[], None]:
    """One training step per call, cycling through this rank's batches ``xs``."""
    it = iter(range(10**9))

    def step() -> None:
        x = xs[next(it) % len(xs)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(ratios: list[float], csv: str | None, repeats: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1 + rank)  # each rank: its own share of the data
    xs = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(4)]
    prov = provenance("cpu")
    rows, lines = [], []
    for ratio in ratios:
        calib = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        ref = model_10m(torch.float32)
        with po.ImportanceEstimator(ref) as est:
            ref(input_ids=calib, labels=calib).loss.backward()
            est.collect()
            mask = est.select(ratio=ratio)
        pd.assert_same_mask(mask)
        n_params = sum(p.numel() for p in ref.parameters())
        dense_bytes = sum(p.numel() * p.element_size() for p in ref.parameters() if p.requires_grad)

        sent: dict[str, int] = {}
        steps: dict[str, Callable[[], None]] = {}
        for kind in ("ddp", "hook"):
            model = DDP(model_10m(torch.float32))
            opt = po.SparseAdamW(model.module.named_parameters(), mask=mask, lr=1e-4)
            if kind == "hook":
                model.register_comm_hook(opt, pd.sparse_allreduce_hook)
            steps[kind] = make_step(model, opt, xs)
            for _ in range(2):  # warm-up: DDP rebuilds its buckets after the first step
                steps[kind]()
            if kind == "hook":
                st = pd.comm_stats(opt)
                st.reset()
                steps[kind]()
                if st.bytes_dense != dense_bytes:
                    raise RuntimeError(
                        f"hook counted {st.bytes_dense} dense B, model {dense_bytes}"
                    )
                sent[kind] = st.bytes_sent
            else:
                sent[kind] = dense_bytes
        # Interleaved (ddp, hook, hook, ddp, ...): the shared machine's load drifts over a
        # run, so timing one variant after the other would compare different loads.
        samples: dict[str, list[float]] = {"ddp": [], "hook": []}
        for r in range(repeats):
            for kind in ("ddp", "hook") if r % 2 == 0 else ("hook", "ddp"):
                dist.barrier()
                t0 = time.perf_counter()
                steps[kind]()
                samples[kind].append((time.perf_counter() - t0) * 1e3)
        timings = {k: Timing(median(v), iqr(v), tuple(v)) for k, v in samples.items()}
        # the collective alone, on the same payloads (ranks call it in lockstep: min_time_s=0)
        for kind in ("ddp", "hook"):
            payload = torch.ones(sent[kind] // 4)
            timings[f"allreduce_{kind}"] = time_fn(
                lambda t=payload: dist.all_reduce(t), warmup=1, repeats=repeats, min_time_s=0.0
            )
        k = mask.numel_selected()
        byte_ratio = sent["hook"] / sent["ddp"]
        proj_ddp = ring_seconds(PROJ_PARAMS * PROJ_BYTES)
        proj_hook = ring_seconds(PROJ_PARAMS * PROJ_BYTES * byte_ratio)
        rows.append(
            make_row(
                "ddp_comm",
                "gloo",
                timings["hook"],
                prov=prov,
                n=n_params,
                k=k,
                ratio=ratio,
                baseline="plain DDP",
                baseline_timing=timings["ddp"],
                bytes_per_step_ddp=sent["ddp"],
                bytes_per_step_hook=sent["hook"],
                byte_ratio=byte_ratio,
                allreduce_ms_ddp=timings["allreduce_ddp"].median_ms,
                allreduce_ms_hook=timings["allreduce_hook"].median_ms,
                world=world,
                batch=f"{BATCH}x{SEQ} per rank",
                projected_7b_8gpu_100gbps_ms_ddp=proj_ddp * 1e3,
                projected_7b_8gpu_100gbps_ms_hook=proj_hook * 1e3,
            )
        )
        lines.append(
            f"| {ratio:g} | {k:,} | {sent['ddp']:,} | {sent['hook']:,} | {1 / byte_ratio:,.0f}x | "
            f"{timings['ddp'].median_ms:.0f} | {timings['hook'].median_ms:.0f} | "
            f"{timings['ddp'].median_ms / timings['hook'].median_ms:.2f}x | "
            f"{timings['allreduce_ddp'].median_ms:.1f} -> "
            f"{timings['allreduce_hook'].median_ms:.2f} | "
            f"{proj_ddp * 1e3:.0f} ms -> {proj_hook * 1e3:.2f} ms |"
        )
    if rank == 0:
        print(
            f"LLaMA {n_params / 1e6:.2f}M params, fp32 grads, {world} ranks (gloo, CPU, "
            f"{prov['device']}), batch {BATCH}x{SEQ} per rank, torch {prov['torch']}"
        )
        print(
            "| ratio | k | B/step DDP | B/step hook | fewer B | ms/step DDP | ms/step hook | "
            "speedup | all_reduce alone, ms | 7B, 8 GPUs, 100 GB/s (all-reduce/step) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))
        if csv:
            append_rows(csv, rows)
            print(f"wrote {len(rows)} rows to {csv}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--csv", default=None, help="append rows to this CSV (benchmarks/harness)")
    args = ap.parse_args()
    if "LOCAL_RANK" not in os.environ:  # relaunch as 2 processes
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            *sys.argv[1:],
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        sys.exit(subprocess.call(cmd, env=env))
    run(args.ratios, args.csv, args.repeats)


if __name__ == "__main__":
    main()
