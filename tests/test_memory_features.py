"""Memory features: SparseAdamW(sparse_grads=True), bf16 accumulators, in_backward guards.

Every test compares against the dense path (torch's own gradients, torch's
clip_grad_norm_) on fresh random inputs; sizes stay tiny for the Triton interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, TinyNet, batches
from torch import nn
from torch.utils.checkpoint import checkpoint

import piece_optim as po
from piece_optim.optim import SparseGrad


def _mask(model: nn.Module, seed: int, ratio: float = 0.2) -> po.SparseMask:
    """A real PIECE mask from two calibration batches (fresh random data)."""
    est = po.ImportanceEstimator(model, method="piece-s")
    for x, y in batches(2, seed + 7):
        model.loss(x, y).backward()
        est.collect()
    mask = est.select(ratio=ratio)
    est.close()
    return mask


def _pair(seed: int, ratio: float = 0.2):
    torch.manual_seed(seed)
    model = TinyNet()
    mask = _mask(model, seed, ratio)
    twin = copy.deepcopy(model)
    return model, twin, mask


def _selected(p: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    return flat if idx is None else flat[idx.long()]


@pytest.mark.parametrize("micro", [1, 4])
def test_sparse_grads_accumulation_equals_big_batch(seed, micro):
    """4 micro-batches with sparse_grads=True == one big batch with dense grads."""
    model, twin, mask = _pair(seed)
    kw = dict(lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    dense = po.SparseAdamW(model.named_parameters(), mask=mask, **kw)
    sparse = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True, **kw)
    named = dict(twin.named_parameters())
    for step in range(7):
        x, y = batches(1, seed + 100 + step, bs=8)[0]
        model.loss(x, y).backward()  # one big batch of 8
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (twin.loss(xs, ys) / micro).backward()
            for name, p in twin.named_parameters():  # dense grads freed, or kept sparse
                want = SparseGrad if name in mask.names() else type(None)
                assert type(p.grad) is want, name
        for name, p in model.named_parameters():
            if name in mask.names():
                got = sparse.sparse_grad(named[name])
                want = _selected(p.grad, mask[name])
                if micro == 1:
                    assert torch.equal(got, want)
                else:  # same sum, other order of fp32 additions: ulps of the largest terms
                    scale = float(want.abs().max())
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
                    # Both step on the very same values: Adam turns an ulp of a gradient
                    # near zero into up to lr * 1e-4 of weight, and that drift would feed
                    # the next steps' gradients (seed 635183943: 3e-7 off by step 1).
                    p.grad.view(-1)[mask[name].long()] = got
        dense.step()
        sparse.step()
        dense.zero_grad()
        assert sparse.grad_bytes() == 4 * mask.numel_selected()  # step keeps grads, as AdamW
        sparse.zero_grad()
        assert sparse.grad_bytes() == 0
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if DEVICE.type == "cpu":  # the same gradients, the same step: bit-identical
            assert torch.equal(q, p), name
        else:  # (one kernel reads g[idx], the other g[i]: not run on a GPU in this form)
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    sparse.close()


def test_sparse_grads_equal_dense_grads_bitwise_over_micro_batches(seed):
    """Accumulating 4 backwards in the buffer is the same fp32 sum torch's .grad makes."""
    model, twin, mask = _pair(seed)
    dense = po.SparseAdamW(model.named_parameters(), mask=mask)
    sparse = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True)
    for x, y in batches(4, seed + 3):
        model.loss(x, y).backward()
        twin.loss(x, y).backward()
    named = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if name in mask.names():
            assert torch.equal(
                sparse.sparse_grad(named[name]), p.grad.reshape(-1)[mask[name].long()]
            )
            assert torch.equal(sparse.sparse_grad(name), sparse.sparse_grad(named[name]))
        else:
            assert sparse.sparse_grad(named[name]) is None
    k = mask.numel_selected()
    assert sparse.grad_bytes() == 4 * k
    assert dense.grad_bytes() == sum(
        4 * p.numel() for p in model.parameters() if p.grad is not None
    )
    sparse.zero_grad()
    assert sparse.grad_bytes() == 0
    sparse.close()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_grad_norm_equals_torch(seed, norm_type, max_norm):
    """clip_grad_norm_ on the sparse buffers == torch's on the same (masked) gradients."""
    model, twin, mask = _pair(seed)
    sparse = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True, lr=1e-2)
    dense = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2)
    for x, y in batches(2, seed + 5):
        model.loss(x, y).backward()
        twin.loss(x, y).backward()
    # The same gradients densely: zero outside the mask (the entries the step never uses).
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name in mask.names():
            keep = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            keep[mask[name].long()] = True
            p.grad.mul_(keep.view_as(p.grad))
        else:
            p.grad = None
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)
    got = sparse.clip_grad_norm_(max_norm, norm_type=norm_type)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    assert (float(got) > max_norm) == (max_norm < 1)  # both regimes really exercised
    named = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if name in mask.names():
            got_g, want_g = sparse.sparse_grad(named[name]), _selected(p.grad, mask[name])
            torch.testing.assert_close(got_g, want_g, rtol=2e-6, atol=1e-12)
    dense.step()
    sparse.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    sparse.close()


