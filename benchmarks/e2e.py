"""End-to-end benchmarks: training-step throughput on a small LLaMA, and peak memory.

Throughput: one training step (forward, backward, optimizer step, zero_grad) of a
``LlamaForCausalLM`` built from a ``transformers.LlamaConfig`` (random weights, random
tokens: no download), timed with ``torch.optim.AdamW`` (foreach, torch's default) and
with PIECE ``SparseAdamW`` on the global top ``ratio`` (default 1e-3) of PIECE-S scores,
once per available backend.  Rows report ``time_ms`` per step and ``throughput`` in
tokens/s, with AdamW as the baseline of the same run.  The mask is selected once before
timing (selection is a one-off cost, benchmarked in ``micro.py``).

Memory: ``benchmarks/memory.py`` (when present) provides ``run(quick) -> list[dict]``;
its rows are folded into the same CSV (unknown keys kept in the ``extra`` column).

Run: ``python -m benchmarks.e2e [--quick] [--device cuda] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import piece_optim as po
from piece_optim.backends import get_backend

from .harness import append_rows, make_row, normalize_row, provenance, time_fn
from .micro import backends_to_run


@dataclass(frozen=True)
class ModelSize:
    """A LLaMA shape and the batch it trains on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    batch: int
    seq: int


# ~4.3M params (1M of them in embed/lm_head), 4 x 128 tokens: ~0.5 s/step on 1 core here.
FULL = ModelSize(vocab=2048, hidden=256, intermediate=688, layers=4, heads=4, batch=4, seq=128)
QUICK = ModelSize(vocab=512, hidden=128, intermediate=344, layers=2, heads=4, batch=2, seq=64)
TINY = ModelSize(vocab=64, hidden=32, intermediate=64, layers=1, heads=2, batch=1, seq=8)


def build_model(size: ModelSize, device: torch.device | str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``size`` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(size.seq, 16),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def throughput_rows(
    size: ModelSize = FULL,
    *,
    ratio: float = 1e-3,
    device: torch.device | str = "cpu",
    backends: Sequence[str] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Training-step rows: AdamW, then SparseAdamW per backend (see the module doc)."""
    device = torch.device(device)
    tick = progress or (lambda _label: None)
    prov = provenance(device)
    names = list(backends) if backends is not None else backends_to_run(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, size.vocab, (size.batch, size.seq), generator=gen).to(device)
    tokens = size.batch * size.seq
    kw = dict(warmup=warmup, repeats=repeats, device=device, min_time_s=0.0)
    shape = dict(size.__dict__)

    model = build_model(size, device)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base = time_fn(lambda: _train_step(model, opt, x), **kw)
    rows = [
        make_row(
            "e2e_train_step",
            "torch.optim.AdamW",
            base,
            prov=prov,
            n=n,
            throughput=tokens / (base.median_ms * 1e-3),
            throughput_unit="tokens/s",
            model=shape,
        )
    ]
    tick("e2e AdamW")
    del opt

    for name in names:
        model = build_model(size, device)
        est = po.ImportanceEstimator(model, method="piece-s", backend=name)
        model(input_ids=x, labels=x).loss.backward()
        est.collect()
        mask = est.select(ratio=ratio)
        est.close()
        model.zero_grad(set_to_none=True)
        opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-4, backend=name)
        t = time_fn(lambda opt=opt, model=model: _train_step(model, opt, x), **kw)
        rows.append(
            make_row(
                "e2e_train_step",
                get_backend(name, device).name,
                t,
                prov=prov,
                n=n,
                k=mask.numel_selected(),
                ratio=ratio,
                baseline="torch.optim.AdamW(foreach)",
                baseline_timing=base,
                throughput=tokens / (t.median_ms * 1e-3),
                throughput_unit="tokens/s",
                model=shape,
            )
        )
        tick(f"e2e SparseAdamW {name}")
    return rows


def memory_rows(quick: bool, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Rows of ``benchmarks/memory.py``'s ``run(quick)``, or none (with a note) if absent."""
    try:
        memory = importlib.import_module(f"{__package__}.memory")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"{__package__}.memory", __package__):
            raise
        print("note: benchmarks/memory.py is not in this tree; skipping the memory rows")
        return []
    if not callable(getattr(memory, "run", None)):
        print("note: benchmarks/memory.py has no run(quick); skipping the memory rows")
        return []
    prov = provenance(device)
    rows = []
    for r in memory.run(quick):
        r = dict(r)
        # memory.py names its rows with "bench" and reports "peak_growth_mib" (VmHWM growth)
        r.setdefault("benchmark", r.get("bench") or "memory")
        if "peak_growth_mib" in r and "peak_mem_mib" not in r:
            r["peak_mem_mib"] = r["peak_growth_mib"]
        rows.append(normalize_row(r, prov))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="piece_optim end-to-end benchmarks (CSV rows)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ratio", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory rows")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    rows = throughput_rows(
        QUICK if args.quick else FULL, ratio=args.ratio, device=args.device, repeats=args.repeats
    )
    if not args.no_memory:
        rows += memory_rows(args.quick, args.device)
    path = Path(args.out) / "bench.csv"
    append_rows(path, rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
