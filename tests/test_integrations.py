"""transformers.Trainer and accelerate with PIECE, on a tiny LlamaForCausalLM (CPU).

The model is built from a LlamaConfig (no download); the data is fresh random tokens.
Each Trainer run is checked against a hand-written loop doing what Trainer should do
(same batches in the same order, same clipping), and the frozen entries bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import piece_optim as po  # noqa: E402
from piece_optim.integrations import (  # noqa: E402
    estimate_mask,
    piece_trainer_optimizer,
    use_piece,
)

pytestmark = pytest.mark.cpu_only("HF Trainer/Accelerate pick the device themselves; CPU here")

VOCAB, SEQ, BS, N_EX, STEPS, N_CALIB, RATIO = 67, 9, 4, 16, 20, 3, 0.01
LR, BETAS, EPS, CLIP = 2e-3, (0.9, 0.95), 1e-8, 1.0
# optimizer_cls_and_kwargs / optimizers=: Trainer applies no TrainingArguments hyperparameter
HP = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny models on one intra-op thread.

    Why: on the shared 2-core box (load ~11) this file took 140 s with torch's 2 OpenMP
    threads (spinning on each tiny op) and 8.6 s with one (measured, same run).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tokens(Dataset):
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (N_EX, SEQ), generator=g)

    def __len__(self) -> int:
        return N_EX

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


def trainer_for(model, ds, tmp_path, args_kw=None, **kw):
    args = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BS,
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
    args.update(args_kw or {})
    args = transformers.TrainingArguments(**args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, **kw)
    # Sequential batches, so the hand-written loop below sees the same ones.
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(ds)
    return trainer


def loader(ds) -> DataLoader:
    return DataLoader(ds, batch_size=BS, collate_fn=transformers.default_data_collator)


def manual_run(model, ds, mask, clip=CLIP, steps=STEPS, **opt_kw) -> list[float]:
    """What Trainer should do: 20 steps, clip to CLIP, constant lr, SparseAdamW.

    Returns the gradient norms clip_grad_norm_ saw (before clipping)."""
    opt = po.SparseAdamW(
        model.named_parameters(), mask=mask, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, **opt_kw
    )
    step, norms = 0, []
    while step < steps:
        for batch in loader(ds):
            model(**batch).loss.backward()
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
    opt.close()
    return norms


def check_only_mask_changed(model, start, mask) -> None:
    params = dict(model.named_parameters())
    changed = 0
    for name, p in params.items():
        moved = (p.detach() != start[name]).view(-1)
        allowed = mask.dense(name).view(-1) if name in mask else torch.zeros_like(moved)
        assert not bool((moved & ~allowed).any()), f"{name}: an entry outside the mask changed"
        changed += int(moved.sum())
    # selected entries have large gradients: 20 Adam steps move (nearly) all of them
    assert changed >= 0.9 * mask.numel_selected()


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    out = 0.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        d = (p.detach().double() - q.detach().double()).abs().max().item()
        out = max(out, d / max(q.detach().double().abs().max().item(), 1e-30))
    return out


def test_trainer_use_piece_estimates_then_trains(seed: int, tmp_path) -> None:
    ds = Tokens(seed)
    model = tiny_llama(seed)
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(model, ds, tmp_path)
    piece = use_piece(trainer, n_batches=N_CALIB, ratio=RATIO)
    trainer.train()

    opt = (
        trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else (trainer.optimizer)
    )
    assert isinstance(opt, po.SparseAdamW)
    total = sum(p.numel() for p in model.parameters())
    assert piece.mask.numel_selected() == int(RATIO * total) == opt.trainable_numel()
    assert not any("embed" in n for n in piece.mask.names())
    check_only_mask_changed(model, start, piece.mask)

    # the same estimate + loop by hand, on the same first N_CALIB batches
    want_mask = estimate_mask(
        twin, iter(loader(ds)), n_batches=N_CALIB, ratio=RATIO, progress=False
    )
    assert want_mask == piece.mask
    manual_run(twin, ds, want_mask)
    assert max_rel(model, twin) < 1e-5


def test_trainer_optimizer_cls_and_kwargs(seed: int, tmp_path) -> None:
    ds = Tokens(seed)
    model = tiny_llama(seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = estimate_mask(
        model, iter(loader(ds)), n_batches=N_CALIB, ratio=RATIO, method="piece-f", progress=False
    )
    kw = piece_trainer_optimizer(model, mask, lr=LR, betas=BETAS, eps=EPS)
    trainer = trainer_for(model, ds, tmp_path, optimizer_cls_and_kwargs=kw)
    trainer.train()
    check_only_mask_changed(model, start, mask)
    opt = (
        trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else (trainer.optimizer)
    )
    assert isinstance(opt, po.SparseAdamW)
    got = opt.mask_indices()  # unnamed params (Trainer's groups): keyed by position
    want = [mask[n] for n, _ in model.named_parameters() if n in mask]
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got.values(), want, strict=True))


def test_piece_trainer_optimizer_errors(seed: int) -> None:
    model = tiny_llama(seed)
    with pytest.raises(TypeError, match="SparseMask"):
        piece_trainer_optimizer(model, {"x": torch.tensor([0])})
    with pytest.raises(ValueError, match="n_batches"):
        estimate_mask(model, [], n_batches=0)
    with pytest.raises(ValueError, match="gave only 0"):
        estimate_mask(model, [], n_batches=2, progress=False)


def test_accelerate_prepare_and_resume(seed: int, tmp_path) -> None:
    from accelerate import Accelerator

    ds = Tokens(seed)
    model = tiny_llama(seed)
    twin = copy.deepcopy(model)
    mask = estimate_mask(model, iter(loader(ds)), n_batches=2, ratio=RATIO, progress=False)
    batches = list(loader(ds))

    def run(m, acc, opt, bs):
        for b in bs:
            (acc.backward if acc else torch.Tensor.backward)(m(**b).loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    acc = Accelerator(cpu=True)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=LR, betas=BETAS)
    pm, popt = acc.prepare(model, opt)
    run(pm, acc, popt, batches[:2])
    acc.save_state(str(tmp_path / "ckpt"))
    run(pm, acc, popt, batches[2:])

    plain = po.SparseAdamW(twin.named_parameters(), mask=mask, lr=LR, betas=BETAS)
    run(twin, None, plain, batches)
    assert same(model, twin)

    # resume from the accelerate checkpoint into a fresh model + optimizer
    fresh = tiny_llama(seed + 1)
    acc2 = Accelerator(cpu=True)
    opt2 = po.SparseAdamW(fresh.named_parameters(), mask=mask, lr=LR, betas=BETAS)
    pm2, popt2 = acc2.prepare(fresh, opt2)
    acc2.load_state(str(tmp_path / "ckpt"))
    run(pm2, acc2, popt2, batches[2:])
    assert same(fresh, model)


def test_trainer_max_grad_norm_clips_sparse_grads(seed: int, tmp_path) -> None:
    """sparse_grads=True: Trainer's max_grad_norm clips (and logs the norm of) the SparseGrads."""
    ds = Tokens(seed)
    base = tiny_llama(seed)
    mask = estimate_mask(
        copy.deepcopy(base), iter(loader(ds)), n_batches=N_CALIB, ratio=RATIO, progress=False
    )
    runs = {}
    for clip in (0.05, 0.0):
        model = copy.deepcopy(base)
        kw = piece_trainer_optimizer(model, mask, sparse_grads=True, **HP)
        trainer = trainer_for(
            model,
            ds,
            tmp_path / str(clip),
            optimizer_cls_and_kwargs=kw,
            args_kw=dict(
                max_grad_norm=clip, max_steps=6, logging_strategy="steps", logging_steps=1
            ),
        )
        trainer.train()
        runs[clip] = (
            model,
            [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        )
    assert not same(runs[0.05][0], runs[0.0][0])  # clipping changed the training
    twin = copy.deepcopy(base)
    norms = manual_run(twin, ds, mask, clip=0.05, steps=6, sparse_grads=True)
    assert max_rel(runs[0.05][0], twin) < 1e-5
    logged = runs[0.05][1]
    assert len(logged) == 6 and min(logged) > 0.05  # the real norms: clipping was active
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(norms), rtol=1e-5, atol=0)


