"""Hugging Face integration: ``transformers.Trainer`` and ``accelerate`` with PIECE.

Two ways, both through ``Trainer``'s own ``optimizer_cls_and_kwargs`` hook (no Trainer
subclass, no patched training loop):

1. You have a mask already (from :func:`estimate_mask` or a file)::

       trainer = Trainer(model, args, train_dataset=ds,
                         optimizer_cls_and_kwargs=piece_trainer_optimizer(model, mask))

2. Let the Trainer estimate it on the first ``n_batches`` of its own training
   dataloader (its collator, its device placement) right before training starts::

       trainer = Trainer(model, args, train_dataset=ds)
       piece = use_piece(trainer, n_batches=8, ratio=1e-3)
       trainer.train()          # estimates, selects, then trains the selected entries
       piece.mask               # the SparseMask used

   This uses Trainer's optimizer *factory* path (``optimizer_cls_and_kwargs`` whose first
   element is not an Optimizer class is called and handed the model), so estimation
   happens inside ``create_optimizer()``, after the model is on its device.

   Checkpoints: every ``SparseAdamW.state_dict()`` carries its mask (``"piece_mask"``), so
   each Trainer checkpoint's ``optimizer.pt`` holds it.  ``trainer.train(
   resume_from_checkpoint=...)`` does not estimate again (the weights it would estimate on
   are the checkpoint's, so the mask would differ): the optimizer takes the mask from the
   checkpoint's optimizer state, and training continues bit for bit.

Hyperparameters come from ``TrainingArguments`` (``learning_rate``, ``adam_beta1/2``,
``adam_epsilon``, ``weight_decay`` with Trainer's usual no-decay groups for biases and
norms); the lr scheduler works unchanged.  Gradient clipping (``max_grad_norm``) and
gradient accumulation work unchanged too, also with ``sparse_grads=True``: the sparse
gradients are :class:`~piece_optim.optim.SparseGrad` tensors on ``param.grad``, which
``clip_grad_norm_`` clips and Trainer's ``grad_norm`` log reports.  With
``sparse_grads=True`` that norm is over the selected entries (the ones the step uses);
with dense gradients it is torch's, over every entry of every gradient.

``accelerate``: ``Accelerator.prepare(model, SparseAdamW(...))`` needs nothing special;
``accelerator.clip_grad_norm_`` clips (and returns the norm of) the gradients as above.

Under ``torchrun`` (DDP), :func:`use_sparse_allreduce` makes the Trainer all-reduce only
the selected gradient entries (:func:`piece_optim.distributed.sparse_allreduce_hook`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from ._dtensor import check_sparse_allreduce_wrapper, manual_average_group
from .distributed import sparse_allreduce_hook
from .importance import ImportanceEstimator
from .mask import SparseMask
from .optim import MASK_FROM_STATE_DICT, SparseAdamW


def _loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model(**batch)
    else:
        raise TypeError(
            f"estimate_mask: batches must be dicts of model inputs with labels (as a Hugging "
            f"Face DataLoader yields), got {type(batch).__name__}"
        )
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "estimate_mask: the model returned no loss; the batches need a 'labels' entry"
        )
    return loss


def estimate_mask(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    n_batches: int,
    ratio: float = 1e-3,
    method: str = "piece-s",
    eps: float = 1.0,
    exclude: Iterable[str] = ("embed",),
    progress: bool = True,
) -> SparseMask:
    """PIECE importance over the first ``n_batches`` of ``batches``, then the global top-k.

    Each batch is a dict of model inputs including ``labels`` (``model(**batch).loss``);
    each batch is one gradient term.  No weight changes; gradients are cleared after.

    Data parallel: when ``torch.distributed`` is initialised with several ranks and the
    model is a plain module (as inside ``Trainer.create_optimizer``, before DDP wraps it),
    each rank sees its own share of every batch, so the gradients are averaged across
    ranks (one all_reduce per parameter per batch) before they are folded: every rank
    then scores the global batch and selects the same mask.  A DDP-wrapped model averages
    them itself; FSDP2 (DTensor) parameters are handled by the estimator.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches={n_batches!r} must be a positive int")
    from tqdm.auto import tqdm

    group = manual_average_group(model)
    with ImportanceEstimator(model, method=method, eps=eps, exclude=exclude) as est:
        seen = 0
        for batch in tqdm(
            islice(batches, n_batches),
            total=n_batches,
            disable=not progress,
            desc="PIECE importance",
        ):
            _loss_of(model, batch).backward()
            if group is not None:
                _average_grads(model, group)
            est.collect()
            seen += 1
        if seen < n_batches:
            raise ValueError(
                f"estimate_mask: asked for n_batches={n_batches} but the data gave only {seen}"
            )
        mask = est.select(ratio=ratio)
    model.zero_grad(set_to_none=True)
    return mask


