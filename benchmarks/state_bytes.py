"""Optimizer-state bytes: SparseAdamW at ratio r vs torch.optim.AdamW on the same model.

Run: ``python benchmarks/state_bytes.py [--ratio 1e-3] [--dtype bf16]``.  Builds a
~10M-parameter LLaMA from a config (no download), takes one step with each optimizer
and counts the bytes of every tensor in the optimizer state (torch AdamW: exp_avg,
exp_avg_sq, step; SparseAdamW: ``state_bytes()`` = indices + m + v (+ fp32 master)).
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import piece_optim as po


def adamw_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )


def model_10m(dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = model_10m(dtype)
    n = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 8000, (2, 32))

    est = po.ImportanceEstimator(model, method="piece-s")
    model(input_ids=x, labels=x).loss.backward()
    est.collect()
    mask = est.select(ratio=args.ratio)
    est.close()
    sparse = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-4)
    model(input_ids=x, labels=x).loss.backward()
    sparse.step()
    sparse.zero_grad()
    sb = sparse.state_bytes()

    dense = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(input_ids=x, labels=x).loss.backward()
    dense.step()
    db = adamw_state_bytes(dense)
    print(
        f"model: LLaMA {n / 1e6:.2f}M params ({args.dtype}); mask: {mask.numel_selected()} "
        f"entries (ratio {mask.ratio:.2e})"
    )
    print(f"torch.optim.AdamW state: {db:,} B")
    print(f"SparseAdamW state:       {sb:,} B")
    print(f"ratio AdamW / SparseAdamW: {db / sb:.1f}x")


if __name__ == "__main__":
    main()