def test_clip_grad_norm_dense_mode_is_torch(seed):
    model, twin, mask = _pair(seed)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask)
    x, y = batches(1, seed)[0]
    model.loss(x, y).backward()
    twin.loss(x, y).backward()
    got = opt.clip_grad_norm_(0.1)
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    assert torch.equal(got, want)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


class _Blocks(nn.Module):
    """Three tanh-linear blocks with a tied output head, for checkpointing tests."""

    def __init__(self, dim: int = 11, vocab: int = 19) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.norm = nn.LayerNorm(dim)
        self.ckpt: bool | None = None  # None: off, else use_reentrant
        self.to(DEVICE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:

            def f(t, b=b):
                return torch.tanh(b(t)) + t

            h = f(h) if self.ckpt is None else checkpoint(f, h, use_reentrant=self.ckpt)
        return self.norm(h) @ self.embed.weight.t()  # tied head: embed used twice

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("reentrant", [False, True])
def test_sparse_grads_with_activation_checkpointing(seed, reentrant):
    torch.manual_seed(seed)
    model = _Blocks()
    twin = copy.deepcopy(model)
    twin.ckpt = reentrant
    est = po.ImportanceEstimator(model, method="piece-f", exclude=())
    for x, y in batches(2, seed + 1, vocab=19):
        model.loss(x, y).backward()
        est.collect()
    mask = est.select(ratio=0.3)
    est.close()
    assert "embed.weight" in mask.names()  # the tied weight is trained: hooks fire twice
    dense = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2)
    sparse = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True, lr=1e-2)
    for x, y in batches(7, seed + 2, vocab=19):
        for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
            model.loss(xs, ys).backward()
            twin.loss(xs, ys).backward()
        dense.step()
        sparse.step()
        model.zero_grad()  # user code zeroing the model: harmless for the buffers
        twin.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    sparse.close()


def test_close_removes_hooks_and_step_after_close_raises(seed):
    model, twin, mask = _pair(seed)
    opt = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True)
    opt.close()
    x, y = batches(1, seed)[0]
    twin.loss(x, y).backward()
    assert twin.fc1.weight.grad is not None  # hooks gone: torch keeps the dense grad
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()