def _average_grads(model: nn.Module, group: Any) -> None:
    world = torch.distributed.get_world_size(group)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must join every all_reduce, in the same order
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def piece_trainer_optimizer(
    model: nn.Module, mask: SparseMask, **optimizer_kwargs: Any
) -> tuple[type[SparseAdamW], dict[str, Any]]:
    """``(SparseAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Trainer hands the optimizer unnamed param groups, so the mask is bound to ``model``'s
    parameter objects here (:meth:`SparseMask.bind`).  ``optimizer_kwargs`` (``lr``,
    ``betas``, ``eps``, ``sparse_grads``, ...) go to :class:`SparseAdamW`; per-group weight
    decay comes from ``TrainingArguments.weight_decay``.  On this path Trainer applies no
    other ``TrainingArguments`` hyperparameter (as for any ``optimizer_cls_and_kwargs``):
    pass ``lr``, ``betas`` and ``eps`` here, or SparseAdamW's defaults (AdamW's) are used;
    :func:`use_piece` reads them from ``TrainingArguments``.
    """
    if not isinstance(mask, SparseMask):
        raise TypeError(f"mask must be a SparseMask, got {type(mask).__name__}")
    if "mask" in optimizer_kwargs:
        raise TypeError("pass the mask as the second argument, not in optimizer_kwargs")
    return SparseAdamW, {"mask": mask.bind(model), **optimizer_kwargs}


