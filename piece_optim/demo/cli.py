"""``piece-optim demo``: run the continual-learning benchmark, print a table, save results.

Writes ``DIR/results.json`` (``general_before``, ``op_floor``; ``methods`` keyed seqft /
seqlora / random / piece-f / piece-s with ``op``, ``bwt``, ``la``, ``general_after``,
``general`` per stage and the per-stage ``matrix``), ``DIR/demo.png`` (general ability
across the task sequence per method, and OP/BWT bars) and each sparse method's per-task
deltas under ``DIR/deltas/``.  ``--pareto`` runs the frontier benchmark instead
(:mod:`piece_optim.demo.pareto`: ``DIR/pareto.json``, ``DIR/pareto.png``).
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
        help="comma-separated methods (default: seqft,seqlora,random,piece-f,piece-s; "
        "--pareto: all of seqft,seqlora,random,random-low,piece-f,piece-s,piece-ref,"
        "piece-self); NAME:field=value overrides a config field for that method",
    )
    parser.add_argument(
        "--pareto",
        action="store_true",
        help="the frontier benchmark: an lr sweep x seeds per method, scored on the test "
        "splits -> DIR/pareto.json, DIR/pareto.png (--quick: about 10 minutes on 2 cores)",
    )
    parser.add_argument(
        "--size",
        default=None,
        choices=("small", "medium"),
        help="base model: small (0.9M parameters, default) or medium (5.2M); both ship "
        "with the package (--no-cache pretrains: medium ~27 CPU-minutes)",
    )
    parser.add_argument(
        "--seeds", default=None, help="--pareto: comma-separated seeds (default 0,1,2; quick 0,1)"
    )
    parser.add_argument(
        "--lrs",
        default=None,
        help="--pareto: FAMILY=lr/lr/...;... overriding the grid of a family "
        "(full, lora, sparse), e.g. 'sparse=1e-3/3e-3'",
    )
    parser.add_argument("--split", default="test", choices=("test", "val"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="--pareto: runs in parallel processes, each with --threads threads (default: one "
        "process per CPU core, at most 8, one thread each)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="--pareto: keep the runs already in DIR/pareto.json"
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
        f"{'method':10s} {'lr':>8s} {'OP':>6s} {'BWT':>7s} {'LA':>6s} {'general':>15s} "
        f"{'lost':>6s} {'time':>6s}",
        "-" * 72,
    ]
    for m, r in results["methods"].items():
        rows.append(
            f"{m:10s} {r['lr']:8.0e} {r['op']:6.3f} {r['bwt']:+7.3f} {r['la']:6.3f} "
            f"{g0:6.3f} -> {r['general_after']:5.3f} {g0 - r['general_after']:6.3f} "
            f"{r['seconds']:5.0f}s"
        )
    rows.append(
        f"OP floor (every prompt answered with its task's most frequent answer): "
        f"{results['op_floor']:.3f}; LA = mean score on each task right after learning it"
    )
    return "\n".join(rows)


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

    from .methods import (
        DEFAULT_METHODS,
        METHODS,
        parse_method,
        preset,
        run_benchmark,
        with_overrides,
    )

    name = args.preset or ("quick" if args.quick else "default")
    try:
        cfg = preset(name, size=args.size)
    except ValueError as exc:
        print(f"piece-optim demo: {exc}", file=sys.stderr)
        return 2
    if args.no_cache:
        cfg = with_overrides(cfg, use_cache=False)
    if args.methods:
        methods = tuple(args.methods.split(","))
    else:
        methods = METHODS if args.pareto else DEFAULT_METHODS
    bad = []
    for m in methods:
        try:
            parse_method(m)
        except ValueError as exc:
            bad.append(f"{m} ({exc})")
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
    if args.pareto:
        return _run_pareto(args, cfg, name, methods, out, progress)
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
    print(
        "\none learning rate per family: a method that learns less also forgets less; "
        "compare methods at a matched OP with `piece-optim demo --pareto --quick`"
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    try:
        plot(results, out / "demo.png")
        print(f"wrote {out / 'results.json'}, {out / 'demo.png'}")
    except ImportError:
        print(f"wrote {out / 'results.json'} (no plot: pip install matplotlib)")
    print(f"total {results['seconds']:.0f} s")
    return 0


def _run_pareto(args, cfg, name: str, methods: tuple[str, ...], out: Path, progress: bool) -> int:
    from .pareto import LRS, SEEDS, format_summary, plot_pareto, run_pareto

    grid = "quick" if name == "quick" else "default"
    lrs = dict(LRS[grid])
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else SEEDS[grid]
        for part in (args.lrs or "").split(";"):
            if part.strip():
                fam, _, vals = part.partition("=")
                if fam not in lrs:
                    raise ValueError(f"family {fam!r} is unknown; choose from {sorted(lrs)}")
                lrs[fam] = tuple(float(v) for v in vals.split("/"))
    except ValueError as exc:
        print(f"piece-optim demo: --seeds/--lrs: {exc}", file=sys.stderr)
        return 2
    n = sum(len(lrs[_family(m)]) for m in methods) * len(seeds)
    print(
        f"piece-optim demo --pareto ({name}, {cfg.size} model): {len(methods)} methods, "
        f"{n} runs ({len(seeds)} seeds), tasks {' -> '.join(cfg.tasks)}, {cfg.steps} steps of "
        f"{cfg.batch} per task, ratio {cfg.ratio:g}, scored on the {args.split} splits"
    )
    jobs = args.jobs if args.jobs is not None else min(8, os.cpu_count() or 1)
    if jobs < 1:
        print(f"piece-optim demo: --jobs {jobs} must be >= 1", file=sys.stderr)
        return 2
    data = run_pareto(
        cfg,
        methods,
        lrs,
        seeds,
        out,
        split=args.split,
        progress=progress,
        jobs=jobs,
        threads=args.threads or (1 if jobs > 1 else None),
        resume=args.resume,
    )
    print()
    print(format_summary(data))
    try:
        plot_pareto(data, out / "pareto.png")
        print(f"wrote {out / 'pareto.json'}, {out / 'pareto.png'} ({data['seconds']:.0f} s)")
    except ImportError:
        print(f"wrote {out / 'pareto.json'} (no plot: pip install matplotlib)")
    return 0


def _family(spec: str) -> str:
    from .methods import FAMILY, parse_method

    return FAMILY[parse_method(spec)[0]]
