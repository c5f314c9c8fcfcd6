"""Micro benchmarks: each piece_optim kernel against what a user would run instead.

For every backend in ``piece_optim.available_backends(device)`` and every N / ratio:

============  =====================================================  ======================
benchmark     what is timed (k = ratio * N)                          baselines, same run
============  =====================================================  ======================
copy          ``dst.copy_(src)``, N fp32: the bandwidth floor        (none)
accumulate    ``accumulate_(grad, sum_g, sum_g2)`` on N fp32         torch eager add_ + addcmul_
step          ``adamw_step_`` on k sorted random indices of N        torch.optim.AdamW on the
              (state of length k)                                    dense N param, fused and
                                                                     foreach
select        exact global top-k from the sums (piece-s scores       score + torch.topk,
              computed on the fly: 2 histogram passes + compaction)  score + torch.kthvalue
compaction    ``compact(scores, thr, take_eq)`` -> k indices         torch.nonzero(scores >= v)
============  =====================================================  ======================

``gbps`` counts the bytes a kernel must move at least (accumulate: 20 B/element; step:
32 B per selected entry; select: 3 passes x 8 B/element; compaction: 4 B/element + 4 B per
index) and ``frac_of_copy`` divides it by the copy bandwidth measured at the same N.

Triton on CPU tensors runs in the interpreter, which is a test tool, not a speed: it is
benchmarked only when chosen explicitly with ``PIECE_OPTIM_BACKEND=triton``.  That
variable, as everywhere in piece_optim, restricts the run to the one backend it names.

Run: ``python -m benchmarks.micro [--quick] [--device cuda] [--max-n N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import piece_optim
from piece_optim import functional as F
from piece_optim.backends import get_backend
from piece_optim.backends import reference as ref

from .harness import Timing, append_rows, make_row, measure_copy, provenance, time_fn

FULL_SIZES = (1_000_000, 10_000_000, 50_000_000)
QUICK_SIZES = (1 << 17, 1 << 20)
TINY_SIZES = (4099,)  # tests: odd, fast even under the Triton interpreter
FULL_RATIOS = (1e-4, 1e-3, 1e-2)
QUICK_RATIOS = (1e-3, 1e-2)
BENCHMARKS = ("copy", "accumulate", "step", "select", "compaction")
# torch.kthvalue on CUDA selects within one thread block per slice, so on one huge slice it
# is orders of magnitude slower than topk; above this N the GPU check skips that baseline.
KTHVALUE_CUDA_MAX_N = 100_000_000
_HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
_SCALARS = F.adamw_scalars(**_HP, step=10)


def backends_to_run(device: torch.device | str) -> list[str]:
    """Available backends for ``device``, restricted by ``PIECE_OPTIM_BACKEND`` if set.

    Triton on CPU (the interpreter) only when named explicitly.
    """
    device = torch.device(device)
    names = piece_optim.available_backends(device)
    env = os.environ.get("PIECE_OPTIM_BACKEND", "").strip().lower()
    if env and env != "auto":
        return [env] if env in names else []
    if device.type == "cpu":
        names = [b for b in names if b != "triton"]
    return names


def _k_for(n: int, ratio: float) -> int:
    return max(1, int(ratio * n))


def _kth_largest(scores: torch.Tensor, k: int) -> float:
    """The k-th largest score (topk, not kthvalue: see KTHVALUE_CUDA_MAX_N)."""
    return float(torch.topk(scores, k, sorted=False).values.min().item())


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())


def _dense_adamw_timing(
    n: int, device: torch.device, kind: str, warmup: int, repeats: int
) -> Timing | None:
    """torch.optim.AdamW on one dense N-element param; None if this torch lacks ``kind``."""
    p = torch.nn.Parameter(torch.randn(n, device=device))
    p.grad = torch.randn(n, device=device)
    try:
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2, **{kind: True})
        opt.step()
    except (RuntimeError, ValueError) as exc:
        print(f"  (skipping AdamW({kind}) on {device}: {exc})")
        return None
    return time_fn(opt.step, warmup=warmup, repeats=repeats, device=device)


def _bench_n(
    n: int,
    names: Sequence[str],
    ratios: Sequence[float],
    benchmarks: Sequence[str],
    device: torch.device,
    prov: dict[str, str],
    kw: dict[str, Any],
    tick: Callable[[str], None],
) -> list[dict[str, Any]]:
    """All rows for one N (its tensors are freed when this returns)."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device=device).manual_seed(n)
    t, copy_gbps = measure_copy(n, device, repeats=kw["repeats"])
    if "copy" in benchmarks:
        rows.append(
            make_row("copy", "torch", t, prov=prov, n=n, bytes_moved=8 * n, copy_gbps=copy_gbps)
        )
        tick(f"copy n={n}")
    grad = torch.randn(n, generator=gen, device=device)
    sum_g = torch.randn(n, generator=gen, device=device)
    sum_g2 = torch.rand(n, generator=gen, device=device) + sum_g * sum_g
    scores = ref.score(sum_g, sum_g2, "piece-s", 1.0)
    perm = torch.randperm(n, generator=gen, device=device)

    base: dict[str, Timing | None] = {}
    if "accumulate" in benchmarks:
        a1, a2 = sum_g.clone(), sum_g2.clone()
        base["eager"] = time_fn(lambda: (a1.add_(grad), a2.addcmul_(grad, grad)), **kw)
    if "step" in benchmarks:
        for kind in ("fused", "foreach"):
            base[kind] = _dense_adamw_timing(n, device, kind, kw["warmup"], kw["repeats"])
    for ratio in ratios:
        k = _k_for(n, ratio)
        if "select" in benchmarks:
            base[f"topk{ratio}"] = time_fn(
                lambda k=k: torch.topk(ref.score(sum_g, sum_g2, "piece-s", 1.0), k), **kw
            )
            if device.type == "cuda" and n > KTHVALUE_CUDA_MAX_N:
                print(
                    f"  (skipping the torch.kthvalue baseline at N={n} on CUDA: it runs one "
                    "thread block per slice, far too slow for this check)"
                )
                base[f"kth{ratio}"] = None
            else:
                base[f"kth{ratio}"] = time_fn(
                    lambda k=k: torch.kthvalue(ref.score(sum_g, sum_g2, "piece-s", 1.0), n - k + 1),
                    **kw,
                )
        if "compaction" in benchmarks:
            v = _kth_largest(scores, k)
            base[f"nz{ratio}"] = time_fn(lambda v=v: torch.nonzero(scores >= v), **kw)

    for name in names:
        be = get_backend(name, device)
        if "accumulate" in benchmarks:
            a1, a2 = sum_g.clone(), sum_g2.clone()
            t = time_fn(lambda be=be, a1=a1, a2=a2: be.accumulate_many_([grad], [a1], [a2]), **kw)
            rows.append(
                make_row(
                    "accumulate",
                    name,
                    t,
                    prov=prov,
                    n=n,
                    baseline="torch eager add_+addcmul_",
                    baseline_timing=base["eager"],
                    bytes_moved=20 * n,
                    copy_gbps=copy_gbps,
                )
            )
            tick(f"accumulate {name} n={n}")
        for ratio in ratios:
            k = _k_for(n, ratio)
            if "step" in benchmarks:
                idx = perm[:k].sort().values.to(torch.int32)
                param = torch.randn(n, device=device)
                m = torch.randn(k, device=device) * 1e-3
                v = torch.rand(k, device=device) * 1e-6
                t = time_fn(
                    lambda be=be, idx=idx, param=param, m=m, v=v: be.adamw_step_many_(
                        [param], [grad], [idx], [m], [v], [None], [_SCALARS]
                    ),
                    **kw,
                )
                for kind in ("fused", "foreach"):
                    if base[kind] is None:
                        continue
                    rows.append(
                        make_row(
                            "step",
                            name,
                            t,
                            prov=prov,
                            n=n,
                            k=k,
                            ratio=ratio,
                            baseline=f"torch.optim.AdamW({kind}, dense N)",
                            baseline_timing=base[kind],
                            bytes_moved=32 * k,
                            copy_gbps=copy_gbps,
                        )
                    )
                tick(f"step {name} n={n} r={ratio}")
            if "select" in benchmarks:
                src = [F.ScoreSource(sum_g, sum_g2, n, torch.int32, be)]
                t = time_fn(lambda src=src, k=k: F.global_topk(src, k, "piece-s", 1.0), **kw)
                for key, label in (
                    (f"topk{ratio}", "score+torch.topk"),
                    (f"kth{ratio}", "score+torch.kthvalue"),
                ):
                    rows.append(
                        make_row(
                            "select",
                            name,
                            t,
                            prov=prov,
                            n=n,
                            k=k,
                            ratio=ratio,
                            baseline=label,
                            baseline_timing=base[key],
                            bytes_moved=3 * 8 * n + 4 * k,
                            copy_gbps=copy_gbps,
                        )
                    )
                tick(f"select {name} n={n} r={ratio}")
            if "compaction" in benchmarks:
                v = _kth_largest(scores, k)
                thr = _bits(v)
                above = int((scores > v).sum().item())
                take_eq = k - above
                t = time_fn(
                    lambda be=be, thr=thr, take_eq=take_eq: be.score_compact(
                        None, scores, "piece-f", 0.0, thr, take_eq, torch.int32
                    ),
                    **kw,
                )
                rows.append(
                    make_row(
                        "compaction",
                        name,
                        t,
                        prov=prov,
                        n=n,
                        k=k,
                        ratio=ratio,
                        baseline="torch.nonzero(scores >= v)",
                        baseline_timing=base[f"nz{ratio}"],
                        bytes_moved=4 * n + 4 * k,
                        copy_gbps=copy_gbps,
                    )
                )
                tick(f"compaction {name} n={n} r={ratio}")
    return rows


