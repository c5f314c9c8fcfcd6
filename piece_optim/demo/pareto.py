"""The frontier benchmark: ``piece-optim demo --pareto [--quick] --out DIR``.

One learning rate per method says little: a method that learns less also forgets less.
So every method runs a learning-rate sweep (its family's grid in :data:`LRS`, from "learns
little" to "learns fully") times several seeds (a seed changes data order, calibration
batches, random masks, LoRA init and the model's own samples; the tasks' test prompts stay
the same), and each run gives one point (OP, general ability after).  A method's
**frontier** is the upper-left envelope of its points: the most general ability it keeps
for a given OP.

Matched OP.  Methods are compared at ``target_op = op_floor + MATCH * (best - op_floor)``,
70% of the way from the constant-answer floor (OP of answering every prompt with the
task's most frequent answer: what the format alone scores) to SeqFT's best mean OP over
its sweep.  On each seed's frontier, general ability, BWT and LA are linearly
interpolated in OP at that target; the table gives mean and spread (sample std) over the
seeds.  Each frontier includes the untrained model as its lr-0 point (OP of the base
model, general ability unchanged, BWT 0), so a target below a method's smallest-lr OP
interpolates towards "no training" instead of extrapolating; a target above its largest
OP is "not reached" for that seed.

Writes ``DIR/pareto.json`` (``general_before``, ``op_floor``, ``runs`` with ``method``,
``lr``, ``seed``, ``op``, ``bwt``, ``la``, ``general_after``; plus ``split``, ``config``,
``lrs``, ``seeds``, ``base_op``, ``summary``) after every run, so an interrupted sweep
keeps what it did (``--resume`` continues it), and ``DIR/pareto.png``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .methods import (
    DEFAULT_METHODS,
    FAMILY,
    METHODS,
    Bench,
    DemoConfig,
    op_floor,
    parse_method,
    run_method,
    setup,
    start,
)
from .model import exact_match, next_token_accuracy

# Learning-rate grids per family (see docs/demo.md for where they come from).
LRS: dict[str, dict[str, tuple[float, ...]]] = {
    "default": {
        "full": (1e-5, 3e-5, 1e-4, 3e-4),
        "lora": (1e-4, 3e-4, 1e-3, 3e-3),
        "sparse": (3e-4, 1e-3, 3e-3, 1e-2),
    },
    "quick": {
        "full": (3e-5, 1e-4, 3e-4),
        "lora": (3e-4, 1e-3, 3e-3),
        "sparse": (1e-3, 3e-3, 1e-2),
    },
}
SEEDS = {"default": (0, 1, 2), "quick": (0, 1)}
PARETO_METHODS = METHODS
MATCH = 0.7  # matched OP: this fraction of the way from the floor to SeqFT's best mean OP
BWT_TARGET = -0.1


# -- running the sweep ----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: DemoConfig, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["bench"] = setup(cfg, progress=False)
    _WORKER["cfg"] = cfg


def _run_in_worker(spec: str, lr: float, seed: int, split: str) -> dict:
    return _one_run(_WORKER["bench"], _WORKER["cfg"], spec, lr, seed, split, progress=False)


def _one_run(
    bench: Bench, cfg: DemoConfig, spec: str, lr: float, seed: int, split: str, progress: bool
) -> dict:
    from dataclasses import replace

    r = run_method(
        spec,
        bench.base,
        bench.tasks,
        replace(cfg, seed=seed),
        bench.windows[split],
        split=split,
        lr=lr,
        progress=progress,
        general_text=bench.general_text,
    )
    r.pop("model")
    keep = ("op", "bwt", "la", "general_after", "general", "matrix", "seconds", "stages")
    run = {"method": spec, "lr": lr, "seed": seed, **{k: r[k] for k in keep}}
    return run | {"config": run_config(spec, cfg)}


_COMMON = (
    "size",
    "pretrain_steps",
    "tasks",
    "n_train",
    "n_eval",
    "steps",
    "batch",
    "exclude",
    "n_general",
    "max_new",
    "data_seed",
)
_FIELDS = {
    "lora": ("lora_r",),
    "sparse": ("ratio",),
    "piece": ("eps", "tie_break", "calib_batches"),
    "reference": ("ref_batches", "ref_len"),
    "random-low": ("low_pool",),
    "protective": ("ref_weight", "ref_memory", "ref_pool"),
}


def run_config(spec: str, cfg: DemoConfig) -> dict:
    """The configuration fields a run of ``spec`` depends on (after its overrides), as
    stored: ``--resume`` reuses a stored run only if these are unchanged."""
    from .. import importance
    from .methods import REFERENCE, method_config

    name, mcfg = method_config(spec, cfg)
    fields = list(_COMMON)
    fam = FAMILY[name]
    fields += _FIELDS.get(fam, ())
    if name.startswith("piece-"):  # PIECE-F's score has no eps and no magnitude tie-break
        fields += _FIELDS["piece"][2:] if name == "piece-f" else _FIELDS["piece"]
    if name in REFERENCE:
        fields += _FIELDS["reference"]
        fields += _FIELDS["random-low" if name == "random-low" else "protective"]
    out = {f: getattr(mcfg, f) for f in fields}
    if "eps" in out and str(mcfg.eps).startswith("auto"):
        out["eps_auto"] = [importance.EPS_AUTO_QUANTILE, importance.EPS_AUTO_FRACTION]
    return json.loads(json.dumps(out))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_pareto(
    cfg: DemoConfig,
    methods: tuple[str, ...],
    lrs: dict[str, tuple[float, ...]],
    seeds: tuple[int, ...],
    out: Path,
    split: str = "test",
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every (method, lr, seed); write ``out/pareto.json`` as it goes, return it."""
    import torch

    t0 = time.perf_counter()
    bench = start(cfg, methods, progress, log)
    data: dict = {
        "general_before": next_token_accuracy(bench.base, bench.windows[split]),
        "op_floor": op_floor(bench.tasks, split),
        "base_op": sum(exact_match(bench.base, getattr(t, split), cfg.max_new) for t in bench.tasks)
        / len(bench.tasks),
        "split": split,
        "tasks": [t.name for t in bench.tasks],
        "config": asdict(cfg),
        "lrs": {m: list(lrs[FAMILY[parse_method(m)[0]]]) for m in methods},
        "seeds": list(seeds),
        "runs": [],
    }
    path = out / "pareto.json"
    if resume and path.exists():
        old = json.loads(path.read_text())
        want = {m: run_config(m, cfg) for m in methods}
        # runs of other methods stay as they are (another --methods subset ran them)
        kept = [
            r
            for r in old.get("runs", [])
            if old.get("split") == split
            and (r["method"] not in want or r.get("config") == want[r["method"]])
        ]
        data["runs"] = kept
        for r in kept:
            if r["method"] not in want:
                lrs_m = data["lrs"].setdefault(r["method"], [])
                if r["lr"] not in lrs_m:
                    lrs_m.append(r["lr"])
        data["seeds"] = sorted(set(seeds) | {r["seed"] for r in kept})
        log(
            f"resuming: {len(kept)} of the {len(old.get('runs', []))} runs in {path} kept "
            "(same method configuration and split)"
        )
    done = {(r["method"], r["lr"], r["seed"]) for r in data["runs"]}
    todo = [
        (m, lr, s)
        for m in methods
        for lr in data["lrs"][m]
        for s in seeds
        if (m, lr, s) not in done
    ]
    bar = tqdm(total=len(todo), desc="frontier runs", disable=not progress)

    def record(run: dict) -> None:
        data["runs"].append(run)
        data["seconds"] = time.perf_counter() - t0
        _write_json(path, data)
        bar.update(1)
        bar.set_postfix_str(
            f"{run['method']} lr {run['lr']:.0e} s{run['seed']}: OP {run['op']:.2f} "
            f"gen {run['general_after']:.3f}"
        )

    if jobs <= 1:
        for m, lr, s in todo:
            record(_one_run(bench, cfg, m, lr, s, split, progress))
    else:
        import multiprocessing as mp

        per_job = threads or max(1, torch.get_num_threads() // jobs)
        with ProcessPoolExecutor(
            jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(cfg, per_job),
        ) as pool:
            futures = [pool.submit(_run_in_worker, m, lr, s, split) for m, lr, s in todo]
            for f in as_completed(futures):
                record(f.result())
    bar.close()
    order = {
        (m, lr, s): i
        for i, (m, lr, s) in enumerate(
            (m, lr, s) for m in data["lrs"] for lr in data["lrs"][m] for s in seeds
        )
    }
    data["runs"].sort(key=lambda r: order.get((r["method"], r["lr"], r["seed"]), len(order)))
    data["summary"] = summarize(data)
    data["seconds"] = time.perf_counter() - t0
    _write_json(path, data)
    return data


# -- frontier, matched OP, summary ------------------------------------------------------------


def frontier(points: list[dict]) -> list[dict]:
    """The Pareto-optimal points (no other point has both OP and general >=, one >),
    sorted by OP ascending (so general descends)."""
    pts = sorted(points, key=lambda p: (p["op"], -p["general_after"]))
    out: list[dict] = []
    for p in sorted(pts, key=lambda p: (-p["general_after"], -p["op"])):
        if not out or p["op"] > out[-1]["op"]:
            out.append(p)
    return sorted(out, key=lambda p: p["op"])


def at_op(points: list[dict], target: float) -> dict | None:
    """General ability, BWT and LA linearly interpolated in OP on the frontier of
    ``points`` at OP ``target``; None when no point reaches it."""
    f = frontier(points)
    if not f or f[-1]["op"] < target:
        return None
    if f[0]["op"] >= target:
        return {k: f[0][k] for k in ("general_after", "bwt", "la")} | {"lr": f[0]["lr"]}
    for a, b in zip(f, f[1:], strict=False):
        if a["op"] <= target <= b["op"]:
            w = (target - a["op"]) / (b["op"] - a["op"]) if b["op"] > a["op"] else 0.0
            res = {k: a[k] + w * (b[k] - a[k]) for k in ("general_after", "bwt", "la")}
            return res | {"lr": math.exp(_lerp_log(a["lr"], b["lr"], w))}
    return None


def _lerp_log(a: float, b: float, w: float) -> float:
    if a <= 0:  # the lr-0 anchor: report the real lr it runs towards
        return math.log(b)
    return math.log(a) + w * (math.log(b) - math.log(a))


def _anchor(data: dict) -> dict:
    """The untrained model as the lr-0 point of every frontier."""
    return {
        "lr": 0.0,
        "op": data["base_op"],
        "general_after": data["general_before"],
        "bwt": 0.0,
        "la": data["base_op"],
    }


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_points(data: dict, method: str) -> list[dict]:
    """Per lr: mean and sample std over seeds of OP, general, BWT, LA."""
    out = []
    runs = [r for r in data["runs"] if r["method"] == method]
    for lr in sorted({r["lr"] for r in runs}):
        rs = [r for r in runs if r["lr"] == lr]
        p: dict = {"lr": lr, "n": len(rs)}
        for k in ("op", "general_after", "bwt", "la"):
            p[k], p[k + "_sd"] = _mean_sd([r[k] for r in rs])
        out.append(p)
    return out


def summarize(data: dict) -> dict:
    """The matched-OP table and the target check (see the module doc)."""
    methods = list(dict.fromkeys(r["method"] for r in data["runs"]))
    floor, g0 = data["op_floor"], data["general_before"]
    res: dict = {"match": MATCH, "methods": {}}
    if "seqft" not in methods:
        return res
    best = max(p["op"] for p in mean_points(data, "seqft"))
    target = floor + MATCH * (best - floor)
    res.update(seqft_best_op=best, target_op=target)
    for m in methods:
        seeds = sorted({r["seed"] for r in data["runs"] if r["method"] == m})
        per = {}
        for s in seeds:
            pts = [r for r in data["runs"] if r["method"] == m and r["seed"] == s]
            per[s] = at_op([_anchor(data), *pts], target)
        hit = [v for v in per.values() if v is not None]
        row: dict = {"seeds": len(seeds), "reached": len(hit)}
        for k in ("general_after", "bwt", "la", "lr"):
            row[k], row[k + "_sd"] = _mean_sd([v[k] for v in hit])
        row["lost"] = g0 - row["general_after"]
        row["per_seed"] = {str(s): v for s, v in per.items()}
        row["best_mean_op"] = max(p["op"] for p in mean_points(data, m))
        res["methods"][m] = row
    ms = res["methods"]
    lost_ft = ms["seqft"]["lost"]
    checks = {}
    for m, row in ms.items():
        if not parse_method(m)[0].startswith("piece-") or row["reached"] < row["seeds"]:
            continue
        c = {
            "general_ge_random": "random" in ms
            and row["general_after"] >= ms["random"]["general_after"],
            "lost_le_half_seqft": row["lost"] <= 0.5 * lost_ft,
            "bwt_ge_target": row["bwt"] >= BWT_TARGET,
        }
        c["met"] = all(c.values())
        if "random-low" in ms:
            c["stretch_ge_random_low"] = row["general_after"] >= ms["random-low"]["general_after"]
        checks[m] = c
    res["target"] = checks
    return res


def format_summary(data: dict) -> str:
    s = data.get("summary") or summarize(data)
    g0 = data["general_before"]
    lines = [
        f"general before {g0:.3f}; constant-answer OP floor {data['op_floor']:.3f}; base model "
        f"OP {data['base_op']:.3f}; split {data['split']}",
    ]
    if "target_op" not in s:
        return lines[0] + "\n(no seqft runs: no matched OP)"
    lines.append(
        f"matched OP {s['target_op']:.3f} = floor + {MATCH:.0%} of the way to SeqFT's best "
        f"mean OP {s['seqft_best_op']:.3f}; mean +- sd over seeds"
    )
    lines.append(
        f"{'method':22s} {'general at match':>17s} {'lost':>6s} {'BWT':>14s} {'LA':>13s} "
        f"{'lr':>7s} {'reached':>7s} {'best OP':>7s}"
    )
    for m, r in s["methods"].items():
        if r["reached"] == 0:
            lines.append(
                f"{m:22s} {'not reached':>17s} {'':6s} {'':14s} {'':13s} {'':7s} "
                f"{r['reached']}/{r['seeds']:<5d} {r['best_mean_op']:7.3f}"
            )
            continue
        lines.append(
            f"{m:22s} {r['general_after']:8.3f} +- {r['general_after_sd']:5.3f} {r['lost']:6.3f} "
            f"{r['bwt']:+7.3f} +- {r['bwt_sd']:4.2f} {r['la']:5.3f} +- {r['la_sd']:4.2f} "
            f"{r['lr']:7.1e} {r['reached']}/{r['seeds']:<5d} {r['best_mean_op']:7.3f}"
        )
    for m, c in s.get("target", {}).items():
        lines.append(
            f"target {m}: general >= random {c['general_ge_random']}, lost <= 1/2 SeqFT's "
            f"{c['lost_le_half_seqft']}, BWT >= {BWT_TARGET} {c['bwt_ge_target']} -> "
            f"{'MET' if c['met'] else 'not met'}"
            + (
                f"; stretch (>= random-low) {c['stretch_ge_random_low']}"
                if "stretch_ge_random_low" in c
                else ""
            )
        )
    return "\n".join(lines)


def plot_pareto(data: dict, path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data.get("summary") or summarize(data)
    fig, ax = plt.subplots(figsize=(8.5, 6))
    methods = list(dict.fromkeys(r["method"] for r in data["runs"]))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        c = cmap(i % 10)
        pts = mean_points(data, m)
        ax.errorbar(
            [p["op"] for p in pts],
            [p["general_after"] for p in pts],
            xerr=[p["op_sd"] for p in pts],
            yerr=[p["general_after_sd"] for p in pts],
            fmt="o",
            color=c,
            ms=4,
            capsize=2,
            alpha=0.8,
            label=m,
        )
        f = frontier([_anchor(data), *pts])
        ax.plot([p["op"] for p in f], [p["general_after"] for p in f], "-", color=c, lw=1.3)
        for p in pts:
            ax.annotate(
                f"{p['lr']:.0e}",
                (p["op"], p["general_after"]),
                fontsize=6,
                color=c,
                xytext=(2, 2),
                textcoords="offset points",
            )
    ax.axvline(data["op_floor"], color="k", ls="--", lw=1, label="constant-answer floor")
    if "target_op" in s:
        ax.axvline(s["target_op"], color="gray", ls=":", lw=1.2, label="matched OP")
    ax.axhline(data["general_before"], color="k", lw=0.6, alpha=0.5)
    ax.set_xlabel(f"OP (exact match, {data['split']} split)")
    ax.set_ylabel("general ability after (next-byte accuracy, held-out stdlib)")
    cfg = data["config"]
    ax.set_title(
        title
        or f"frontier over lr (mean +- sd over {len(data['seeds'])} seeds): {cfg['size']} model, "
        f"{' -> '.join(data['tasks'])}, {cfg['steps']} steps/task, ratio {cfg['ratio']:g}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "DEFAULT_METHODS",
    "LRS",
    "PARETO_METHODS",
    "SEEDS",
    "at_op",
    "format_summary",
    "frontier",
    "plot_pareto",
    "run_pareto",
    "summarize",
]