def test_trainer_gradient_accumulation_sparse_equals_dense_grads(seed: int, tmp_path) -> None:
    ds = Tokens(seed)
    base = tiny_llama(seed)
    mask = estimate_mask(
        copy.deepcopy(base), iter(loader(ds)), n_batches=N_CALIB, ratio=RATIO, progress=False
    )
    models = []
    for sparse in (False, True):
        model = copy.deepcopy(base)
        kw = piece_trainer_optimizer(model, mask, sparse_grads=sparse, **HP)
        args = dict(
            max_steps=4,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            max_grad_norm=0.0,
        )
        trainer_for(
            model, ds, tmp_path / str(sparse), optimizer_cls_and_kwargs=kw, args_kw=args
        ).train()
        models.append(model)
    assert same(*models)
    assert not same(models[0], base)


@pytest.mark.parametrize("path", ["use_piece", "cls_and_kwargs", "optimizers"])
def test_trainer_resume_is_bit_exact(seed: int, tmp_path, path: str, monkeypatch) -> None:
    """Save at step 3, resume to step 6 in a fresh Trainer: the same weights as 6 steps.

    use_piece estimates once; the resumed run takes the mask from the checkpoint (estimating
    on the checkpoint's weights would give another mask).
    """
    import piece_optim.integrations as integrations

    estimated = []
    real_estimate = integrations.estimate_mask
    monkeypatch.setattr(
        integrations, "estimate_mask", lambda *a, **k: estimated.append(1) or real_estimate(*a, **k)
    )
    ds = Tokens(seed)
    base = tiny_llama(seed)
    mask = estimate_mask(
        copy.deepcopy(base), iter(loader(ds)), n_batches=N_CALIB, ratio=RATIO, progress=False
    )
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, save_only_model=False)

    def run(out, resume):
        model = copy.deepcopy(base)
        kw: dict = {}
        if path == "cls_and_kwargs":
            kw["optimizer_cls_and_kwargs"] = piece_trainer_optimizer(
                model, mask, sparse_grads=True, **HP
            )
        elif path == "optimizers":
            opt = po.SparseAdamW(model.named_parameters(), mask=mask, **HP)
            kw["optimizers"] = (opt, None)
        trainer = trainer_for(model, ds, out, args_kw=args, **kw)
        piece = use_piece(trainer, n_batches=N_CALIB, ratio=RATIO) if path == "use_piece" else None
        trainer.train(resume_from_checkpoint=resume)
        return model, piece

    full, piece = run(tmp_path / "a", None)
    assert len(estimated) == (path == "use_piece")
    resumed, piece2 = run(tmp_path / "a", str(tmp_path / "a" / "checkpoint-3"))
    assert len(estimated) == (path == "use_piece")  # no estimation on resume
    assert same(full, resumed)
    assert not same(full, base)
    if path == "use_piece":
        assert piece2.mask == piece.mask  # taken from the checkpoint, not estimated again