def test_sparse_grads_errors(seed):
    model, twin, mask = _pair(seed)
    plain = po.SparseAdamW(model.named_parameters(), mask=mask)
    with pytest.raises(RuntimeError, match="sparse_grads=False"):
        plain.sparse_grad(next(model.parameters()))
    opt = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True)
    with pytest.raises(KeyError, match="nope"):
        opt.sparse_grad("nope")
    x, y = batches(1, seed)[0]
    twin.loss(x, y).backward()
    g = twin.fc1.weight.grad
    assert isinstance(g, SparseGrad) and g.shape == twin.fc1.weight.shape
    with pytest.raises(
        NotImplementedError, match="SparseGrad.*does not support.*sparse_grads=False"
    ):
        g.sum()  # anything but what gradient consumers call is refused, never read as dense
    with pytest.raises(NotImplementedError, match="create_graph"):
        twin.loss(x, y).backward(create_graph=True)
    opt.close()


def test_grad_scaler_with_sparse_grads_equals_dense_grads(seed):
    """fp16 autocast + GradScaler: unscale, inf check and skipped steps act on the SparseGrads."""
    model, twin, mask = _pair(seed)
    dense = po.SparseAdamW(model.named_parameters(), mask=mask, lr=1e-2)
    sparse = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True, lr=1e-2)
    scalers = [
        torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8, growth_interval=2) for _ in "ab"
    ]
    name = mask.names()[-1]
    scales = []
    for step, (x, y) in enumerate(batches(5, seed + 1)):
        for m, opt, scaler in zip((model, twin), (dense, sparse), scalers, strict=True):
            with torch.autocast(DEVICE.type, dtype=torch.float16):
                loss = m.loss(x, y)
            scaler.scale(loss).backward()
            if step == 2:  # a non-finite gradient at a selected entry: both skip the step
                g = m.get_parameter(name).grad
                if isinstance(g, SparseGrad):
                    g.selected_values[0] = float("inf")
                else:
                    g.view(-1)[mask[name][0]] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        scales.append(scalers[1].get_scale())
    assert scales[2] == scales[1] / 2  # the inf step was skipped and the scale halved
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
    sparse.close()


def test_sparse_grads_bf16_params_accumulate_like_dense_grads(seed):
    """bf16 params: the SparseGrad sums backwards in bf16, exactly as autograd sums .grad."""
    torch.manual_seed(seed)
    model = TinyNet().to(torch.bfloat16)
    mask = _mask(model, seed)
    twin = copy.deepcopy(model)
    dense = po.SparseAdamW(model.named_parameters(), mask=mask)
    opt = po.SparseAdamW(twin.named_parameters(), mask=mask, sparse_grads=True)
    for x, y in batches(3, seed + 9):
        model.loss(x, y).backward()
        twin.loss(x, y).backward()
    named = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        if n in mask.names():
            got = opt.sparse_grad(named[n])
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, p.grad.reshape(-1)[mask[n].long()]), n
    before = {n: p.detach().clone() for n, p in named.items()}
    dense.step()
    opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
        assert torch.equal(q, before[n]) != (n in mask.names()), n
    opt.close()


# -- importance: bf16 accumulators, reentrant checkpointing, chunked selection ------------
def test_bf16_stochastic_rounding_is_unbiased_where_nearest_stalls(seed):
    """Terms below half an ulp of the sum: round-to-nearest drops them all, stochastic
    rounding does not (through the stage's backend: its kernels round stochastically)."""
    from piece_optim import functional as F
    from piece_optim.backends import reference as ref

    g = torch.Generator().manual_seed(seed)
    n, terms = 4099, 300
    start = (1.0 + 0.5 * torch.rand(n, generator=g)).to(DEVICE)  # in [1, 2): bf16 ulp 2**-7
    sr_g = start.to(torch.bfloat16)
    sr_g2 = start.to(torch.bfloat16)
    rne_g2 = start.to(torch.bfloat16)
    exact_g = sr_g.double().clone()
    exact_g2 = sr_g2.double().clone()
    for term in range(terms):
        t = ((torch.rand(n, generator=g) * 2 - 1) * 2**-10).to(DEVICE)  # |t| < 2**-10
        # t2*t2 < 2**-10 < half ulp
        t2 = ((torch.rand(n, generator=g) * 0.5 + 0.5) * 2**-5).to(DEVICE)
        keys = [ref.stochastic_key(seed, term, 0), ref.stochastic_key(seed, term, 1)]
        zeros = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
        F.accumulate_([t, t2], [sr_g, None], [zeros, sr_g2], keys=keys)
        F.accumulate_([t2], [None], [rne_g2])  # no keys: round to nearest
        exact_g += t.double()
        exact_g2 += t2.double() ** 2
    assert torch.equal(rne_g2, start.to(torch.bfloat16))  # nearest: every term lost
    # SR: unbiased, so the mean error over n entries is tiny next to one ulp (2**-7) ...
    bias = float((sr_g2.double() - exact_g2).mean() / exact_g2.mean())
    assert abs(bias) < 2e-3, bias
    assert abs(float((sr_g.double() - exact_g).mean())) < 2**-8
    # ... and each entry's error is a random walk, far below what nearest loses (all of it)
    sr_err = float((sr_g2.double() - exact_g2).abs().mean())
    rne_err = float((rne_g2.double() - exact_g2).abs().mean())
    assert sr_err < 0.35 * rne_err, (sr_err, rne_err)


