"""The fixed per-call cost of ``SparseAdamW.step()``: a step on one tiny tensor.

With a few entries the update itself costs next to nothing, so the time of one call is
what every step pays whatever the model's size: torch's ``Optimizer.step`` wrapper
(hooks, profiler record, ``no_grad``), the optimizer's own Python (state, lists, the
step counters, the index and range checks) and the dispatch to a backend kernel.  The
same run times, on the same tensor:

=================  ===============================================================
row                what is timed (one call)
=================  ===============================================================
``wrapper``        an ``Optimizer`` whose ``step`` does nothing, decorated like
                   AdamW's: torch's fixed cost alone
``adamw``          ``torch.optim.AdamW(foreach=False)`` (torch's single-tensor path)
``adamw_fused``    ``torch.optim.AdamW(fused=True)``
``sparse_dense``   ``SparseAdamW(mask=None)``
``sparse_masked``  ``SparseAdamW(mask={p: 4 indices})``
``functional``     ``piece_optim.functional.sparse_adamw`` on the masked tensors:
                   the optimizer's work without the class
=================  ===============================================================

Each row is ``--samples`` samples of ``--calls`` back-to-back calls (per-call time = the
sample's time / calls); it reports the minimum and the median of the samples in
microseconds and the ratio of its median to ``adamw``'s, measured in the same run.  The
rows are interleaved sample by sample, so a burst of load on a shared machine hits them
alike.  It imports nothing but ``piece_optim`` and torch, so one copy of this file times
any checkout: ``PYTHONPATH=/path/to/other/checkout python benchmarks/step_overhead.py``.

Run: ``python benchmarks/step_overhead.py [--numel 64] [--calls 2000] [--samples 15]
[--backend auto] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

import piece_optim as po
from piece_optim import functional as F


class _NoopOptimizer(Optimizer):
    """torch's step wrapper around nothing: the baseline's fixed cost alone."""

    def __init__(self, params) -> None:  # noqa: ANN001
        super().__init__(params, dict(lr=1e-3, differentiable=False))

    @_use_grad_for_differentiable
    def step(self, closure=None):  # noqa: ANN001, ANN201
        return None


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def run(numel: int, calls: int, samples: int, backend: str) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    params = {
        name: torch.nn.Parameter(torch.randn(numel))
        for name in ("wrapper", "adamw", "adamw_fused", "sparse_dense", "sparse_masked")
    }
    for p in params.values():
        p.grad = torch.randn(numel)
    idx = torch.tensor([1, 5, 17, numel - 1], dtype=torch.int32)
    hp = dict(lr=1e-3, weight_decay=1e-2)
    opts: dict[str, Callable[[], object]] = {
        "wrapper": _NoopOptimizer([params["wrapper"]]).step,
        "adamw": torch.optim.AdamW([params["adamw"]], foreach=False, **hp).step,
        "adamw_fused": torch.optim.AdamW([params["adamw_fused"]], fused=True, **hp).step,
        "sparse_dense": po.SparseAdamW([params["sparse_dense"]], backend=backend, **hp).step,
    }
    masked = po.SparseAdamW(
        [params["sparse_masked"]], mask={params["sparse_masked"]: idx}, backend=backend, **hp
    )
    opts["sparse_masked"] = masked.step
    masked.step()  # state exists from here on
    p = params["sparse_masked"]
    st = masked.state[p]
    lists = ([p], [p.grad], [st["idx"]], [st["exp_avg"]], [st["exp_avg_sq"]], [None], [st["step"]])

    def functional() -> None:
        F.sparse_adamw(
            *lists, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, backend=backend
        )

    opts["functional"] = functional
    for fn in opts.values():  # warm-up: state, caches, the extension
        _per_call_us(fn, max(10, calls // 10))
    got: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(samples):
        for name, fn in opts.items():
            got[name].append(_per_call_us(fn, calls))
    base = statistics.median(got["adamw"])
    return {
        name: {
            "min_us": min(xs),
            "median_us": statistics.median(xs),
            "vs_adamw": statistics.median(xs) / base,
        }
        for name, xs in got.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    a = ap.parse_args(argv)
    if a.numel < 18:
        ap.error("--numel must be >= 18 (the mask uses index 17)")
    torch.set_num_threads(a.threads)
    rows = run(a.numel, a.calls, a.samples, a.backend)
    where = os.path.dirname(os.path.dirname(os.path.abspath(po.__file__)))
    if a.json:
        print(json.dumps({"piece_optim": where, "rows": rows}))
        return 0
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {a.threads} thread(s), piece_optim from {where}, "
        f"numel {a.numel}, {a.samples} x {a.calls} calls"
    )
    for name, r in rows.items():
        print(
            f"{name:14s} min {r['min_us']:7.2f} us  median {r['median_us']:7.2f} us  "
            f"{r['vs_adamw']:5.2f}x adamw"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
