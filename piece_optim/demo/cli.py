"""``piece-optim demo``: run the continual-learning benchmark, print a table, save results.

Writes ``DIR/results.json`` (``general_before``; ``methods`` keyed seqft / seqlora /
random / piece-f / piece-s with ``op``, ``bwt``, ``general_after``, ``general`` per stage
and the per-stage ``matrix``), ``DIR/demo.png`` (general ability across the task sequence
per method, and OP/BWT bars) and each sparse method's per-task deltas under
``DIR/deltas/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Only argparse here at import time: `piece-optim --help` imports every subcommand module.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="smaller run (<= 3 minutes on 2 CPU cores)"
    )
    parser.add_argument("--out", default="piece_demo_out", help="output folder")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of seqft,seqlora,random,piece-f,piece-s",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="run the learning-rate grid on validation data instead, write "
        "DIR/tuning.json and print the grid",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="pretrain again instead of loading the shipped weights or ~/.cache/piece_optim",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)",
    )
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)  # tests: "tiny"


def _table(results: dict) -> str:
    g0 = results["general_before"]
    rows = [
        f"{'method':9s} {'lr':>8s} {'OP':>6s} {'BWT':>7s} {'general':>15s} {'lost':>6s} "
        f"{'time':>6s}",
        "-" * 64,
    ]
    for m, r in results["methods"].items():
        rows.append(
            f"{m:9s} {r['lr']:8.0e} {r['op']:6.3f} {r['bwt']:+7.3f} "
            f"{g0:6.3f} -> {r['general_after']:5.3f} {g0 - r['general_after']:6.3f} "
            f"{r['seconds']:5.0f}s"
        )
    return "\n".join(rows)


def _target(results: dict) -> dict | None:
    ms = results["methods"]
    if "seqft" not in ms or "piece-s" not in ms:
        return None
    g0 = results["general_before"]
    lost_ft = g0 - ms["seqft"]["general_after"]
    lost_ps = g0 - ms["piece-s"]["general_after"]
    op_ratio = ms["piece-s"]["op"] / ms["seqft"]["op"] if ms["seqft"]["op"] > 0 else float("nan")
    return {
        "general_lost_seqft": lost_ft,
        "general_lost_piece_s": lost_ps,
        "lost_ratio": lost_ps / lost_ft if lost_ft > 0 else float("nan"),
        "op_ratio": op_ratio,
        "met": bool(lost_ft > 0 and lost_ps <= 0.5 * lost_ft and op_ratio >= 0.7),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = results["methods"]
    tasks = results["tasks"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(tasks) + 1))
    for m, r in ms.items():
        a1.plot(xs, r["general"], marker="o", label=m)
    a1.set_xticks(xs, ["pretrained", *[f"+{t}" for t in tasks]])
    a1.set_ylabel("next-byte accuracy, held-out stdlib")
    a1.set_title("general ability across the task sequence")
    a1.legend()
    names = list(ms)
    w = 0.38
    a2.bar([i - w / 2 for i in range(len(names))], [ms[m]["op"] for m in names], w, label="OP")
    a2.bar([i + w / 2 for i in range(len(names))], [ms[m]["bwt"] for m in names], w, label="BWT")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xticks(range(len(names)), names)
    a2.set_title("OP / BWT (exact match, TRACE definitions)")
    a2.legend()
    cfg = results["config"]
    fig.suptitle(
        f"piece-optim demo: LLaMA {cfg['size']}, tasks {' -> '.join(tasks)}, "
        f"{cfg['steps']} steps/task, sparse ratio {cfg['ratio']:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _full_checkpoint_bytes(model_state: dict) -> int:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp)
        return os.path.getsize(tmp)
    finally:
        os.unlink(tmp)


def run(args: argparse.Namespace) -> int:
    import torch

    from .methods import METHODS, preset, run_benchmark, with_overrides

    name = args.preset or ("quick" if args.quick else "default")
    try:
        cfg = preset(name)
    except ValueError as exc:
        print(f"piece-optim demo: {exc}", file=sys.stderr)
        return 2
    if args.no_cache:
        cfg = with_overrides(cfg, use_cache=False)
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(
            f"piece-optim demo: --methods {bad} unknown; choose from {','.join(METHODS)}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads is not None:
        if args.threads < 1:
            print(f"piece-optim demo: --threads {args.threads} must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    progress = not args.no_progress
    t0 = time.perf_counter()
    if args.tune:
        from .tuning import format_grid, run_grid

        grid = run_grid(cfg, methods=methods, progress=progress)
        (out / "tuning.json").write_text(json.dumps(grid, indent=2))
        print(format_grid(grid))
        print(f"wrote {out / 'tuning.json'} ({time.perf_counter() - t0:.0f} s)")
        return 0
    print(
        f"piece-optim demo ({name}): tasks {' -> '.join(cfg.tasks)}, {cfg.steps} steps of "
        f"{cfg.batch} per task, sparse ratio {cfg.ratio:g}"
    )
    results = run_benchmark(cfg, methods, out=out, progress=progress)
    results["target"] = _target(results)
    results["seconds"] = time.perf_counter() - t0
    print()
    print(_table(results))
    ckpt = _full_checkpoint_bytes(results.pop("_base_state"))
    results["full_checkpoint_bytes"] = ckpt
    for m, r in results["methods"].items():
        for d in r["deltas"]:
            print(
                f"  delta {m:8s} {d['task']:10s} {d['entries']:8,d} entries "
                f"{d['bytes'] / 1024:8.1f} KiB  vs full checkpoint {ckpt / 1024:8.1f} KiB "
                f"({ckpt / d['bytes']:.0f}x smaller)"
            )
    if results.get("revert_check") is not None:
        print(
            f"  revert all piece-s deltas -> pretrained weights bit-exact: "
            f"{results['revert_check']}"
        )
    t = results["target"]
    if t is not None:
        print(
            f"\ntarget (PIECE-S loses <= 1/2 of SeqFT's general ability, OP >= 70% of "
            f"SeqFT's): lost {t['general_lost_piece_s']:.3f} vs {t['general_lost_seqft']:.3f} "
            f"(ratio {t['lost_ratio']:.2f}), OP ratio {t['op_ratio']:.2f} -> "
            f"{'MET' if t['met'] else 'NOT met'}"
        )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    try:
        plot(results, out / "demo.png")
        print(f"wrote {out / 'results.json'}, {out / 'demo.png'}")
    except ImportError:
        print(f"wrote {out / 'results.json'} (no plot: pip install matplotlib)")
    print(f"total {results['seconds']:.0f} s")
    return 0
