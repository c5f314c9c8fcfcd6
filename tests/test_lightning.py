"""Lightning's Trainer with SparseAdamW(sparse_grads=True): gradient_clip_val clips.

Lightning clips with ``torch.nn.utils.clip_grad_norm_`` (by norm) or ``clip_grad_value_``
over the optimizer's params, inside ``optimizer.step(closure)``; with sparse gradients both
act on the :class:`~piece_optim.optim.SparseGrad` each param holds.  Each run is checked
against a hand-written loop doing the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyNet, batches
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")
# lightning's own use of a torch API torch deprecates; nothing of ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated"),
    pytest.mark.cpu_only("Lightning places the model itself; accelerator='cpu' here"),
]

import piece_optim as po  # noqa: E402

HP = dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
STEPS = 5


def _mask(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randperm(model.get_parameter(n).numel(), generator=g)[:40].sort().values
        for n in ("fc1.weight", "fc2.weight")
    }


class Module(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, mask: dict) -> None:
        super().__init__()
        self.net = net
        self.mask = mask

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.net.loss(x, y)

    def configure_optimizers(self):
        return po.SparseAdamW(self.net.named_parameters(), mask=self.mask, sparse_grads=True, **HP)


def _lightning(net, mask, data, **trainer_kw) -> None:
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kw,
    )
    # batch_size=None: each (x, y) of the list is one batch, in order
    trainer.fit(Module(net, mask), train_dataloaders=DataLoader(data, batch_size=None))


def _by_hand(net, mask, data, clip, algorithm) -> None:
    opt = po.SparseAdamW(net.named_parameters(), mask=mask, sparse_grads=True, **HP)
    for x, y in data[:STEPS]:
        net.loss(x, y).backward()
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        else:
            torch.nn.utils.clip_grad_value_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
    opt.close()


def test_lightning_gradient_clipping_with_sparse_grads(seed):
    torch.manual_seed(seed)
    base = TinyNet()
    mask = _mask(base, seed)
    data = batches(STEPS, seed + 1)
    plain = copy.deepcopy(base)
    _lightning(plain, mask, data)
    for algorithm, clip in (("norm", 0.05), ("value", 1e-3)):
        clipped, hand = copy.deepcopy(base), copy.deepcopy(base)
        _lightning(clipped, mask, data, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
        _by_hand(hand, mask, data, clip, algorithm)
        pairs = zip(clipped.parameters(), plain.parameters(), strict=True)
        assert not all(torch.equal(p, q) for p, q in pairs)  # the clip saw the gradients
        for (n, p), q in zip(clipped.named_parameters(), hand.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{algorithm}: {n}")
