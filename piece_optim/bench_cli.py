"""``piece-optim bench``: micro + end-to-end benchmarks into one CSV, then plots.

The benchmark code lives in the repository's ``benchmarks/`` folder, which is not part
of the installed package (it imports transformers and matplotlib and is meant to be read
and edited).  This command finds it next to the package of an editable / source install
and says so clearly when it is missing (e.g. a wheel install).

Environment: ``PIECE_BENCH_TINY=1`` shrinks every size to a few thousand elements and a
toy model with one repeat; it exists for the test suite, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import piece_optim

_TINY_ENV = "PIECE_BENCH_TINY"


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (it may not exist)."""
    return Path(piece_optim.__file__).resolve().parents[1] / "benchmarks"


def _import(name: str) -> ModuleType:
    """Import ``benchmarks.<name>`` from the repository, never a same-named package."""
    bdir = benchmarks_dir()
    if not (bdir / "harness.py").is_file():
        raise FileNotFoundError(
            f"the benchmarks folder was not found at {bdir}. `piece-optim bench` runs from a "
            "source checkout: git clone the repository and `pip install --no-build-isolation "
            "-e .` there (benchmarks/ is not shipped in the wheel)."
        )
    root = str(bdir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    pkg = importlib.import_module("benchmarks")
    where = Path(getattr(pkg, "__file__", None) or next(iter(pkg.__path__))).resolve()
    if bdir not in (where, *where.parents):
        raise ImportError(
            f"`import benchmarks` found {where}, not {bdir}: another package named "
            "'benchmarks' shadows the repository's; uninstall it or run from the repository"
        )
    return importlib.import_module(f"benchmarks.{name}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: about a minute on a 2-core CPU")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="output folder for bench.csv and the PNGs "
                        "(default: benchmarks/results in the repository)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 0 keeps torch's default. Default 1: on a "
                        "shared machine a parallel op waits for a descheduled worker (here "
                        "a 1M-float copy took 20 ms with 2 threads, 0.09 ms with 1)")  # fmt: skip
    parser.add_argument("--max-n", type=int, default=None,
                        help="keep N <= this and add N = 1e8, 1e9... up to it (GPU; not with "
                        "--quick)")  # fmt: skip
    parser.add_argument("--no-e2e", action="store_true", help="micro benchmarks only")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="include benchmarks/memory.py's peak-memory rows (default: yes, "
                        "except with --quick: it runs each phase in a fresh process, about 5 "
                        "minutes on a 2-core CPU)")  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    try:
        harness = _import("harness")
        micro = _import("micro")
        e2e = None if args.no_e2e else _import("e2e")
    except (FileNotFoundError, ImportError) as exc:
        print(f"piece-optim bench: {exc}", file=sys.stderr)
        return 2
    if args.max_n is not None and args.quick:
        print("piece-optim bench: --max-n adds large sizes to a full run; drop --quick (or "
              "--max-n)", file=sys.stderr)  # fmt: skip
        return 2
    if args.memory and args.no_e2e:
        print("piece-optim bench: --memory is part of the end-to-end benchmarks; drop "
              "--no-e2e (or --memory)", file=sys.stderr)  # fmt: skip
        return 2
    if args.threads < 0:
        print(f"piece-optim bench: --threads={args.threads} must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("piece-optim bench: --device cuda but torch sees no GPU; use --device cpu",
              file=sys.stderr)  # fmt: skip
        return 2
    tiny = os.environ.get(_TINY_ENV, "") == "1"
    if tiny:
        sizes, ratios, repeats, warmup = micro.TINY_SIZES, (1e-2,), 1, 0
        size = e2e.TINY if e2e else None
    elif args.quick:
        sizes, ratios, repeats, warmup = micro.QUICK_SIZES, micro.QUICK_RATIOS, 5, 1
        size = e2e.QUICK if e2e else None
    else:
        sizes, ratios, repeats, warmup = micro.FULL_SIZES, micro.FULL_RATIOS, 5, 2
        size = e2e.FULL if e2e else None
    sizes = list(sizes)
    if args.max_n and not tiny:
        sizes = [s for s in sizes if s <= args.max_n]
        big = 100_000_000
        while big <= args.max_n:
            sizes.append(big)
            big *= 10
    out = Path(args.out) if args.out else benchmarks_dir() / "results"
    csv_path = out / "bench.csv"

    names = micro.backends_to_run(device)
    if not names:
        print(f"piece-optim bench: no backend can run on {device} under "
              f"PIECE_OPTIM_BACKEND={os.environ.get('PIECE_OPTIM_BACKEND')!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    total = micro.count(sizes, ratios, len(names)) + (1 + len(names) if e2e else 0)
    t0 = time.perf_counter()
    nrows = 0
    with tqdm(total=total, desc="piece-optim bench", unit="run") as bar:

        def tick(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update()

        # Append after each N: a run cut short (a timeout on a big N) keeps what it measured.
        for n in sizes:
            nrows += harness.append_rows(csv_path, micro.run(
                sizes=[n], ratios=ratios, device=device, backends=names, warmup=warmup,
                repeats=repeats, progress=tick))  # fmt: skip
        if e2e is not None:
            nrows += harness.append_rows(csv_path, e2e.throughput_rows(
                size, device=device, backends=names, warmup=warmup, repeats=repeats,
                progress=tick))  # fmt: skip
    memory = args.memory if args.memory is not None else not (args.quick or tiny)
    if e2e is not None and memory:
        nrows += harness.append_rows(csv_path, e2e.memory_rows(args.quick or tiny, device))
    elif e2e is not None:
        print("note: memory rows skipped (--quick); add --memory to include them")
    print(f"wrote {nrows} rows to {csv_path} in {time.perf_counter() - t0:.0f} s "
          f"(backends: {', '.join(names)}; device: {harness.device_name(device)})")  # fmt: skip
    if not args.no_plot:
        try:
            plot = _import("plot")
            for png in plot.plot_csv(csv_path, out):
                print(f"plot: {png}")
        except ImportError as exc:
            print(f"note: no plots ({exc}); pip install matplotlib for them")
    return 0
