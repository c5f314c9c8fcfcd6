"""The continual-learning benchmark: one pretrained model, a task sequence, five methods.

Every method sees the same tasks in the same order with the same budget (``steps``
optimizer steps of ``batch`` examples per task, constant lr, grad-norm clip 1.0, AdamW
betas (0.9, 0.95), no weight decay, fresh optimizer state per task), as in the paper:

* ``seqft``   full fine-tuning with ``torch.optim.AdamW``;
* ``seqlora`` a fresh peft LoRA adapter per task on every linear layer of the blocks,
  merged into the weights after the task;
* ``random``  SparseAdamW on a uniformly random mask of the same size as PIECE's;
* ``piece-f`` / ``piece-s`` SparseAdamW on the global top-``ratio`` entries by PIECE-F /
  PIECE-S importance, recomputed on each new task's training data with the current
  model.  Embeddings and the LM head never train (``exclude``), as in the paper.

After each task every task seen so far is scored (exact match on its test split) and
general ability is measured (next-byte accuracy on held-out stdlib files).  OP and BWT as
TRACE defines them: ``R[i][j]`` = score on task j after learning task i;
OP = mean_j R[T-1][j]; BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..delta import revert_delta, save_delta
from ..importance import ImportanceEstimator
from ..mask import SparseMask
from ..optim import SparseAdamW
from .data import TaskData, collate, general_corpus, make_task
from .model import exact_match, general_windows, next_token_accuracy, pretrained_model

METHODS = ("seqft", "seqlora", "random", "piece-f", "piece-s")
FAMILY = {
    "seqft": "full",
    "seqlora": "lora",
    "random": "sparse",
    "piece-f": "sparse",
    "piece-s": "sparse",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    """Everything that defines a run.  ``preset()`` gives the default / quick / tiny ones."""

    size: str = "small"
    pretrain_steps: int = 1500
    tasks: tuple[str, ...] = ("sentiment", "topic", "parity")
    n_train: int = 2000
    n_eval: int = 100
    steps: int = 150
    batch: int = 16
    ratio: float = 1e-2
    eps: float = 1e-8
    calib_batches: int = 16
    lora_r: int = 8
    lr: dict[str, float] = field(
        default_factory=lambda: {"full": 1e-4, "lora": 1e-3, "sparse": 3e-3}
    )
    exclude: tuple[str, ...] = ("embed", "lm_head")
    n_general: int = 48
    max_new: int = 14
    seed: int = 0
    use_cache: bool = True


def preset(name: str) -> DemoConfig:
    """``"default"`` (<= 10 min on 2 CPU cores), ``"quick"`` (<= 3 min), ``"tiny"`` (tests)."""
    if name == "default":
        return DemoConfig()
    if name == "quick":
        return DemoConfig(steps=60, n_eval=40, n_train=1000, calib_batches=4, n_general=24)
    if name == "tiny":
        return DemoConfig(
            size="tiny",
            pretrain_steps=3,
            tasks=("dates", "addition"),
            n_train=16,
            n_eval=2,
            steps=2,
            max_new=4,
            batch=4,
            ratio=0.05,
            calib_batches=1,
            n_general=2,
            use_cache=False,
        )
    raise ValueError(f"preset {name!r} is unknown; choose 'default', 'quick' or 'tiny'")


# -- training one stage ------------------------------------------------------------------


def _batches(task: TaskData, steps: int, batch: int, seed: int):
    rng = random.Random(seed)
    for _ in range(steps):
        yield collate(rng.sample(task.train, batch))


def _eligible(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not any(s in n for s in exclude)}


def random_mask(model: nn.Module, ratio: float, exclude: tuple[str, ...], seed: int) -> SparseMask:
    """k = int(ratio * total) entries drawn uniformly from the non-excluded parameters."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    elig = _eligible(model, exclude)
    sizes = [p.numel() for p in elig.values()]
    k = int(ratio * total)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(sum(sizes), generator=g)[:k].sort().values
    out, start = {}, 0
    for (name, _), n in zip(elig.items(), sizes, strict=True):
        sel = flat[(flat >= start) & (flat < start + n)] - start
        if sel.numel():
            out[name] = sel
        start += n
    return SparseMask(out, {n: tuple(elig[n].shape) for n in out}, total)