class PieceOptimizerFactory:
    """Trainer's optimizer factory: estimate on the trainer's data, then make SparseAdamW.

    Made by :func:`use_piece`; after training starts, ``mask`` holds the mask used.  When
    the Trainer resumes from a checkpoint (it has loaded the checkpoint's TrainerState,
    ``global_step > 0``, before it creates the optimizer), no estimation runs: the
    optimizer is made with ``MASK_FROM_STATE_DICT`` and takes its mask from the
    checkpoint's optimizer state, which Trainer loads right after creating it.
    """

    def __init__(
        self,
        trainer: Any,
        n_batches: int,
        ratio: float,
        method: str,
        eps: float,
        exclude: Iterable[str],
        optimizer_kwargs: dict[str, Any],
    ) -> None:
        self.trainer = trainer
        self.n_batches = n_batches
        self.ratio = ratio
        self.method = method
        self.eps = eps
        self.exclude = tuple(exclude)
        self.optimizer_kwargs = optimizer_kwargs
        self.optimizer: SparseAdamW | None = None
        self._mask: SparseMask | None = None

    @property
    def mask(self) -> SparseMask | None:
        """The mask used (estimated, or taken from the checkpoint on resume)."""
        if self._mask is None and self.optimizer is not None:
            self._mask = _mask_of(self.optimizer)
        return self._mask

    def build(self, model: nn.Module, **kwargs: Any) -> SparseAdamW:
        args = self.trainer.args
        resuming = getattr(getattr(self.trainer, "state", None), "global_step", 0) > 0
        if resuming:
            mask: Any = MASK_FROM_STATE_DICT
            self._mask = None
        else:
            mask = self._mask = estimate_mask(
                model,
                self.trainer.get_train_dataloader(),
                n_batches=self.n_batches,
                ratio=self.ratio,
                method=self.method,
                eps=self.eps,
                exclude=self.exclude,
                progress=not args.disable_tqdm,
            )
        decay = set(self.trainer.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        hp = dict(
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )
        hp.update(self.optimizer_kwargs)
        hp.update(kwargs)
        self.optimizer = SparseAdamW(groups, mask=mask, **hp)
        return self.optimizer


def _mask_of(opt: SparseAdamW) -> SparseMask | None:
    """The SparseMask an optimizer (with named params) trains, or None before it has one."""
    by_name = opt.mask_indices()
    if not by_name or any(i is None for i in by_name.values()):
        return None
    shapes = {n: tuple(p.shape) for p, n in opt._names.items() if n in by_name}
    total = opt._mask_total
    if total is None:
        total = sum(p.numel() for p in opt._ordered_params())
    return SparseMask({n: i.cpu() for n, i in by_name.items()}, shapes, total)


class _Builder:
    """What Trainer's factory path calls: ``optimizer_cls()(opt_model, **kwargs)``."""

    def __init__(self, factory: PieceOptimizerFactory) -> None:
        self.factory = factory

    def __call__(self) -> Any:
        return self.factory.build


def use_piece(
    trainer: Any,
    *,
    n_batches: int,
    ratio: float = 1e-3,
    method: str = "piece-s",
    eps: float = 1.0,
    exclude: Iterable[str] = ("embed",),
    **optimizer_kwargs: Any,
) -> PieceOptimizerFactory:
    """Make ``trainer`` estimate PIECE importance on its first ``n_batches`` training
    batches when training starts, and train the selected entries with SparseAdamW.

    ``optimizer_kwargs`` override the hyperparameters taken from ``TrainingArguments``.
    Returns the factory; its ``mask`` is set once ``trainer.train()`` created the optimizer.
    """
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError as exc:
        raise RuntimeError(
            "use_piece needs a transformers version whose Trainer accepts optimizer factories "
            "(transformers.trainer_optimizer.is_optimizer_factory); with an older one, use "
            "estimate_mask() + piece_trainer_optimizer()"
        ) from exc
    if getattr(trainer, "optimizer", None) is not None:
        raise RuntimeError("use_piece: the trainer already has an optimizer; do not pass one")
    factory = PieceOptimizerFactory(
        trainer, n_batches, ratio, method, eps, exclude, dict(optimizer_kwargs)
    )
    builder = _Builder(factory)
    if not is_optimizer_factory(builder):
        raise RuntimeError("this transformers version does not treat callables as factories")
    trainer.optimizer_cls_and_kwargs = (builder, {})
    return factory


def use_sparse_allreduce(trainer: Any) -> None:
    """Make ``trainer`` all-reduce only the selected gradient entries under DDP.

    Registers :func:`piece_optim.distributed.sparse_allreduce_hook` on the DDP model that
    ``trainer.train()`` builds (Trainer wraps the model itself, after the optimizer is
    made), with the trainer's :class:`SparseAdamW` as its state, when training begins.
    Works with :func:`use_piece` and with :func:`piece_trainer_optimizer`.  One process:
    nothing to do.  Other wrappers (FSDP, DeepSpeed) raise when training begins.

    The gradients outside the selected entries are then zero on every rank, so
    ``max_grad_norm`` clips by the selected entries' norm (see the hook's docstring).
    """
    from transformers import TrainerCallback

    class _Register(TrainerCallback):
        def __init__(self) -> None:
            self.done: set[int] = set()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = trainer.model_wrapped
            try:
                if not check_sparse_allreduce_wrapper(model):
                    return  # one process: nothing to reduce
            except NotImplementedError as exc:
                raise NotImplementedError(f"use_sparse_allreduce: {exc}") from None
            if id(model) in self.done:  # DDP takes one comm hook; a second train() reuses it
                return
            opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps
            if not isinstance(opt, SparseAdamW):
                raise TypeError(
                    f"use_sparse_allreduce: the trainer's optimizer is {type(opt).__name__}, "
                    "not SparseAdamW; use use_piece() or piece_trainer_optimizer()"
                )
            model.register_comm_hook(opt, sparse_allreduce_hook)
            self.done.add(id(model))

    trainer.add_callback(_Register())
