"""Markdown table of a benchmark CSV's ratios (the README's performance table).

Uses the latest row per key (see :func:`benchmarks.plot.latest`) and, by default, only the
largest N of each micro benchmark plus every end-to-end row.

Run: ``python -m benchmarks.table [benchmarks/results/bench.csv] [--n N | --all-n]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .harness import read_rows
from .plot import MICRO, latest


def _g(x: str, fmt: str = ".3g") -> str:
    try:
        return format(float(x), fmt)
    except ValueError:
        return ""


def markdown(rows: Sequence[dict[str, str]], n: int | None = None, all_n: bool = False) -> str:
    """The table as Markdown text."""
    rows = latest(rows)
    micro = [r for r in rows if r["benchmark"] in MICRO and r["n"]]
    if n is not None:
        micro = [r for r in micro if int(r["n"]) == n]
    elif not all_n:
        biggest = {
            b: max(int(r["n"]) for r in micro if r["benchmark"] == b)
            for b in {r["benchmark"] for r in micro}
        }
        micro = [r for r in micro if int(r["n"]) == biggest[r["benchmark"]]]
    order = {b: i for i, b in enumerate(MICRO)}
    micro.sort(
        key=lambda r: (
            order[r["benchmark"]],
            int(r["n"]),
            float(r["ratio"] or 0),
            r["backend"],
            r["baseline"],
        )
    )
    lines = [
        "| benchmark | backend | N | ratio | time ms (IQR) | baseline | baseline ms | "
        "speedup | GB/s | of copy BW |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in micro:
        lines.append(
            f"| {r['benchmark']} | {r['backend']} | {int(r['n']):,} | {r['ratio']} | "
            f"{_g(r['time_ms'])} ({_g(r['spread_ms'], '.2g')}) | {r['baseline']} | "
            f"{_g(r['baseline_ms'])} | {_g(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | "
            f"{_g(r['gbps'])} | {_g(r['frac_of_copy'], '.1%')} |"
        )
    e2e = [r for r in rows if r["benchmark"] == "e2e_train_step"]
    if e2e:
        lines += [
            "",
            "| training step (small LLaMA) | params | trained | ms/step (IQR) | tokens/s | "
            "speedup vs AdamW |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in e2e:
            name = (
                r["backend"]
                if r["backend"].startswith("torch.optim")
                else (f"SparseAdamW [{r['backend']}], ratio {r['ratio']}")
            )
            trained = r["k"] or r["n"]
            lines.append(
                f"| {name} | {int(r['n']):,} | {int(trained):,} | {_g(r['time_ms'])} "
                f"({_g(r['spread_ms'], '.2g')}) | {_g(r['throughput'], '.4g')} | "
                f"{_g(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} |"
            )
    device = next((r["device"] for r in rows if r["device"]), "unknown")
    first = rows[0] if rows else {}
    lines += [
        "",
        f"Device: {device}; torch {first.get('torch', '?')}, triton "
        f"{first.get('triton', '?')}, commit {first.get('commit', '?')}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Markdown table from a benchmark CSV")
    ap.add_argument("csv", nargs="?", default=str(Path(__file__).parent / "results/bench.csv"))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--n", type=int, help="only this N")
    g.add_argument("--all-n", action="store_true", help="every N (default: the largest)")
    args = ap.parse_args(argv)
    print(markdown(read_rows(args.csv), args.n, args.all_n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
