"""``python -m benchmarks``: micro + end-to-end benchmarks into one CSV, then plots.

Run from the repository root (``benchmarks/`` is the repository's, never installed: it
imports transformers and matplotlib and is meant to be read and edited; the package never
imports it).  ``piece-optim bench`` of earlier versions pointed here.

Environment: ``PIECE_OPTIM_BENCH_TINY=1`` (old name ``PIECE_BENCH_TINY``, deprecated)
shrinks every size to a few thousand elements and a toy model with one repeat; it exists
for the test suite, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from . import harness, micro

_TINY_ENV = "PIECE_OPTIM_BENCH_TINY"
RESULTS = Path(__file__).resolve().parent / "results"


def _tiny() -> bool:
    if _TINY_ENV in os.environ:
        return os.environ[_TINY_ENV] == "1"
    if "PIECE_BENCH_TINY" in os.environ:
        warnings.warn(
            f"PIECE_BENCH_TINY is deprecated; use {_TINY_ENV}", DeprecationWarning, stacklevel=2
        )
        return os.environ["PIECE_BENCH_TINY"] == "1"
    return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: about a minute on a 2-core CPU"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for bench.csv and the PNGs "
        "(default: benchmarks/results in the repository)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's default. Default 1: on a "
        "shared machine a parallel op waits for a descheduled worker (here "
        "a 1M-float copy took 20 ms with 2 threads, 0.09 ms with 1)",
    )
    parser.add_argument(
        "--max-n",
        type=int,
        default=None,
        help="keep N <= this and add N = 1e8, 1e9... up to it (GPU; not with --quick)",
    )
    parser.add_argument("--no-e2e", action="store_true", help="micro benchmarks only")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include benchmarks/memory.py's peak-memory rows (default: yes, "
        "except with --quick: it runs each phase in a fresh process, about 5 "
        "minutes on a 2-core CPU)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    if args.no_e2e:
        e2e = None
    else:
        from . import e2e
    if args.max_n is not None and args.quick:
        print(
            "benchmarks: --max-n adds large sizes to a full run; drop --quick (or --max-n)",
            file=sys.stderr,
        )
        return 2
    if args.memory and args.no_e2e:
        print(
            "benchmarks: --memory is part of the end-to-end benchmarks; drop "
            "--no-e2e (or --memory)",
            file=sys.stderr,
        )
        return 2
    if args.threads < 0:
        print(f"benchmarks: --threads={args.threads} must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2
    tiny = _tiny()
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
    out = Path(args.out) if args.out else RESULTS
    csv_path = out / "bench.csv"

    names = micro.backends_to_run(device)
    if not names:
        print(
            f"benchmarks: no backend can run on {device} under "
            f"PIECE_OPTIM_BACKEND={os.environ.get('PIECE_OPTIM_BACKEND')!r}",
            file=sys.stderr,
        )
        return 2
    total = micro.count(sizes, ratios, len(names)) + (1 + len(names) if e2e else 0)
    t0 = time.perf_counter()
    nrows = 0
    with tqdm(total=total, desc="benchmarks", unit="run") as bar:

        def tick(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update()

        # Append after each N: a run cut short (a timeout on a big N) keeps what it measured.
        for n in sizes:
            nrows += harness.append_rows(
                csv_path,
                micro.run(
                    sizes=[n],
                    ratios=ratios,
                    device=device,
                    backends=names,
                    warmup=warmup,
                    repeats=repeats,
                    progress=tick,
                ),
            )
        if e2e is not None:
            nrows += harness.append_rows(
                csv_path,
                e2e.throughput_rows(
                    size,
                    device=device,
                    backends=names,
                    warmup=warmup,
                    repeats=repeats,
                    progress=tick,
                ),
            )
    memory = args.memory if args.memory is not None else not (args.quick or tiny)
    if e2e is not None and memory:
        nrows += harness.append_rows(csv_path, e2e.memory_rows(args.quick or tiny, device))
    elif e2e is not None:
        print("note: memory rows skipped (--quick); add --memory to include them")
    print(
        f"wrote {nrows} rows to {csv_path} in {time.perf_counter() - t0:.0f} s "
        f"(backends: {', '.join(names)}; device: {harness.device_name(device)})"
    )
    if not args.no_plot:
        try:
            from . import plot

            for png in plot.plot_csv(csv_path, out):
                print(f"plot: {png}")
        except ImportError as exc:
            print(f"note: no plots ({exc}); pip install matplotlib for them")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