def test_bf16_accumulators_deterministic_and_close(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    models = [model, copy.deepcopy(model), copy.deepcopy(model)]
    dts = (torch.bfloat16, torch.bfloat16, torch.float32)
    ests = [
        po.ImportanceEstimator(m, method="piece-s", accum_dtype=dt)
        for m, dt in zip(models, dts, strict=True)
    ]
    for x, y in batches(5, seed + 2):
        for m, est in zip(models, ests, strict=True):
            m.loss(x, y).backward()
            est.collect()
    a, b = ests[0]._sum_g2, ests[1]._sum_g2  # same gradients, fixed seed: same bits
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert ests[0].select(ratio=0.05) == ests[1].select(ratio=0.05)
    for n, s2 in ests[2]._sum_g2.items():
        # sum g^2 has no cancellation: each of 5 stochastic adds errs by < 1 bf16 ulp
        # (<= 2**-7 relative) of a partial sum <= the final one
        torch.testing.assert_close(a[n].float(), s2, rtol=5 * 2**-7, atol=1e-30)


@pytest.mark.parametrize("reentrant", [False, True])
def test_in_backward_with_activation_checkpointing(seed, reentrant):
    torch.manual_seed(seed)
    model = _Blocks()
    twin = copy.deepcopy(model)
    twin.ckpt = reentrant
    a = po.ImportanceEstimator(model, method="piece-s", exclude=())
    b = po.ImportanceEstimator(twin, method="piece-s", exclude=(), in_backward=True)
    data = batches(3, seed + 4, vocab=19)
    for x, y in data:
        model.loss(x, y).backward()
        a.collect()
    if reentrant:
        x, y = data[0]
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            twin.loss(x, y).backward()
        b.close()
        return
    for x, y in data:
        twin.loss(x, y).backward()
    assert b.num_terms == a.num_terms == 3
    for n, s in a.scores().items():
        torch.testing.assert_close(b.scores()[n], s, rtol=1e-5, atol=1e-9)
    b.close()


def test_chunked_select_equals_unchunked(seed, monkeypatch):
    """A backend that asks for pieces (``select_chunk``) gets them; the mask is the same."""
    torch.manual_seed(seed)
    model = TinyNet()
    est = po.ImportanceEstimator(model, method="piece-f")
    for x, y in batches(2, seed + 6):
        model.loss(x, y).backward()
        est.collect()
    for s2 in est._sum_g2.values():  # coarse values: many ties across chunk borders
        s2.copy_((s2 / s2.max() * 8).round())
    whole = est.select(ratio=0.1)
    be = po.backends.resolve(est.backend, "select", DEVICE, (torch.float32,))
    monkeypatch.setattr(be, "select_chunk", 97)
    chunked = est.select(ratio=0.1)
    assert chunked == whole
    assert chunked.numel_selected() == whole.numel_selected() == int(0.1 * est._numel_total)
