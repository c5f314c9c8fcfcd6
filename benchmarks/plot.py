"""Plots from a harness CSV (matplotlib is optional: ``pip install piece-optim[plot]``).

* ``time_vs_n.png``: one panel per micro benchmark, time (ms) vs N on log-log axes, a
  solid line per piece_optim backend and a dashed line per torch baseline, at one ratio
  (1e-3 when present: the paper's default).
* ``e2e_throughput.png``: training-step tokens/s, AdamW vs SparseAdamW per backend.
* ``memory.png``: peak memory (MiB) per phase, one bar per optimizer/backend, from the
  memory benchmark's rows (skipped when there are none).

The CSV is append-only across runs; for each (benchmark, backend, N, ratio, baseline,
device) the plots use the last row, i.e. the latest run.

Run: ``python -m benchmarks.plot benchmarks/results/bench.csv [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .harness import read_rows

MICRO = ("copy", "accumulate", "step", "select", "compaction")


def latest(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The last row for each (benchmark, backend, n, ratio, baseline, phase, device)."""
    keep: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        key = tuple(
            r.get(c, "")
            for c in ("benchmark", "backend", "n", "ratio", "baseline", "phase", "device", "extra")
        )
        keep.pop(key, None)
        keep[key] = r
    return list(keep.values())


def _f(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _plot_ratio(rows: Sequence[dict[str, str]]) -> str:
    ratios = sorted({r["ratio"] for r in rows if r["ratio"]}, key=float)
    for r in ratios:
        if abs(float(r) - 1e-3) < 1e-12:
            return r
    return ratios[len(ratios) // 2] if ratios else ""


def _peak_mib(r: dict[str, str]) -> float | None:
    v = _f(r.get("peak_mem_mib", ""))
    if v is not None:
        return v
    try:
        extra = json.loads(r.get("extra") or "{}")
    except json.JSONDecodeError:
        return None
    for key in ("peak_mem_mib", "peak_growth_mib", "peak_mib"):
        if isinstance(extra.get(key), (int, float)):
            return float(extra[key])
    for key in ("peak_bytes", "bytes", "peak_mem_bytes"):
        if isinstance(extra.get(key), (int, float)):
            return float(extra[key]) / 2**20
    return None


def plot_csv(csv_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the PNGs for ``csv_path`` into ``out_dir``; returns their paths.

    Raises ImportError (with the fix) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError as exc:
        raise ImportError("matplotlib is needed for plots: pip install matplotlib") from exc
    rows = latest(read_rows(csv_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    device = next((r["device"] for r in rows if r["device"]), "")

    micro = [r for r in rows if r["benchmark"] in MICRO and _f(r["time_ms"]) is not None]
    if micro:
        ratio = _plot_ratio(micro)
        names = [b for b in MICRO if any(r["benchmark"] == b for r in micro)]
        ncols = min(3, len(names))
        nrows = -(-len(names) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
        for ax in axes.flat[len(names) :]:
            ax.set_visible(False)
        for ax, bench in zip(axes.flat, names, strict=False):  # more axes than panels
            sel = [r for r in micro if r["benchmark"] == bench and r["ratio"] in ("", ratio)]
            lines: dict[tuple[str, str], dict[int, float]] = {}
            for r in sel:
                n = int(r["n"])
                label = "copy_" if bench == "copy" else f"piece_optim[{r['backend']}]"
                lines.setdefault((label, "-"), {})[n] = float(r["time_ms"])
                if r["baseline"] and _f(r["baseline_ms"]) is not None:
                    lines.setdefault((r["baseline"], "--"), {})[n] = float(r["baseline_ms"])
            for (label, style), pts in sorted(lines.items()):
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], style, marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("N (elements)")
            ax.set_ylabel("time (ms, median)")
            title = bench if bench in ("copy", "accumulate") else f"{bench}, ratio {ratio}"
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"piece_optim micro benchmarks ({device})", fontsize=9)
        fig.tight_layout()
        path = out_dir / "time_vs_n.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    e2e = [r for r in rows if r["benchmark"] == "e2e_train_step" and _f(r["throughput"])]
    if e2e:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        labels = [
            r["backend"]
            if r["backend"].startswith("torch.optim")
            else f"SparseAdamW[{r['backend']}] r={r['ratio']}"
            for r in e2e
        ]
        ax.bar(range(len(e2e)), [float(r["throughput"]) for r in e2e])
        ax.set_xticks(range(len(e2e)), labels, rotation=15, fontsize=7)
        ax.set_ylabel("tokens/s (training step)")
        ax.set_title(f"small LLaMA training step ({device})", fontsize=8)
        fig.tight_layout()
        path = out_dir / "e2e_throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    mem = [r for r in rows if r["benchmark"].startswith("memory") and _peak_mib(r) is not None]
    if mem:
        phases = list(dict.fromkeys(r["phase"] or "peak" for r in mem))
        series = list(dict.fromkeys(r["backend"] or r["benchmark"] for r in mem))
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(phases), 3.8))
        width = 0.8 / max(len(series), 1)
        for j, s in enumerate(series):
            vals = {
                r["phase"] or "peak": _peak_mib(r)
                for r in mem
                if (r["backend"] or r["benchmark"]) == s
            }
            xs = [i + j * width for i, p in enumerate(phases) if p in vals]
            ax.bar(xs, [vals[p] for p in phases if p in vals], width, label=s)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))], phases, fontsize=8)
        ax.set_ylabel("peak memory growth (MiB)")
        ax.set_title(f"memory per phase ({device})", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="plots from a piece_optim benchmark CSV")
    ap.add_argument("csv", nargs="?", default=str(Path(__file__).parent / "results/bench.csv"))
    ap.add_argument("--out", default=None, help="default: the CSV's folder")
    args = ap.parse_args(argv)
    for p in plot_csv(args.csv, args.out or Path(args.csv).parent):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
