"""The GPU headline benchmarks (issue 17): selection, the sparse step, fine-tuning memory.

Each phase is a subcommand that appends harness rows (CSV with provenance: GPU, torch,
triton, commit, UTC date; driver and CUDA versions in ``extra``) to ``OUT/bench.csv``;
``table`` prints the Markdown tables of those rows.  ``benchmarks/gpu_check.sh`` runs
them in this order, each in its own process under its own timeout.

``select`` (per N in ``--sizes``, accumulators fp32 and bf16, each GPU backend):
  ``gpu_copy``          ``dst.copy_(src)`` on N fp32: the bandwidth ceiling of this run.
  ``gpu_accumulate``    the backend's ``accumulate_many_`` (one calibration term into
                        sum g, sum g^2): N x (grad + 2 x read/write sum) bytes; baseline
                        torch eager ``add_`` + ``addcmul_`` on the same tensors.
  ``gpu_select``        exact global top-k (k = 0.1% of N) of the PIECE-S scores from the
                        sums (two histogram passes + compaction, scores never stored):
                        3 passes x (sum g + sum g^2) bytes; baseline ``torch.topk`` on the
                        same scores, already computed (``extra``: score + topk).  The
                        selection is checked against topk's k-th value (``extra.check``).
  ``gpu_collect`` /     the same through ``ImportanceEstimator.collect()`` and
  ``gpu_est_select``    ``.select(ratio=1e-3)`` on one N-entry parameter: what a user
                        runs (bf16 sums rounded stochastically by the backend's kernel),
                        against the same baselines.
``step`` (N = the largest size, k = 0.1% of N, params fp32 and bf16):
  ``gpu_step``          the backend's sparse ``adamw_step_many_`` on k sorted random indices;
  ``gpu_opt_step``      ``SparseAdamW.step()`` (the optimizer, Python included);
                        baseline ``torch.optim.AdamW(fused=True)`` on the dense N param.
``memory`` (a ~1.1B-parameter LLaMA from a ``LlamaConfig``, bf16, random weights and
tokens, no download; a fresh model per phase; ``torch.cuda.max_memory_allocated`` reset
after the model is built):
  ``adamw``             ``torch.optim.AdamW(fused=True)``: state in the params' bf16,
                        the leanest AdamW torch offers (no fp32 master): a conservative
                        baseline for our ratio;
  ``estimate``          ``ImportanceEstimator(in_backward=True, accum_dtype=bf16)``,
                        then ``select(ratio=1e-3)``, per backend;
  ``sparse``            ``SparseAdamW(sparse_grads=True)`` on that mask, fp32 master of
                        the selected entries, ``clip_grad_norm_(1.0)``, per backend.

Timing: CUDA events per call (:func:`benchmarks.harness.time_device`), warm-up calls
first (they include Triton's one-off compilation), median and IQR.  ``--tiny`` shrinks
everything to toy sizes so the code paths run on a CPU (with ``TRITON_INTERPRET=1`` the
Triton kernels run in the interpreter): for ``gpu_check.sh --dry-run``; its numbers mean
nothing.

Run: ``python -m benchmarks.gpu select|step|memory|table --device cuda --out DIR``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import piece_optim as po
from piece_optim import functional as F
from piece_optim.backends import get_backend
from piece_optim.backends import reference as ref

from .harness import Timing, append_rows, iqr, make_row, median, provenance, read_rows, time_device

RATIO = 1e-3
SIZES = (100_000_000, 1_000_000_000)
TINY_SIZE = 4099
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
# ~1.1B parameters (TinyLlama-1.1B's shape): 2 x 65.5M embedding/head + 22 x 44M blocks.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
LLAMA_TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=16,
    tie_word_embeddings=False,
)
BATCH, SEQ = 4, 512  # 2048 tokens per step
MIB = 1024.0**2


# -- common ----------------------------------------------------------------------------
def gpu_info(device: torch.device) -> dict[str, str]:
    """Driver, CUDA and compute capability (extra provenance for every row)."""
    if device.type != "cuda":
        return {"driver": "none", "cuda": str(torch.version.cuda)}
    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.split("\n")[0]
            .strip()
        )
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    cc = torch.cuda.get_device_capability(device)
    return {"driver": driver, "cuda": str(torch.version.cuda), "cc": f"{cc[0]}.{cc[1]}"}


def backends_for(device: torch.device) -> list[str]:
    """The kernel backends to benchmark: ``PIECE_OPTIM_BACKEND`` if set, else every one
    that runs on ``device`` except the pure-torch reference (the baselines are torch's
    own ops).  On a CPU (dry run) the reference stands in when nothing else runs."""
    names = po.available_backends(device)
    env = os.environ.get("PIECE_OPTIM_BACKEND", "").strip().lower()
    if env and env != "auto":
        return [env] if env in names else []
    kernels = [b for b in names if b != "torch"]
    return kernels or ["torch"]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _say(msg: str) -> None:
    print(msg, flush=True)


def _profile(what: str, fn: Callable[[], Any], device: torch.device) -> None:
    """Print where one call's GPU time goes (the top kernels and ops), into the log: the
    selection figures are read against this breakdown."""
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: allocations and Triton compilation stay out of the profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    _say(f"profile of {what}:")
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
    )
    _say(table)


class Rows:
    """Rows of one phase, appended to the CSV as they come (a timeout keeps what ran)."""

    def __init__(self, out: Path, device: torch.device) -> None:
        self.csv = out / "bench.csv"
        self.device = device
        self.prov = provenance(device)
        self.info = gpu_info(device)
        self.count = 0

    def add(self, benchmark: str, backend: str, timing: Timing, **kw: Any) -> dict[str, Any]:
        row = make_row(benchmark, backend, timing, prov=self.prov, **self.info, **kw)
        append_rows(self.csv, [row])
        self.count += 1
        speed = f" {row['speedup']:.3g}x vs {row['baseline']}" if row["speedup"] != "" else ""
        frac = f" {row['frac_of_copy']:.1%} of copy" if row["frac_of_copy"] != "" else ""
        _say(
            f"  {benchmark:<15} {backend:<18} n={kw.get('n', '')} {kw.get('dtype', '')} "
            f"{timing.median_ms:.4g} ms{frac}{speed}"
        )
        return row


def _timer(device: torch.device, tiny: bool) -> Callable[..., Timing]:
    def timed(fn: Callable[[], Any], *, slow: bool = False, setup=None) -> Timing:  # noqa: ANN001
        if tiny:
            return time_device(fn, warmup=1, repeats=1, device=device, setup=setup, min_time_s=0.0)
        # slow calls (>= ~50 ms: topk, the estimator paths at 1e9): 1 warm-up, 3 samples
        return time_device(
            fn,
            warmup=1 if slow else 3,
            repeats=3 if slow else 10,
            device=device,
            setup=setup,
            min_time_s=0.0 if slow else 0.2,
        )

    return timed


# -- select ----------------------------------------------------------------------------
def _one_param(n: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    mod = torch.nn.Module()
    mod.w = torch.nn.Parameter(torch.empty(n, dtype=dtype, device=device).normal_())
    return mod


def run_select(sizes: Sequence[int], device: torch.device, out: Path, tiny: bool) -> int:
    rows = Rows(out, device)
    timed = _timer(device, tiny)
    names = backends_for(device)
    _say(f"select: sizes {list(sizes)}, backends {names}, device {device}")
    for n in sizes:
        k = max(1, int(RATIO * n))
        gen = torch.Generator(device=device).manual_seed(n)
        src = torch.randn(n, device=device, generator=gen)
        dst = torch.empty_like(src)
        t = timed(lambda src=src, dst=dst: dst.copy_(src))
        copy_gbps = 8 * n / (t.median_ms * 1e-3) / 1e9
        rows.add("gpu_copy", "torch", t, n=n, bytes_moved=8 * n, copy_gbps=copy_gbps, dtype="fp32")
        del src, dst
        for dname, dt in DTYPES.items():
            es = torch.tensor([], dtype=dt).element_size()
            g = torch.randn(n, device=device, generator=gen).to(dt)
            s1 = torch.randn(n, device=device, generator=gen).to(dt)
            s2 = torch.rand(n, device=device, generator=gen).add_(s1.float().square()).to(dt)
            acc_bytes = n * 5 * es  # read g, read + write sum_g and sum_g2
            a1, a2 = s1.clone(), s2.clone()
            base_acc = timed(lambda a1=a1, a2=a2, g=g: (a1.add_(g), a2.addcmul_(g, g)))
            scores = ref.score(s1, s2, "piece-s", 1.0)
            base_topk = timed(lambda sc=scores, k=k: torch.topk(sc, k, sorted=False), slow=True)
            kth = float(torch.topk(scores, k, sorted=False).values.min())
            del scores
            _free(device)
            base_score_topk = timed(
                lambda s1=s1, s2=s2, k=k: torch.topk(
                    ref.score(s1, s2, "piece-s", 1.0), k, sorted=False
                ),
                slow=True,
            )
            common = dict(n=n, dtype=dname, copy_gbps=copy_gbps)
            for name in names:
                be = get_backend(name, device)
                a1.copy_(s1)
                a2.copy_(s2)
                t = timed(lambda be=be, a1=a1, a2=a2, g=g: be.accumulate_many_([g], [a1], [a2]))
                rows.add(
                    "gpu_accumulate",
                    name,
                    t,
                    baseline="torch add_+addcmul_",
                    baseline_timing=base_acc,
                    bytes_moved=acc_bytes,
                    **common,
                )
                src = [F.ScoreSource(s1, s2, n, torch.int64 if n >= 2**31 else torch.int32, be)]
                t = timed(lambda src=src, k=k: F.global_topk(src, k, "piece-s", 1.0), slow=not tiny)
                (idx,) = F.global_topk(src, k, "piece-s", 1.0)
                picked = ref.score(s1[idx.long()], s2[idx.long()], "piece-s", 1.0)
                check = (
                    "ok"
                    if idx.numel() == k and float(picked.min()) == kth
                    else (
                        f"MISMATCH: {idx.numel()} selected, min {float(picked.min())!r} vs topk "
                        f"{kth!r}"
                    )
                )
                del idx, picked
                if n == sizes[0] and dname == "fp32":
                    _profile(
                        f"global_topk, {name}, n={n}, fp32",
                        lambda src=src, k=k: F.global_topk(src, k, "piece-s", 1.0),
                        device,
                    )
                rows.add(
                    "gpu_select",
                    name,
                    t,
                    k=k,
                    ratio=RATIO,
                    baseline="torch.topk(scores)",
                    baseline_timing=base_topk,
                    bytes_moved=3 * 2 * es * n + 4 * k,
                    score_topk_ms=base_score_topk.median_ms,
                    check=check,
                    **common,
                )
                _free(device)
                # the estimator's own path, on one N-entry parameter
                mod = _one_param(n, dt, device)
                est = po.ImportanceEstimator(
                    mod, method="piece-s", exclude=(), accum_dtype=dt, backend=name
                )
                path = (
                    "backend accumulate_many_, stochastic rounding"
                    if dt == torch.bfloat16
                    else "backend accumulate_many_"
                )

                def give_grad(mod=mod, g=g) -> None:
                    mod.w.grad = g

                t = timed(est.collect, setup=give_grad, slow=not tiny)
                rows.add(
                    "gpu_collect",
                    name,
                    t,
                    baseline="torch add_+addcmul_",
                    baseline_timing=base_acc,
                    bytes_moved=acc_bytes,
                    path=path,
                    **common,
                )
                t = timed(lambda est=est: est.select(ratio=RATIO), slow=not tiny)
                if n == sizes[0] and dname == "fp32":
                    _profile(
                        f"ImportanceEstimator.select, {name}, n={n}, fp32",
                        lambda est=est: est.select(ratio=RATIO),
                        device,
                    )
                rows.add(
                    "gpu_est_select",
                    name,
                    t,
                    k=k,
                    ratio=RATIO,
                    baseline="torch.topk(scores)",
                    baseline_timing=base_topk,
                    bytes_moved=3 * 2 * es * n + 4 * k,
                    note="baseline timed on the gpu_select row's scores",
                    **common,
                )
                est.close()
                del est, mod
                _free(device)
            del g, s1, s2, a1, a2
            _free(device)
    return rows.count


# -- step ------------------------------------------------------------------------------
def _step_bytes(k: int, ps: int, master: bool) -> int:
    """Bytes a sparse step must move: read p, g, idx (int32), m, v (+ master); write p,
    m, v (+ master)."""
    return k * (ps + ps + 4 + 8 + 8 + (8 if master else 0))


def run_step(n: int, device: torch.device, out: Path, tiny: bool) -> int:
    rows = Rows(out, device)
    timed = _timer(device, tiny)
    names = backends_for(device)
    k_target = max(1, int(RATIO * n))
    _say(f"step: n={n}, k~{k_target}, backends {names}, device {device}")
    gen = torch.Generator(device=device).manual_seed(7)
    # k sorted unique random indices: randint + unique (a 1e9 randperm would need 8 GB)
    idx = torch.randint(0, n, (k_target + k_target // 100 + 8,), device=device, generator=gen)
    idx = idx.unique()[:k_target].to(torch.int32)
    k = idx.numel()
    for dname, dt in DTYPES.items():
        ps = torch.tensor([], dtype=dt).element_size()
        master = dt != torch.float32
        p = torch.nn.Parameter(torch.randn(n, device=device, generator=gen).to(dt))
        p.grad = torch.randn(n, device=device, generator=gen).to(dt)
        dense = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2, fused=True)
        dense.step()  # allocates the state
        base = timed(dense.step)
        dense_bytes = n * (ps * 3 + ps * 2 * 2)  # read p, g, m, v; write p, m, v (state: p's dtype)
        rows.add(
            "gpu_dense_adamw",
            "torch.optim.AdamW(fused)",
            base,
            n=n,
            dtype=dname,
            bytes_moved=dense_bytes,
        )
        del dense
        p.grad = None
        _free(device)
        grad = torch.randn(n, device=device, generator=gen).to(dt)
        for name in names:
            be = get_backend(name, device)
            m = torch.randn(k, device=device, generator=gen).mul_(1e-3)
            v = torch.rand(k, device=device, generator=gen).mul_(1e-6)
            w = p.detach()[idx.long()].float() if master else None
            sc = F.adamw_scalars(**_HP, step=10)
            t = timed(
                lambda be=be, p=p, grad=grad, m=m, v=v, w=w, sc=sc: be.adamw_step_many_(
                    [p.data], [grad], [idx], [m], [v], [w], [sc]
                )
            )
            rows.add(
                "gpu_step",
                name,
                t,
                n=n,
                k=k,
                ratio=k / n,
                dtype=dname,
                baseline="torch.optim.AdamW(fused, dense N)",
                baseline_timing=base,
                bytes_moved=_step_bytes(k, ps, master),
            )
            del m, v, w
            opt = po.SparseAdamW(
                [("w", p)], mask={"w": idx}, lr=1e-3, weight_decay=1e-2, backend=name
            )

            def give_grad(p=p, grad=grad) -> None:
                p.grad = grad

            t = timed(opt.step, setup=give_grad)
            rows.add(
                "gpu_opt_step",
                name,
                t,
                n=n,
                k=k,
                ratio=k / n,
                dtype=dname,
                baseline="torch.optim.AdamW(fused, dense N)",
                baseline_timing=base,
                bytes_moved=_step_bytes(k, ps, master),
                state_mib=opt.state_bytes() / MIB,
            )
            p.grad = None
            del opt
            _free(device)
        del p, grad
        _free(device)
    return rows.count


# -- memory ----------------------------------------------------------------------------
def _build_llama(cfg: dict, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
    finally:
        torch.set_default_dtype(old)
    model.train()
    return model


def _mem(device: torch.device) -> tuple[float, float]:
    """(allocated now, peak since the last reset), in MiB; zeros off CUDA."""
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.memory_allocated(device) / MIB, torch.cuda.max_memory_allocated(device) / MIB


def _memory_phase(
    phase: str,
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    steps: int,
    masks: dict[str, po.SparseMask],
    device: torch.device,
    times: list[float],
) -> dict[str, Any]:
    """Run one phase's steps; everything it builds (optimizer, estimator, the closures that
    hold them) is freed when it returns.  (Before, the closures of one phase outlived it and
    the AdamW state, 4.1 GiB at 1.1B, was counted as the weights of every later phase.)"""
    extra: dict[str, Any] = {}

    def clock(fn: Callable[[], None]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)

    if phase == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True
        )

        def step() -> None:
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(steps):
            clock(step)
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        extra["state_mib"] = sum(t.numel() * t.element_size() for t in state) / MIB
    elif phase == "estimate":
        est = po.ImportanceEstimator(
            model, method="piece-s", in_backward=True, accum_dtype=torch.bfloat16, backend=name
        )
        try:
            for _ in range(steps):
                clock(lambda: model(input_ids=x, labels=x).loss.backward())
            t0 = time.perf_counter()
            masks[name] = est.select(ratio=RATIO)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            extra["select_ms"] = (time.perf_counter() - t0) * 1e3
            extra["k"] = masks[name].numel_selected()
            extra["state_mib"] = est.state_bytes() / MIB
        finally:
            est.close()
    else:
        sopt = po.SparseAdamW(
            model.named_parameters(),
            mask=masks.pop(name),
            lr=1e-5,
            betas=(0.9, 0.95),
            weight_decay=0.0,
            sparse_grads=True,
            backend=name,
        )

        def sstep() -> None:
            model(input_ids=x, labels=x).loss.backward()
            sopt.clip_grad_norm_(1.0)
            sopt.step()
            sopt.zero_grad()

        try:
            for _ in range(steps):
                clock(sstep)
            extra["state_mib"] = sopt.state_bytes() / MIB
        finally:
            sopt.close()
    return extra


def run_memory(device: torch.device, out: Path, tiny: bool, steps: int = 3) -> int:
    rows = Rows(out, device)
    names = backends_for(device)
    cfg = LLAMA_TINY if tiny else LLAMA_1B
    batch, seq = (1, 8) if tiny else (BATCH, SEQ)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=gen).to(device)
    _say(f"memory: LLaMA {cfg}, batch {batch}x{seq}, {steps} steps, backends {names}")
    adamw_peak: float | None = None
    phases = [("adamw", "torch.optim.AdamW(fused)")]
    for name in names:
        phases += [("estimate", name), ("sparse", name)]
    masks: dict[str, po.SparseMask] = {}
    for phase, name in phases:
        if phase == "sparse" and name not in masks:
            _say(f"  (skipping sparse/{name}: its estimate phase gave no mask)")
            continue
        _free(device)
        # what an earlier phase left allocated (the token batch, the masks): near 0, or the
        # peaks below are not this phase's alone
        leftover, _ = _mem(device)
        model = _build_llama(cfg, device)
        n_params = sum(p.numel() for p in model.parameters())
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base, _ = _mem(device)
        times: list[float] = []
        try:
            extra = _memory_phase(phase, name, model, x, steps, masks, device, times)
        except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next phase
            _say(f"  FAILED {phase}/{name}: {type(exc).__name__}: {exc}")
            extra = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        extra["leftover_mib"] = round(leftover, 1)
        _, peak = _mem(device)
        del model
        steady = times[1:] or times or [0.0]  # the first step compiles and allocates
        timing = Timing(median(steady), iqr(steady), tuple(times))
        if phase == "adamw" and "error" not in extra:
            adamw_peak = peak
        if adamw_peak and peak:
            extra["peak_vs_adamw"] = peak / adamw_peak
        rows.add(
            "gpu_memory",
            name,
            timing,
            n=n_params,
            phase=phase,
            peak_mem_mib=peak,
            dtype="bf16",
            weights_mib=base,
            growth_mib=peak - base,
            steps=steps,
            tokens=batch * seq,
            throughput=batch * seq / (timing.median_ms * 1e-3) if timing.median_ms else "",
            throughput_unit="tokens/s",
            **extra,
        )
    return rows.count


# -- table -----------------------------------------------------------------------------
def _x(r: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(r.get("extra") or "{}")
    except json.JSONDecodeError:
        return {}


def _g(v: Any, fmt: str = ".3g") -> str:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return "-"


def _n(n: str) -> str:
    """1e+09 -> "1e9"; other sizes with thousands separators."""
    v = int(n)
    e = len(str(v)) - 1
    return f"1e{e}" if v == 10**e else f"{v:,}"


def table(rows: Sequence[dict[str, str]]) -> str:
    """Markdown tables of the ``gpu_*`` rows (the last run's: the latest timestamp wins)."""
    rows = [r for r in rows if r["benchmark"].startswith("gpu_")]
    if not rows:
        return "(no GPU benchmark rows)"
    first = rows[0]
    x0 = _x(first)
    out = [
        f"GPU: {first['device']}, driver {x0.get('driver', '?')}, CUDA {x0.get('cuda', '?')}, "
        f"torch {first['torch']}, triton {first['triton']}, commit {first['commit']}, "
        f"{first['timestamp'][:10]}."
    ]

    def pick(bench: str, backend: str, n: str, dtype: str) -> dict[str, str] | None:
        hit = [
            r
            for r in rows
            if r["benchmark"] == bench
            and r["backend"] == backend
            and r["n"] == n
            and _x(r).get("dtype") == dtype
        ]
        return hit[-1] if hit else None

    sel = [r for r in rows if r["benchmark"] == "gpu_select"]
    if sel:
        out += [
            "",
            "Importance: accumulate one term, then the exact top 0.1% (PIECE-S).",
            "",
            "| N | sums | backend | accumulate GB/s (of copy) | select ms | torch.topk ms "
            "| select vs topk | select GB/s (of copy) | estimator collect ms | estimator "
            "select ms (vs topk) | check |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in sel:
            d = _x(r).get("dtype", "")
            acc = pick("gpu_accumulate", r["backend"], r["n"], d) or {}
            col = pick("gpu_collect", r["backend"], r["n"], d) or {}
            es = pick("gpu_est_select", r["backend"], r["n"], d) or {}
            out.append(
                f"| {_n(r['n'])} | {d} | {r['backend']} | {_g(acc.get('gbps'), '.0f')} "
                f"({_g(acc.get('frac_of_copy'), '.0%')}) | {_g(r['time_ms'])} | "
                f"{_g(r['baseline_ms'])} | {_g(r['speedup'], '.1f')}x | {_g(r['gbps'], '.0f')} "
                f"({_g(r['frac_of_copy'], '.0%')}) | {_g(col.get('time_ms'))} | "
                f"{_g(es.get('time_ms'))} ({_g(es.get('speedup'), '.1f')}x) | "
                f"{_x(r).get('check', '-')} |"
            )
        cp = [r for r in rows if r["benchmark"] == "gpu_copy"]
        out.append("")
        out.append(
            "Copy bandwidth (read + write) in the same run: "
            + ", ".join(f"{_g(r['gbps'], '.0f')} GB/s at N={_n(r['n'])}" for r in cp)
            + "."
        )
    st = [r for r in rows if r["benchmark"] in ("gpu_step", "gpu_opt_step")]
    if st:
        out += [
            "",
            "Sparse AdamW step, k = 0.1% of N, against dense `torch.optim.AdamW(fused=True)` on N.",
            "",
            "| N | params | backend | kernel ms | SparseAdamW.step ms | dense fused AdamW ms "
            "| speedup kernel / optimizer | kernel GB/s |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in [r for r in st if r["benchmark"] == "gpu_step"]:
            d = _x(r).get("dtype", "")
            o = pick("gpu_opt_step", r["backend"], r["n"], d) or {}
            out.append(
                f"| {_n(r['n'])} | {d} | {r['backend']} | {_g(r['time_ms'])} | "
                f"{_g(o.get('time_ms'))} | {_g(r['baseline_ms'])} | {_g(r['speedup'], '.0f')}x "
                f"/ {_g(o.get('speedup'), '.0f')}x | {_g(r['gbps'], '.0f')} |"
            )
    mem = [r for r in rows if r["benchmark"] == "gpu_memory"]
    if mem:
        m0 = _x(mem[0])
        out += [
            "",
            f"Fine-tuning memory: {int(mem[0]['n']) / 1e9:.2f}B-param LLaMA, bf16, "
            f"batch {m0.get('tokens', '?')} tokens, peak `torch.cuda.max_memory_allocated` "
            "(weights included).",
            "",
            "| phase | backend | peak GiB | vs AdamW | weights GiB | state MiB | ms/step |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in mem:
            x = _x(r)
            err = f" (error: {x['error'][:60]})" if "error" in x else ""
            out.append(
                f"| {r['phase']}{err} | {r['backend']} | {_g(float(r['peak_mem_mib'] or 0) / 1024)}"
                f" | {_g(x.get('peak_vs_adamw'), '.2f')} | {_g(x.get('weights_mib', 0) / 1024)} | "
                f"{_g(x.get('state_mib'), '.4g')} | {_g(r['time_ms'], '.4g')} |"
            )
    return "\n".join(out)


def _latest_run(rows: list[dict[str, str]], since: str | None) -> list[dict[str, str]]:
    return [r for r in rows if since is None or r["timestamp"] >= since]


# -- CLI -------------------------------------------------------------------------------
def _size(text: str) -> int:
    v = float(text)
    if v < 1 or v != int(v):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive integer (e.g. 1e9)")
    return int(v)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("select", "step", "memory", "table"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu"))
    ap.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=list(SIZES),
        help="N for select; the largest is step's N (default 1e8 1e9)",
    )
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the dry run on a CPU")
    ap.add_argument("--since", help="table: only rows with timestamp >= this (ISO, UTC)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.phase == "table":
        csv_path = out / "bench.csv"
        if not csv_path.exists():
            print(f"(no {csv_path})")
            return 1
        print(table(_latest_run(read_rows(csv_path), args.since)))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if not backends_for(device):
        print(
            f"benchmarks.gpu: no backend runs on {device} under PIECE_OPTIM_BACKEND="
            f"{os.environ.get('PIECE_OPTIM_BACKEND')!r}",
            file=sys.stderr,
        )
        return 2
    sizes = [TINY_SIZE] if args.tiny else sorted(args.sizes)
    t0 = time.perf_counter()
    if args.phase == "select":
        n = run_select(sizes, device, out, args.tiny)
    elif args.phase == "step":
        n = run_step(sizes[-1], device, out, args.tiny)
    else:
        n = run_memory(device, out, args.tiny, steps=2 if args.tiny else 3)
    print(f"{args.phase}: {n} rows in {time.perf_counter() - t0:.0f} s -> {out / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
