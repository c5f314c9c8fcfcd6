"""The learning-rate grid: one lr per method family, picked on validation data.

Families: ``full`` (seqft), ``lora`` (seqlora), ``sparse`` (random, piece-f, piece-s share
one lr, tuned on piece-s).  Each lr of a family's grid runs the whole task sequence and
is scored on the *validation* splits (task validation prompts, validation stdlib files),
never on the test data the demo reports.

Selection criterion, the same for every family: maximise ``OP_val + general_after_val /
general_before_val`` (task performance plus the fraction of general ability kept, both
in [0, 1]).  Choosing by OP alone would reward whichever lr overwrites the model
fastest, which is not what a practitioner who cares about the base model would pick;
giving both terms equal weight and applying the rule to every family keeps the
comparison fair.  One guard, also the same for every family: an lr whose ``OP_val`` is
below half the family's best ``OP_val`` is not eligible.  Without it the first grid run
picked sparse lr 1e-3, at which PIECE-S learned none of the tasks (OP 0) and so kept
the most general ability; "learns nothing" is not a setting anyone would deploy.  The
defaults in :func:`piece_optim.demo.methods.preset` come from
``piece-optim demo --tune`` (the grid is reported in the README's demo section).
"""

from __future__ import annotations

from .methods import DemoConfig, run_method, setup
from .model import next_token_accuracy

GRID: dict[str, tuple[float, ...]] = {
    "full": (3e-5, 1e-4, 3e-4),
    "lora": (1e-3, 3e-3, 1e-2),
    "sparse": (1e-3, 3e-3, 1e-2),
}
FAMILY_METHOD = {"full": "seqft", "lora": "seqlora", "sparse": "piece-s"}


def criterion(op: float, general_after: float, general_before: float) -> float:
    return op + general_after / general_before


def select(scored: list[tuple[float, float, float]]) -> float:
    """``(criterion, op, lr)`` triples -> the lr with the best criterion among the eligible
    ones (``op >= 0.5 * max op``)."""
    if not scored:
        raise ValueError("scored is empty: the grid has no lr for this family")
    top = max(op for _, op, _ in scored)
    return max((c, lr) for c, op, lr in scored if op >= 0.5 * top)[1]


def run_grid(
    cfg: DemoConfig,
    methods: tuple[str, ...] | None = None,
    grid: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run the grid; returns ``{"general_before", "rows": [...], "best": {family: lr}}``."""
    grid = grid or GRID
    bench = setup(cfg, progress)
    base, tasks, windows = bench.base, bench.tasks, bench.windows
    g0 = next_token_accuracy(base, windows["val"])
    rows, best = [], {}
    for fam, lrs in grid.items():
        method = FAMILY_METHOD[fam]
        if methods is not None and method not in methods:
            continue
        scored = []
        for lr in lrs:
            r = run_method(
                method,
                base,
                tasks,
                cfg,
                windows["val"],
                split="val",
                lr=lr,
                progress=progress,
                general_text=bench.general_text,
            )
            c = criterion(r["op"], r["general_after"], g0)
            rows.append(
                {
                    "family": fam,
                    "method": method,
                    "lr": lr,
                    "op": r["op"],
                    "bwt": r["bwt"],
                    "general_after": r["general_after"],
                    "criterion": c,
                }
            )
            scored.append((c, r["op"], lr))
        best[fam] = select(scored)
    return {"general_before": g0, "rows": rows, "best": best}


def format_grid(grid: dict) -> str:
    lines = [
        f"lr grid on validation data (general before {grid['general_before']:.3f}); "
        "pick = max OP + general_after/general_before among lrs with OP >= half the best OP",
        f"{'family':7s} {'method':8s} {'lr':>7s} {'OP':>6s} {'BWT':>7s} {'general':>8s} "
        f"{'crit':>6s}",
    ]
    for r in grid["rows"]:
        mark = " <-" if grid["best"].get(r["family"]) == r["lr"] else ""
        lines.append(
            f"{r['family']:7s} {r['method']:8s} {r['lr']:7.0e} {r['op']:6.3f} "
            f"{r['bwt']:+7.3f} {r['general_after']:8.3f} {r['criterion']:6.3f}{mark}"
        )
    return "\n".join(lines)