def test_accelerate_clip_returns_the_real_norm_with_sparse_grads(seed: int) -> None:
    from accelerate import Accelerator

    ds = Tokens(seed)
    model = tiny_llama(seed)
    twin = copy.deepcopy(model)
    mask = estimate_mask(model, iter(loader(ds)), n_batches=2, ratio=RATIO, progress=False)
    acc = Accelerator(cpu=True)
    opt = po.SparseAdamW(model.named_parameters(), mask=mask, lr=LR, sparse_grads=True)
    pm, popt = acc.prepare(model, opt)
    plain = po.SparseAdamW(twin.named_parameters(), mask=mask, lr=LR)
    for batch in list(loader(ds))[:3]:
        acc.backward(pm(**batch).loss)
        got = acc.clip_grad_norm_(pm.parameters(), 0.05)
        popt.step()
        popt.zero_grad()
        twin(**batch).loss.backward()
        for name, p in twin.named_parameters():  # the dense grads restricted to the mask
            if name in mask:
                keep = mask.dense(name)
                p.grad.mul_(keep)
            else:
                p.grad = None
        want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        plain.step()
        plain.zero_grad()
        assert float(got) > 0.05
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert max_rel(model, twin) < 1e-5
    opt.close()


def test_peft_renamed_mask_is_refused_then_remapped(seed: int, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    ds = Tokens(seed)
    base = tiny_llama(seed)
    twin = copy.deepcopy(base)
    mask = estimate_mask(
        copy.deepcopy(base),
        iter(loader(ds)),
        n_batches=N_CALIB,
        ratio=RATIO,
        exclude=("embed", "lm_head"),
        progress=False,
    )
    bound_early = piece_trainer_optimizer(base, mask, **HP)  # bound before PEFT wraps the model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = peft.LoraConfig(r=2, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    with pytest.raises(ValueError, match="does not hold.*mask.for_model"):
        po.SparseAdamW(model.named_parameters(), mask=mask)
    # inside Trainer: names, the cause (frozen, not passed) and the fix, not "<tensor (..)>"
    trainer = trainer_for(model, ds, tmp_path, optimizer_cls_and_kwargs=bound_early)
    with pytest.raises(ValueError, match=r"hold \(e\.g\. \['[\w.]+'.*frozen.*requires_grad_\(Tr"):
        trainer.create_optimizer()
    remapped = mask.for_model(model)
    assert any(".base_layer." in n for n in remapped.names())
    with pytest.raises(ValueError, match="nothing to train.*frozen"):
        po.SparseAdamW(model.named_parameters(), mask=remapped)
    for n in remapped.names():
        model.get_parameter(n).requires_grad_(True)
    # no clipping: the (untrained) LoRA B matrices have gradients that would enter the norm
    manual_run(model, ds, remapped, clip=0.0, steps=4)
    manual_run(twin, ds, mask, clip=0.0, steps=4)  # the same entries train, bit for bit
    named = dict(model.named_parameters())
    for n, p in twin.named_parameters():
        m_name = remapped.names()[mask.names().index(n)] if n in mask else None
        if m_name is not None:
            assert torch.equal(named[m_name], p), n
    assert remapped.for_model(twin) == mask
