"""Shared test helpers: small models, fresh random data, the hand-written AdamW oracle.

``DEVICE`` is the test device (``PIECE_OPTIM_TEST_DEVICE``: ``cpu`` by default, or
``cuda``; see conftest.py).  ``TinyNet`` and ``batches`` build on it, so the device-aware
tests run unchanged on a GPU; oracles and brute-force references compare on the CPU.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

DEVICE = torch.device((os.environ.get("PIECE_OPTIM_TEST_DEVICE") or "cpu").strip().lower())
if DEVICE.type not in ("cpu", "cuda"):
    raise ValueError(f"PIECE_OPTIM_TEST_DEVICE={DEVICE} must be 'cpu' or 'cuda'")


def fresh_seed() -> int:
    """A new seed every run: tests draw fresh random inputs (the seed is in the report)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


class TinyNet(nn.Module):
    """Embedding + two linears with odd sizes, a frozen param and a zero-size param, on
    ``DEVICE`` (initialised on the CPU first: the same seed gives the same weights)."""

    def __init__(self, vocab: int = 37, dim: int = 13, hidden: int = 29) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)
        self.empty = nn.Parameter(torch.empty(0))
        self.to(DEVICE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.tanh(self.fc1(h)) + 0 * self.frozen.sum()
        return self.fc2(h) + self.empty.sum()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(n: int, seed: int, vocab: int = 37, bs: int = 4, seq: int = 7):
    """``n`` (input, target) token batches on ``DEVICE``, drawn on the CPU from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (bs, seq), generator=g).to(DEVICE),
         torch.randint(0, vocab, (bs, seq), generator=g).to(DEVICE))
        for _ in range(n)
    ]  # fmt: skip


def adamw_oracle(w, g, m, v, *, lr, beta1, beta2, eps, wd, step):
    """Plain AdamW on float64 tensors (returns new w, m, v): the textbook formula."""
    w = w * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**step)
    vhat = v / (1 - beta2**step)
    w = w - lr * mhat / (vhat.sqrt() + eps * 1.0)
    return w, m, v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / max(b.abs().max().item(), 1e-30))


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))


def cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, detached: compare a device result with a CPU reference."""
    return t.detach().cpu()
