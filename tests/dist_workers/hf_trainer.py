"""The Hugging Face Trainer under DDP (2 processes, gloo, CPU) with SparseAdamW.

Each Trainer run (``per_device_train_batch_size = BS / 2``; accelerate hands rank r the
batches r, r+2, ... of the sequential sampler, so the ranks' pairs make the global batches)
is compared with a one-process loop doing what Trainer does on global batches of BS:
``use_piece``'s mask (estimated inside Trainer, gradients averaged over the ranks) and the
weights after training.  With ``use_sparse_allreduce`` the loop clips by the selected
entries' norm, as the hook's zeroed gradients make Trainer do.  Runs on the default
backend in every test stage (see ``scenario_trainer``).
"""

from __future__ import annotations

import os

import torch
import transformers
from common import LLAMA_TOL, check
from torch.utils.data import DataLoader, Dataset, SequentialSampler

import piece_optim as po
from piece_optim import distributed as pd
from piece_optim.integrations import estimate_mask, use_piece, use_sparse_allreduce

VOCAB, SEQ, BS, STEPS, N_CALIB, RATIO = 67, 9, 4, 5, 2, 0.01
LR, BETAS, EPS, CLIP = 2e-3, (0.9, 0.95), 1e-8, 1.0


class Tokens(Dataset):
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (BS * STEPS, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


def one_process(seed: int, ds: Dataset, selected_norm: bool) -> tuple[po.SparseMask, dict]:
    """What Trainer does, in one process on global batches (rank-local, no collectives
    except estimate_mask's averaging of identical gradients)."""
    model = tiny_llama(seed)
    batches = list(DataLoader(ds, batch_size=BS, collate_fn=transformers.default_data_collator))
    mask = estimate_mask(model, iter(batches), n_batches=N_CALIB, ratio=RATIO, progress=False)
    opt = po.SparseAdamW(
        model.named_parameters(), mask=mask, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0
    )
    for batch in batches[:STEPS]:
        model(**batch).loss.backward()
        if selected_norm:  # the hook leaves 0 outside the selected entries
            for n, p in model.named_parameters():
                keep = mask.dense(n) if n in mask else torch.zeros_like(p, dtype=torch.bool)
                p.grad.mul_(keep)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return mask, {n: p.detach().clone() for n, p in model.named_parameters()}


def trainer_run(seed: int, ds: Dataset, tmp: str, hook: bool) -> tuple[po.SparseMask, dict, int]:
    model = tiny_llama(seed)
    args = transformers.TrainingArguments(
        output_dir=tmp,
        max_steps=STEPS,
        per_device_train_batch_size=BS // 2,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        weight_decay=0.0,
        max_grad_norm=CLIP,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(ds)
    piece = use_piece(trainer, n_batches=N_CALIB, ratio=RATIO)
    if hook:
        use_sparse_allreduce(trainer)
    trainer.train()
    check(type(trainer.model_wrapped).__name__ == "DistributedDataParallel", "Trainer: no DDP")
    opt = trainer.optimizer.optimizer
    sent = pd.comm_stats(opt).bytes_sent if hook else 0
    return piece.mask, {n: p.detach().clone() for n, p in model.named_parameters()}, sent


def max_rel(got: dict, want: dict) -> float:
    out = 0.0
    for n, q in want.items():
        d = (got[n].double() - q.double()).abs().max().item()
        out = max(out, d / max(q.double().abs().max().item(), 1e-30))
    return out


def scenario_trainer(seed: int, tmp: str) -> dict:
    # This checks the integration, not the kernels (the other scenarios run every stage's
    # backend), so it runs on the default backend: in the Triton-interpreter stage that
    # saves ~6 s of this scenario's 8 s.
    forced = os.environ.pop("PIECE_OPTIM_BACKEND", None)
    try:
        return _scenario_trainer(seed, tmp)
    finally:
        if forced is not None:
            os.environ["PIECE_OPTIM_BACKEND"] = forced


def _scenario_trainer(seed: int, tmp: str) -> dict:
    ds = Tokens(seed + 31)
    res = {}
    for hook in (False, True):
        want_mask, want = one_process(seed, ds, selected_norm=hook)
        mask, got, sent = trainer_run(seed, ds, tmp, hook)
        check(mask == want_mask, f"Trainer (hook={hook}): use_piece's mask != one process's")
        w = max_rel(got, want)
        # LLaMA_TOL: measured 1.3e-8 to 5.6e-8 over 8 seeds, but the FSDP2 LLaMA run (same
        # model family) reached 1.5e-5 on one seed of 9, so the LLaMA bound of that check
        check(w < LLAMA_TOL, f"Trainer (hook={hook}): differs from one process by {w:.3g}")
        res[f"trainer{'_hook' if hook else ''}_max_rel_diff"] = w
        if hook:
            check(sent == STEPS * mask.numel_selected() * 4, f"Trainer hook: sent {sent} B")
    return res
