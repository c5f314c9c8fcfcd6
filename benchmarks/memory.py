"""Peak memory of each PIECE phase vs torch AdamW, on a ~30M-parameter LLaMA on CPU.

Run: ``python benchmarks/memory.py [--quick] [--csv out.csv]``; or import and call
``run(quick=False) -> list[dict]``.

What is measured, and how
-------------------------
Each phase runs in its own fresh Python process (so one phase's freed-but-kept heap
cannot hide or inflate another's).  The process builds the model (fp32, from a
``transformers.LlamaConfig``, no download), runs one no-grad forward to warm up thread
pools and kernel caches, then takes its baseline: it resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs`` sets ``VmHWM`` to the current RSS) and
reads ``VmRSS``.  After the phase it reads ``VmHWM``: the *peak growth* is
``VmHWM - baseline``, i.e. the most memory the phase ever held on top of the model,
activations, gradients, optimizer state and temporaries included, as the OS saw it.
The workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns freed large
blocks at once instead of keeping them as heap (which would make a phase's peak depend
on the allocation order rather than on what it holds).  Where ``clear_refs`` is not
writable (non-Linux), a 1 ms sampling thread of RSS (psutil) is used instead; the
``measure`` column says which.

Phases (batch 1 x 64 tokens, a few steps each):

* ``adamw``: ``torch.optim.AdamW(fused=True)``, dense grads, ``zero_grad()`` each step.
* ``estimate_fp32`` / ``estimate_bf16``: ``ImportanceEstimator(in_backward=True,
  accum_dtype=...)``, one term per backward, then ``select(ratio=1e-3)``.
* ``train_sparse``: ``SparseAdamW(sparse_grads=True)`` at ratio 1e-3 with
  ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` (it clips the SparseGrads).
  Its mask is random (same k per tensor as ratio 1e-3):
  memory depends on k, not on which entries are chosen.

Also printed: the overlap of the top-0.1% masks selected with bf16 and with fp32
accumulators on the same batches (in-process, not a memory figure), and the bytes per
parameter of each phase for a 7B bf16 model from the memory model in docs/memory.md.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

PHASES = ("adamw", "estimate_fp32", "estimate_bf16", "train_sparse")
RATIO = 1e-3
CONFIG = dict(
    vocab_size=16000,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=10,
    num_attention_heads=6,
    num_key_value_heads=6,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
BATCH, SEQ = 1, 64
MIB = 1024.0**2


# -- measurement ---------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))


class PeakRSS:
    """Peak resident memory over a region, in bytes, from the kernel when possible."""

    def __init__(self) -> None:
        self.measure = "VmHWM (clear_refs reset)"
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS") * 1024
        except OSError:
            import psutil

            self.measure = "RSS sampled every 1 ms (psutil)"
            proc = psutil.Process()
            self.base = self._peak = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._peak
        self.growth = self.peak - self.base


# -- the model and the phases --------------------------------------------------------------
def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.train()
    return model


def _batch(i: int):
    import torch

    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    return x


def _random_mask(model, ratio: float):
    import torch

    import piece_optim as po

    g = torch.Generator().manual_seed(7)
    idx, shapes, total = {}, {}, 0
    for name, p in model.named_parameters():
        total += p.numel()
        k = int(p.numel() * ratio)
        if k == 0 or "embed" in name:
            continue
        idx[name] = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(torch.int32)
        shapes[name] = tuple(p.shape)
    return po.SparseMask(idx, shapes, total)


def run_phase(phase: str, steps: int) -> dict:
    """Run one phase in this process and return its row (call in a fresh process)."""
    import torch

    import piece_optim as po

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model(input_ids=_batch(0))  # warm-up: thread pools, kernel caches
    mask = _random_mask(model, RATIO) if phase == "train_sparse" else None
    extra: dict = {}
    with PeakRSS() as meter:
        if phase == "adamw":
            opt = torch.optim.AdamW(
                model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True
            )
            for i in range(steps):
                x = _batch(i)
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
            extra["state_bytes"] = sum(
                t.numel() * t.element_size()
                for s in opt.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            )
        elif phase in ("estimate_fp32", "estimate_bf16"):
            dt = torch.float32 if phase == "estimate_fp32" else torch.bfloat16
            est = po.ImportanceEstimator(model, method="piece-s", in_backward=True, accum_dtype=dt)
            for i in range(steps):
                x = _batch(i)
                model(input_ids=x, labels=x).loss.backward()
                est.collect()
            est.select(ratio=RATIO)
            extra["state_bytes"] = est.state_bytes()
            est.close()
        elif phase == "train_sparse":
            opt = po.SparseAdamW(
                model.named_parameters(),
                mask=mask,
                lr=1e-5,
                betas=(0.9, 0.95),
                weight_decay=0.0,
                sparse_grads=True,
            )
            for i in range(steps):
                x = _batch(i)
                model(input_ids=x, labels=x).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            extra["state_bytes"] = opt.state_bytes()
            opt.close()
        else:
            raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    return dict(
        phase=phase,
        peak_growth_mib=meter.growth / MIB,
        base_rss_mib=meter.base / MIB,
        measure=meter.measure,
        params=n_params,
        steps=steps,
        batch=f"{BATCH}x{SEQ}",
        state_mib=extra["state_bytes"] / MIB,
    )


def _overlap(a, b) -> float:
    import torch

    common = sum(
        int(torch.isin(a[n].long(), b[n].long()).sum()) for n in a.names() if n in b.names()
    )
    return common / a.numel_selected()


def mask_overlap(n_batches: int) -> dict:
    """Overlap of the top-0.1% PIECE-S masks with bf16 vs fp32 accumulators, same batches.

    bf16 with stochastic rounding (what the estimator does) and with round-to-nearest (the
    same sums folded by ``piece_optim.functional.accumulate_`` without rounding keys),
    both against fp32.  All three fold the same gradients (one backward per batch), so
    only the accumulation differs.
    """
    import torch

    import piece_optim as po
    from piece_optim import functional as F

    model = build_model()
    ests = {
        label: po.ImportanceEstimator(model, method="piece-s", accum_dtype=dt)
        for label, dt in (("fp32", torch.float32), ("bf16_sr", torch.bfloat16))
    }
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eligible = [(n, p) for n, p in named if p.numel() and "embed" not in n]
    rne = [
        (torch.zeros(p.numel(), dtype=torch.bfloat16), torch.zeros(p.numel(), dtype=torch.bfloat16))
        for _, p in eligible
    ]
    for i in range(n_batches):  # one backward per batch, folded into all three
        x = _batch(i)
        model(input_ids=x, labels=x).loss.backward()
        grads = {n: p.grad for n, p in named}
        with torch.no_grad():
            F.accumulate_([grads[n] for n, _ in eligible], [s[0] for s in rne], [s[1] for s in rne])
        for est in ests.values():
            for n, p in named:
                p.grad = grads[n]
            est.collect()
        print(f"overlap: batch {i + 1}/{n_batches}", file=sys.stderr, flush=True)
    masks = {label: est.select(ratio=RATIO) for label, est in ests.items()}
    k = masks["fp32"].numel_selected()
    idx = F.select_topk([s[0] for s in rne], [s[1] for s in rne], k, "piece-s", 1.0)
    masks["bf16_rne"] = po.SparseMask(
        {n: i for (n, _), i in zip(eligible, idx, strict=True) if i.numel()},
        {n: tuple(p.shape) for n, p in eligible},
        masks["fp32"].numel_total(),
    )
    return dict(
        phase="overlap_bf16_vs_fp32",
        batches=n_batches,
        k=k,
        overlap=_overlap(masks["fp32"], masks["bf16_sr"]),
        overlap_round_nearest=_overlap(masks["fp32"], masks["bf16_rne"]),
    )


# -- the memory model (docs/memory.md) -------------------------------------------------------
def memory_model_7b(ratio: float = RATIO) -> list[tuple[str, float]]:
    """Bytes per parameter on top of the bf16 weights (2 B), for each phase."""
    return [
        ("AdamW training (bf16 grads, fp32 m, v, fp32 master)", 2 + 8 + 4),
        ("PIECE estimation, fp32 accumulators (sum g, sum g^2)", 8),
        ("PIECE estimation, bf16 accumulators", 4),
        # the SparseGrad holds bf16 values, as the dense bf16 .grad would
        (
            f"PIECE training, sparse_grads, r={ratio:g} (idx 4 + m,v 8 + master 4 + grad 2)",
            ratio * (4 + 8 + 4 + 2),
        ),
    ]


# -- driver --------------------------------------------------------------------------------
def _hardware() -> str:
    return f"{platform.machine()} {os.cpu_count()}-core CPU, {platform.system()}"


def _spawn(args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    """Run every phase (each in its own process) and the overlap check; return the rows.

    ``quick``: 2 steps per phase and 8 calibration batches for the overlap (else 4, 32).
    """
    import torch

    from piece_optim.backends import get_backend

    steps = 2 if quick else 4
    rows = []
    from tqdm import tqdm

    for phase in tqdm(PHASES, desc="memory phases"):
        rows.append(_spawn(["--worker", phase, "--steps", str(steps)]))
    adamw = rows[0]["peak_growth_mib"]
    for r in rows:
        r["ratio_vs_adamw"] = r["peak_growth_mib"] / adamw
    rows.append(_spawn(["--overlap", str(8 if quick else 32)]))
    common = dict(
        bench="memory",
        hardware=_hardware(),
        torch=torch.__version__,
        backend=get_backend("auto", torch.device("cpu")).name,
    )
    return [dict(r, **common) for r in rows]


def _print(rows: list[dict]) -> None:
    mem = [r for r in rows if "peak_growth_mib" in r]
    print(
        f"# {mem[0]['params'] / 1e6:.1f}M-param LLaMA, fp32, batch {mem[0]['batch']}, "
        f"{mem[0]['steps']} steps, {rows[0]['hardware']}, torch {rows[0]['torch']}, "
        f"backend {rows[0]['backend']}; measure: {mem[0]['measure']}"
    )
    print(f"{'phase':<16}{'peak growth MiB':>16}{'vs AdamW':>10}{'state MiB':>11}")
    for r in mem:
        print(
            f"{r['phase']:<16}{r['peak_growth_mib']:>16.1f}{r['ratio_vs_adamw']:>10.3f}"
            f"{r['state_mib']:>11.2f}"
        )
    for r in rows:
        if r["phase"].startswith("overlap"):
            print(
                f"mask overlap bf16 vs fp32 accumulators at ratio {RATIO:g} "
                f"({r['batches']} batches, k={r['k']}): {100 * r['overlap']:.1f}% with "
                "stochastic rounding (default), "
                f"{100 * r['overlap_round_nearest']:.1f}% with round-to-nearest"
            )
    print("7B bf16 model, memory model (bytes/param on top of the 2 B weights; GiB at 7e9):")
    for what, b in memory_model_7b():
        print(f"  {what:<72}{b:>8.3f} B/param {b * 7e9 / 1024**3:>8.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and batches")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--overlap", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_phase(args.worker, args.steps)))
        return
    if args.overlap:
        print(json.dumps(mask_overlap(args.overlap)))
        return
    rows = run(quick=args.quick)
    _print(rows)
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