def piece_mask(
    model: nn.Module, task: TaskData, method: str, cfg: DemoConfig, seed: int
) -> SparseMask:
    """PIECE importance on ``calib_batches`` batches of the task's training data."""
    model.train()
    with ImportanceEstimator(model, method=method, eps=cfg.eps, exclude=cfg.exclude) as est:
        for b in _batches(task, cfg.calib_batches, cfg.batch, seed + 7):
            model(**b).loss.backward()
            est.collect()
        return est.select(ratio=cfg.ratio)


def _clip_selected_(params: list[nn.Parameter], idxs: list[Tensor | None], max_norm: float) -> None:
    """Clip by the norm of the gradient entries that will be used (the selected ones)."""
    sq = torch.zeros((), dtype=torch.float32)
    for p, idx in zip(params, idxs, strict=True):
        if p.grad is None:
            continue
        g = p.grad.view(-1) if idx is None else p.grad.view(-1)[idx]
        sq += g.float().pow(2).sum()
    scale = max_norm / (float(sq.sqrt()) + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


def train_stage(
    model: nn.Module,
    method: str,
    task: TaskData,
    cfg: DemoConfig,
    lr: float,
    seed: int,
    progress: bool = True,
    desc: str = "",
) -> tuple[nn.Module, SparseMask | None]:
    """Train ``model`` on ``task``; returns the (possibly new) model object and the mask."""
    mask = None
    betas = (0.9, 0.95)
    if method == "seqlora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
        model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        idxs: list[Tensor | None] = [None] * len(params)
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    elif method == "seqft":
        params = list(model.parameters())
        idxs = [None] * len(params)
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    elif method in ("random", "piece-f", "piece-s"):
        if method == "random":
            mask = random_mask(model, cfg.ratio, cfg.exclude, seed)
        else:
            mask = piece_mask(model, task, method, cfg, seed)
        named = dict(model.named_parameters())
        for n, p in named.items():  # frozen tensors need no gradient: less backward work
            p.requires_grad_(n in mask)
        params = [named[n] for n in mask]
        idxs = [mask[n].long() for n in mask]
        opt = SparseAdamW(
            [(n, named[n]) for n in mask], mask=mask, lr=lr, betas=betas, weight_decay=0.0
        )
    else:
        raise ValueError(f"method {method!r} is unknown; choose from {METHODS}")
    model.train()
    bar = tqdm(
        _batches(task, cfg.steps, cfg.batch, seed),
        total=cfg.steps,
        desc=desc,
        disable=not progress,
        leave=False,
    )
    for b in bar:
        loss = model(**b).loss
        loss.backward()
        _clip_selected_(params, idxs, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if method == "seqlora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return model, mask


# -- one method over the task sequence --------------------------------------------------------


def run_method(
    method: str,
    base: nn.Module,
    tasks: list[TaskData],
    cfg: DemoConfig,
    general: Tensor,
    split: str = "test",
    lr: float | None = None,
    delta_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Learn ``tasks`` in order with ``method``; scores on ``split`` ("test" or "val")."""
    lr = cfg.lr[FAMILY[method]] if lr is None else lr
    model = copy.deepcopy(base)
    T = len(tasks)
    matrix: list[list[float | None]] = [[None] * T for _ in range(T)]
    gen = [next_token_accuracy(model, general)]
    deltas = []
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        before = {n: p.detach().clone() for n, p in model.named_parameters()} if delta_dir else None
        model, mask = train_stage(
            model,
            method,
            task,
            cfg,
            lr,
            seed=cfg.seed * 1000 + i,
            progress=progress,
            desc=f"{method} task {i + 1}/{T} {task.name}",
        )
        for j in range(i + 1):
            matrix[i][j] = exact_match(model, getattr(tasks[j], split), cfg.max_new)
        gen.append(next_token_accuracy(model, general))
        if delta_dir is not None and mask is not None:
            path = delta_dir / method / f"task{i + 1}-{task.name}.safetensors"
            info = save_delta(before, model, path, mask=mask)
            deltas.append({"task": task.name, "path": str(path), **info})
    op, bwt = op_bwt(matrix)
    return {
        "lr": lr,
        "op": op,
        "bwt": bwt,
        "general_after": gen[-1],
        "general": gen,
        "matrix": matrix,
        "seconds": time.perf_counter() - t0,
        "deltas": deltas,
        "model": model,
    }


def op_bwt(matrix: list[list[float | None]]) -> tuple[float, float]:
    """TRACE's OP and BWT from ``matrix[i][j]`` = score on task j after learning task i.

    OP = mean_j R[T-1][j]; BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (0.0 for one task).
    """
    T = len(matrix)
    if T == 0 or any(len(row) != T for row in matrix):
        raise ValueError("matrix must be square (T stages x T tasks) and non-empty")
    final = matrix[T - 1]
    if any(v is None for v in final) or any(matrix[j][j] is None for j in range(T)):
        raise ValueError("matrix lacks the final row or a diagonal entry")
    op = sum(final) / T
    bwt = sum(final[j] - matrix[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    return op, bwt


def setup(cfg: DemoConfig, progress: bool = True) -> tuple[nn.Module, list[TaskData], dict, dict]:
    """Corpus, pretrained model, tasks, general windows (``{"val", "test"}``)."""
    corpus = general_corpus(max_bytes=3_000_000 if cfg.size != "tiny" else 200_000)
    model, info = pretrained_model(
        cfg.size,
        corpus,
        cfg.pretrain_steps,
        seed=cfg.seed,
        use_cache=cfg.use_cache,
        progress=progress,
    )
    tasks = [make_task(t, cfg.n_train, cfg.n_eval, cfg.seed) for t in cfg.tasks]
    windows = {s: general_windows(corpus, s, cfg.n_general) for s in ("val", "test")}
    return model, tasks, windows, info


_ORIGIN = {True: "loaded from cache", "shipped": "shipped weights", False: "trained"}


def run_benchmark(
    cfg: DemoConfig,
    methods: tuple[str, ...] = METHODS,
    out: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every method; returns the results dict written to ``results.json``."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods {bad} are unknown; choose from {METHODS}")
    t0 = time.perf_counter()
    base, tasks, windows, info = setup(cfg, progress)
    log(
        f"pretrained model: {_ORIGIN[info['cached']]} "
        f"({info['path']}), {sum(p.numel() for p in base.parameters()):,} parameters"
    )
    g0 = next_token_accuracy(base, windows["test"])
    results: dict = {
        "config": asdict(cfg),
        "general_before": g0,
        "tasks": [t.name for t in tasks],
        "methods": {},
    }
    for m in methods:
        r = run_method(
            m,
            base,
            tasks,
            cfg,
            windows["test"],
            delta_dir=(out / "deltas") if out is not None else None,
            progress=progress,
        )
        model = r.pop("model")
        if r["deltas"] and m == "piece-s":
            results["revert_check"] = _revert_check(model, base, r["deltas"])
        results["methods"][m] = r
        log(
            f"  {m:8s} OP {r['op']:.3f}  BWT {r['bwt']:+.3f}  general {g0:.3f} -> "
            f"{r['general_after']:.3f}  ({r['seconds']:.0f} s)"
        )
    results["seconds"] = time.perf_counter() - t0
    results["_base_state"] = base.state_dict()
    return results


def _revert_check(model: nn.Module, base: nn.Module, deltas: list[dict]) -> bool:
    """Revert every task's delta, last first: do we get the pretrained weights bit-exactly?"""
    for d in reversed(deltas):
        revert_delta(model, d["path"])
    ref = dict(base.named_parameters())
    return all(torch.equal(p, ref[n]) for n, p in model.named_parameters())


def with_overrides(cfg: DemoConfig, **kw) -> DemoConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
