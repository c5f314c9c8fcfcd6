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
        (
            torch.randint(0, vocab, (bs, seq), generator=g).to(DEVICE),
            torch.randint(0, vocab, (bs, seq), generator=g).to(DEVICE),
        )
        for _ in range(n)
    ]


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


# -- comparing a backend with the reference ---------------------------------------------------
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
_MANT = {F32: 23, BF16: 7, F16: 10}
TORCH_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


class Tol:
    """A backend's documented distance from the reference, in ulps.

    ``acc``: accumulators and AdamW moments, per term or step; ``score_s``: PIECE-S scores
    (PIECE-F scores are the sums); ``w``: AdamW weights per step, relative to
    ``|w_old| + |w_new|`` (see :class:`WeightTol`).  0 everywhere: bit for bit.

    Why each: the C++ kernels do the reference's fp32 operations in torch's CPU order, fma
    where torch's vectorised kernels have one and torch's own (MKL VML) sqrt: bit for bit
    on a torch whose CPU capability uses fma; a torch running its DEFAULT kernels rounds
    ``addcmul_``/``lerp_`` twice: 2 ulp per step there.  The Triton kernels use IEEE
    ``sqrt_rn``, while torch's vectorised CPU sqrt is faithful, not correctly rounded (<= 1
    ulp off IEEE on ~17% of inputs): PIECE-S scores <= 2 ulp (sqrt + division), weights a
    few ulp of the update per step, moments exact.  On a GPU the reference runs torch's
    CUDA kernels, which order addcmul/addcdiv differently and divide by a scalar through
    its reciprocal: the bounds double there.
    """

    def __init__(self, acc: int, score_s: int, w: int) -> None:
        self.acc, self.score_s, self.w = acc, score_s, w

    def score(self, method: str) -> int:
        return self.score_s if method == "piece-s" else self.acc


def tol_of(name: str, device: torch.device = DEVICE) -> Tol:
    """The tolerances of backend ``name`` against the reference on ``device``."""
    if device.type == "cuda":
        return Tol(acc=2, score_s=2, w=8)
    if name in ("torch", "cpu"):
        return Tol(0, 0, 0) if TORCH_FMA or name == "torch" else Tol(acc=2, score_s=0, w=2)
    return Tol(acc=0, score_s=2, w=4)  # Triton's interpreter


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to integers that order like the values (adjacent floats differ by 1)."""
    ity = {F32: torch.int32, BF16: torch.int16, F16: torch.int16, torch.float64: torch.int64}
    i = x.contiguous().view(ity[x.dtype]).long()
    sign = (1 << (8 * x.element_size() - 1)) - 1
    return torch.where(i < 0, -(i & sign), i)


def assert_ulp(actual: torch.Tensor, expected: torch.Tensor, max_ulp: int, what: str) -> None:
    """At most ``max_ulp`` ulps apart elementwise; NaN exactly where the reference has NaN."""
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    a, e = actual.detach().reshape(-1).cpu(), expected.detach().reshape(-1).cpu()
    nan = e.isnan()
    assert torch.equal(a.isnan(), nan), f"{what}: NaN positions differ"
    if a.numel():
        d = (_ordered(a[~nan]) - _ordered(e[~nan])).abs()
        worst = int(d.max()) if d.numel() else 0
        assert worst <= max_ulp, f"{what}: {worst} ulp apart (allowed {max_ulp})"


def ulp_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |x| (fp32 tensor)."""
    _, e = torch.frexp(x.detach().float().cpu())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32, device="cpu"), e - 1 - _MANT[dtype])


class WeightTol:
    """Elementwise bound on |w_backend - w_reference| over AdamW steps.

    Per step: ``ulps`` fp32 ulps of ``|w_old| + |w_new|`` (which bounds the update whose
    last bits differ), plus one ulp of the storage dtype (the final rounding may flip);
    the bound carries over from step to step.  Relative to the weights, not the result:
    w_new can cancel to ~0 while the update was large.  ``ulps=0``: bit for bit.
    """

    def __init__(self, ulps: int) -> None:
        self.ulps = ulps
        self.tol: torch.Tensor | float = 0.0

    def check(self, got: torch.Tensor, want: torch.Tensor, old: torch.Tensor, what: str) -> None:
        if self.ulps == 0:
            assert_ulp(got, want, 0, what)
            return
        scale = want.detach().float().abs().cpu() + old.detach().float().abs().cpu()
        store = ulp_of(want, want.dtype) if want.dtype != F32 else 0.0
        self.tol = self.tol + self.ulps * ulp_of(scale, F32) + store
        err = (got.detach().float().cpu() - want.detach().float().cpu()).abs()
        nan = want.detach().float().cpu().isnan()
        assert torch.equal(got.detach().float().cpu().isnan(), nan), f"{what}: NaN positions"
        same = got.detach().float().cpu() == want.detach().float().cpu()  # infinities too
        bad = (err > self.tol) & ~nan & ~same
        assert not bad.any(), f"{what}: error {err[bad].max().item():.3g} over the bound"