def run(
    *,
    sizes: Sequence[int] = FULL_SIZES,
    ratios: Sequence[float] = FULL_RATIOS,
    device: torch.device | str = "cpu",
    backends: Sequence[str] | None = None,
    benchmarks: Sequence[str] = BENCHMARKS,
    warmup: int = 2,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the micro benchmarks; returns harness rows (see the module doc).

    ``progress(label)`` is called after each measured item (a tqdm hook).
    """
    device = torch.device(device)
    unknown = set(benchmarks) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"benchmarks={sorted(unknown)} unknown; choose from {BENCHMARKS}")
    names = list(backends) if backends is not None else backends_to_run(device)
    prov = provenance(device)
    rows: list[dict[str, Any]] = []
    tick = progress or (lambda _label: None)
    kw = dict(warmup=warmup, repeats=repeats, device=device)

    for n in sizes:
        rows += _bench_n(n, names, ratios, benchmarks, device, prov, kw, tick)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def count(
    sizes: Sequence[int],
    ratios: Sequence[float],
    n_backends: int,
    benchmarks: Sequence[str] = BENCHMARKS,
) -> int:
    """How many progress ticks :func:`run` makes (for a tqdm total)."""
    per_n = int("copy" in benchmarks) + n_backends * (
        int("accumulate" in benchmarks)
        + len(ratios) * sum(b in benchmarks for b in ("step", "select", "compaction"))
    )
    return per_n * len(sizes)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="piece_optim micro benchmarks (CSV rows)")
    ap.add_argument("--quick", action="store_true", help=f"N in {QUICK_SIZES}")
    ap.add_argument("--sizes", type=int, nargs="+", help="N values (overrides --quick)")
    ap.add_argument("--max-n", type=int, help="also run N = 1e8, 1e9... up to this (GPU)")
    ap.add_argument("--ratios", type=float, nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", help="default: all available here")
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    sizes = list(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    if args.max_n:
        sizes = [s for s in sizes if s <= args.max_n]
        big = 100_000_000
        while big <= args.max_n:
            sizes.append(big)
            big *= 10
    ratios = args.ratios or (QUICK_RATIOS if args.quick else FULL_RATIOS)
    from tqdm import tqdm

    names = args.backends or backends_to_run(args.device)
    with tqdm(total=count(sizes, ratios, len(names), args.benchmarks), desc="micro") as bar:
        rows = run(
            sizes=sizes,
            ratios=ratios,
            device=args.device,
            backends=names,
            benchmarks=args.benchmarks,
            repeats=args.repeats,
            progress=lambda label: (bar.set_postfix_str(label), bar.update()),
        )
    path = Path(args.out) / "bench.csv"
    append_rows(path, rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
