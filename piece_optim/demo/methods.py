"""The continual-learning benchmark: one pretrained model, a task sequence, the methods.

Every method sees the same tasks in the same order with the same budget (``steps``
optimizer steps of ``batch`` examples per task, constant lr, grad-norm clip 1.0, AdamW
betas (0.9, 0.95), no weight decay, fresh optimizer state per task), as in the paper:

* ``seqft``   full fine-tuning with ``torch.optim.AdamW``;
* ``seqlora`` a fresh peft LoRA adapter per task on every linear layer of the blocks,
  merged into the weights after the task;
* ``random``  SparseAdamW on a uniformly random mask of the same size as PIECE's;
* ``random-low`` a random mask drawn among the ``low_pool`` x k entries least important
  for general text (reference Fisher on stdlib *train* windows, current model): the
  control any protective rule must beat;
* ``piece-f`` / ``piece-s`` SparseAdamW on the global top-``ratio`` entries by PIECE-F /
  PIECE-S importance, recomputed on each new task's training data with the current
  model.  Embeddings and the LM head never train (``exclude``), as in the paper;
* ``piece-ref`` / ``piece-self`` protective PIECE-S (beyond the paper): the reference
  Fisher joins the score's denominator (:meth:`ImportanceEstimator.select`,
  ``reference=``), estimated on held-out general text (stdlib *train* windows) or, with
  no outside data, on text sampled from the current model before the task.

After each task every task seen so far is scored (exact match on its test split) and
general ability is measured (next-byte accuracy on held-out stdlib files).  OP, BWT and
LA as TRACE defines them: ``R[i][j]`` = score on task j after learning task i;
OP = mean_j R[T-1][j]; BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]); LA = mean_j R[j][j].

A method name may carry overrides of :class:`DemoConfig` fields for that method alone,
``name:field=value[:field=value]`` (e.g. ``piece-s:eps=1e-8``, ``piece-ref:ref_weight=10``):
that is how the variants in ``docs/demo.md`` were run.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import importance as _imp
from ..delta import revert_delta, save_delta
from ..importance import ImportanceEstimator, SelectionWarning
from ..mask import SparseMask
from ..optim import SparseAdamW
from ..protect import sample_tokens
from .data import NEWLINE, TaskData, collate, fixed_windows, general_corpus, make_task
from .model import exact_match, general_windows, next_token_accuracy, pretrained_model

METHODS = (
    "seqft",
    "seqlora",
    "random",
    "random-low",
    "piece-f",
    "piece-s",
    "piece-ref",
    "piece-self",
)
DEFAULT_METHODS = ("seqft", "seqlora", "random", "piece-f", "piece-s")  # plain `demo`
FAMILY = {
    "seqft": "full",
    "seqlora": "lora",
    "random": "sparse",
    "random-low": "sparse",
    "piece-f": "sparse",
    "piece-s": "sparse",
    "piece-ref": "sparse",
    "piece-self": "sparse",
}
SPARSE = tuple(m for m, f in FAMILY.items() if f == "sparse")
REFERENCE = {"random-low": "general", "piece-ref": "general", "piece-self": "self"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    """Everything that defines a run.  ``preset()`` gives the default / quick / tiny ones.

    ``seed`` changes the training randomness (data order, calibration batches, random
    masks, LoRA init, the model's samples); ``data_seed`` makes the tasks' examples, so
    every seed is scored on the same test prompts.
    """

    size: str = "small"
    pretrain_steps: int = 1500
    tasks: tuple[str, ...] = ("sentiment", "topic", "parity")
    n_train: int = 2000
    n_eval: int = 100
    steps: int = 150
    batch: int = 16
    ratio: float = 1e-2
    eps: float | str = "auto"
    tie_break: str = "magnitude"
    calib_batches: int = 16
    # reference importance (random-low, piece-ref, piece-self): ref_batches x batch windows
    # of ref_len bytes, general text or the model's own samples; weight w of the score
    ref_batches: int = 8
    ref_len: int = 128
    ref_weight: float = 1.0
    # piece-ref / piece-self: add every earlier task's Fisher to the reference (from the
    # calibration pass that chose its mask, before learning it; no data kept)
    ref_memory: bool = False
    # piece-ref / piece-self: the task score ranks among the ref_pool x k entries of lowest
    # reference Fisher (ImportanceEstimator.select(reference_pool=), random-low's pool);
    # 0: the reference joins the denominator with weight ref_weight instead.  Chosen on
    # validation (docs/demo.md): the pool kept the most general ability of the variants.
    ref_pool: float = 3.0
    low_pool: float = 3.0
    lora_r: int = 8
    lr: dict[str, float] = field(
        default_factory=lambda: {"full": 1e-4, "lora": 1e-3, "sparse": 3e-3}
    )
    exclude: tuple[str, ...] = ("embed", "lm_head")
    n_general: int = 48
    max_new: int = 14
    seed: int = 0
    data_seed: int = 0
    use_cache: bool = True


# Pretraining steps per base-model size: the same recipe for both (medium: ~20 min on 2 idle cores).
PRETRAIN_STEPS = {"small": 1500, "medium": 1500}


def preset(name: str, size: str | None = None) -> DemoConfig:
    """``"default"`` (<= 10 min on 2 CPU cores), ``"quick"`` (<= 3 min), ``"tiny"`` (tests).

    ``size`` ("small" or "medium") picks the base model; None keeps the preset's.
    """
    if size is not None and size not in PRETRAIN_STEPS:
        raise ValueError(f"size {size!r} is unknown; choose from {sorted(PRETRAIN_STEPS)}")
    if name in ("default", "quick") and size is not None:
        base = DemoConfig(size=size, pretrain_steps=PRETRAIN_STEPS[size])
    else:
        base = DemoConfig()
    if name == "default":
        return base
    if name == "quick":
        return replace(
            base, steps=60, n_eval=40, n_train=1000, calib_batches=4, ref_batches=4, n_general=24
        )
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
            ref_batches=1,
            ref_len=16,
            n_general=2,
            use_cache=False,
        )
    raise ValueError(f"preset {name!r} is unknown; choose 'default', 'quick' or 'tiny'")


# -- method names with per-method overrides ---------------------------------------------------


def parse_method(spec: str) -> tuple[str, dict]:
    """``"piece-s:eps=1e-8:tie_break=position"`` -> ``("piece-s", {"eps": 1e-8, ...})``.

    Values are parsed as the type of the :class:`DemoConfig` field they override.
    """
    name, *parts = spec.split(":")
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; choose from {','.join(METHODS)}")
    fields = {f.name: f for f in DemoConfig.__dataclass_fields__.values()}
    kw: dict = {}
    for part in parts:
        key, sep, val = part.partition("=")
        if not sep or key not in fields or key in ("size", "tasks", "seed", "data_seed"):
            raise ValueError(f"method override {part!r} in {spec!r}: expected field=value")
        default = getattr(DemoConfig(), key)
        if key == "eps":
            kw[key] = val if val.startswith("auto") else float(val)
        elif isinstance(default, str):
            kw[key] = val
        elif isinstance(default, bool):
            kw[key] = val.lower() in ("1", "true", "yes")
        else:
            kw[key] = type(default)(float(val)) if isinstance(default, int) else float(val)
    return name, kw


def method_config(spec: str, cfg: DemoConfig) -> tuple[str, DemoConfig]:
    name, kw = parse_method(spec)
    return name, replace(cfg, **kw) if kw else cfg


# -- masks -------------------------------------------------------------------------------


def _batches(task: TaskData, steps: int, batch: int, seed: int):
    rng = random.Random(seed)
    for _ in range(steps):
        yield collate(rng.sample(task.train, batch))


def _eligible(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not any(s in n for s in exclude)}


def _mask_from_flat(model: nn.Module, flat: Tensor, exclude: tuple[str, ...]) -> SparseMask:
    """Sorted flat positions over the eligible tensors (in order) -> a SparseMask."""
    total = sum(p.numel() for p in model.parameters())
    elig = _eligible(model, exclude)
    out, start = {}, 0
    for name, p in elig.items():
        n = p.numel()
        sel = flat[(flat >= start) & (flat < start + n)] - start
        if sel.numel():
            out[name] = sel
        start += n
    return SparseMask(out, {n: tuple(elig[n].shape) for n in out}, total)


def random_mask(model: nn.Module, ratio: float, exclude: tuple[str, ...], seed: int) -> SparseMask:
    """k = int(ratio * total) entries drawn uniformly from the non-excluded parameters."""
    total = sum(p.numel() for p in model.parameters())
    n_elig = sum(p.numel() for p in _eligible(model, exclude).values())
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_elig, generator=g)[: int(ratio * total)].sort().values
    return _mask_from_flat(model, flat, exclude)


def random_low_mask(
    model: nn.Module, fisher: dict[str, Tensor], ratio: float, pool: float, exclude, seed: int
) -> SparseMask:
    """k entries drawn uniformly among the ``pool`` x k eligible entries with the lowest
    reference Fisher (ties by position: a stable sort)."""
    total = sum(p.numel() for p in model.parameters())
    k = int(ratio * total)
    elig = _eligible(model, exclude)
    f = torch.cat([fisher[n].reshape(-1) for n in elig])
    n_pool = min(f.numel(), max(k, int(pool * k)))
    low = torch.sort(f, stable=True).indices[:n_pool]
    g = torch.Generator().manual_seed(seed)
    flat = low[torch.randperm(n_pool, generator=g)[:k]].sort().values
    return _mask_from_flat(model, flat, exclude)


def reference_fisher(
    model: nn.Module, kind: str, cfg: DemoConfig, general_text: Tensor, seed: int
) -> tuple[dict[str, Tensor], float]:
    """Per-term Fisher of the current model on reference text, and the seconds it took.

    ``kind="general"``: ``ref_batches x batch`` windows of ``ref_len`` bytes of the stdlib
    *train* split (the pretraining distribution; never the held-out files general ability
    is measured on).  ``kind="self"``: as many sequences sampled from the model itself
    (temperature 1, each from a newline), the data-free variant.  Loss on every byte.
    """
    t0 = time.perf_counter()
    n = cfg.ref_batches * cfg.batch
    if kind == "general":
        ids = fixed_windows(general_text, n, cfg.ref_len, seed=seed + 11)
    elif kind == "self":
        prompt = torch.tensor([NEWLINE])
        ids = sample_tokens(model, n, cfg.ref_len - 1, prompt=prompt, batch_size=64, seed=seed)
    else:
        raise ValueError(f"reference kind {kind!r} is unknown; choose 'general' or 'self'")
    model.train()
    with ImportanceEstimator(model, method="piece-f", exclude=cfg.exclude) as est:
        for x in ids.split(cfg.batch):
            model(input_ids=x, labels=x).loss.backward()
            est.collect()
        fisher = est.fisher()
    return fisher, time.perf_counter() - t0


def combine_fishers(fishers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Sum of Fishers, each first divided by its median nonzero entry (their scales are
    unrelated: general text vs a task's answers), so each counts alike."""
    out: dict[str, Tensor] = {}
    for f in fishers:
        flat = torch.cat([t.reshape(-1) for t in f.values()])
        pos = flat[flat > 0]
        med = float(pos.median()) if pos.numel() else 1.0
        for n, t in f.items():
            out[n] = out[n] + t / med if n in out else t / med
    return out


def piece_mask(
    model: nn.Module,
    task: TaskData,
    method: str,
    cfg: DemoConfig,
    seed: int,
    reference: dict[str, Tensor] | None = None,
) -> tuple[SparseMask, dict]:
    """PIECE importance on ``calib_batches`` batches of the task's training data; returns
    the mask and the estimator's selection report."""
    model.train()
    algo = "piece-f" if method == "piece-f" else "piece-s"
    eps, auto = _eps_setting(cfg.eps)
    with ImportanceEstimator(model, method=algo, eps=eps, exclude=cfg.exclude) as est:
        for b in _batches(task, cfg.calib_batches, cfg.batch, seed + 7):
            model(**b).loss.backward()
            est.collect()
        with warnings.catch_warnings(), _auto_eps(*auto):
            warnings.simplefilter("ignore", SelectionWarning)  # the report carries it
            pool = cfg.ref_pool if cfg.ref_pool > 0 and reference is not None else None
            mask = est.select(
                ratio=cfg.ratio,
                tie_break=cfg.tie_break,
                reference=reference,
                reference_weight=None if pool is not None or reference is None else cfg.ref_weight,
                reference_pool=pool,
            )
        report = asdict(est.last_selection)
        if cfg.ref_memory and method in ("piece-ref", "piece-self"):
            # Before learning the task: after it, its loss and gradients are near zero and
            # their Fisher ranks noise (measured: memory from the post-task Fisher left BWT at
            # -0.58 .. -0.66 at lr 3e-3, validation)
            report["task_fisher"] = est.fisher()
        return mask, report


def _eps_setting(eps: float | str) -> tuple[float | str, tuple[float, float]]:
    """``"auto@Q"`` / ``"auto@QxF"`` (the variants measured in docs/demo.md): eps="auto"
    with quantile Q and fraction F instead of the package's defaults."""
    if isinstance(eps, str) and eps.startswith("auto@"):
        q, _, f = eps[5:].partition("x")
        return "auto", (float(q), float(f or 1.0))
    return eps, (_imp.EPS_AUTO_QUANTILE, _imp.EPS_AUTO_FRACTION)


@contextlib.contextmanager
def _auto_eps(quantile: float, fraction: float):
    old = _imp.EPS_AUTO_QUANTILE, _imp.EPS_AUTO_FRACTION
    _imp.EPS_AUTO_QUANTILE, _imp.EPS_AUTO_FRACTION = quantile, fraction
    try:
        yield
    finally:
        _imp.EPS_AUTO_QUANTILE, _imp.EPS_AUTO_FRACTION = old


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


# -- training one stage ------------------------------------------------------------------


def train_stage(
    model: nn.Module,
    method: str,
    task: TaskData,
    cfg: DemoConfig,
    lr: float,
    seed: int,
    progress: bool = True,
    desc: str = "",
    general_text: Tensor | None = None,
    memory: list[dict[str, Tensor]] | None = None,
) -> tuple[nn.Module, SparseMask | None, dict]:
    """Train ``model`` on ``task``; returns the (possibly new) model object, the mask and
    what the mask step reported (selection info, reference seconds).  ``memory``: earlier
    tasks' Fishers, added to the reference of piece-ref / piece-self (``ref_memory``)."""
    mask = None
    report: dict = {}
    betas = (0.9, 0.95)
    if method == "seqlora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
        torch.manual_seed(seed)  # the LoRA A init
        model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        idxs: list[Tensor | None] = [None] * len(params)
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    elif method == "seqft":
        params = list(model.parameters())
        idxs = [None] * len(params)
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    elif method in SPARSE:
        fisher = None
        if method in REFERENCE:
            if REFERENCE[method] == "general" and general_text is None:
                raise ValueError(f"method {method!r} needs general_text (the stdlib train split)")
            fisher, report["reference_seconds"] = reference_fisher(
                model, REFERENCE[method], cfg, general_text, seed
            )
            if memory and method != "random-low":
                fisher = combine_fishers([fisher, *memory])
        if method == "random":
            mask = random_mask(model, cfg.ratio, cfg.exclude, seed)
        elif method == "random-low":
            mask = random_low_mask(model, fisher, cfg.ratio, cfg.low_pool, cfg.exclude, seed)
        else:
            mask, sel = piece_mask(model, task, method, cfg, seed, fisher)
            if "task_fisher" in sel:
                report["task_fisher"] = sel.pop("task_fisher")
            report["selection"] = sel
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
    return model, mask, report


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
    general_text: Tensor | None = None,
) -> dict:
    """Learn ``tasks`` in order with ``method`` (a name, possibly with overrides, see
    :func:`parse_method`); scores on ``split`` ("test" or "val")."""
    spec = method
    method, cfg = method_config(spec, cfg)
    lr = cfg.lr[FAMILY[method]] if lr is None else lr
    model = copy.deepcopy(base)
    T = len(tasks)
    matrix: list[list[float | None]] = [[None] * T for _ in range(T)]
    gen = [next_token_accuracy(model, general)]
    deltas, reports = [], []
    memory: list[dict[str, Tensor]] = []
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        before = {n: p.detach().clone() for n, p in model.named_parameters()} if delta_dir else None
        model, mask, report = train_stage(
            model,
            method,
            task,
            cfg,
            lr,
            seed=cfg.seed * 1000 + i,
            progress=progress,
            desc=f"{spec} task {i + 1}/{T} {task.name}",
            general_text=general_text,
            memory=memory,
        )
        reports.append(report)
        if cfg.ref_memory and "task_fisher" in report:
            memory.append(report.pop("task_fisher"))
        for j in range(i + 1):
            matrix[i][j] = exact_match(model, getattr(tasks[j], split), cfg.max_new)
        gen.append(next_token_accuracy(model, general))
        if delta_dir is not None and mask is not None:
            path = delta_dir / spec.replace(":", "_") / f"task{i + 1}-{task.name}.safetensors"
            info = save_delta(before, model, path, mask=mask)
            deltas.append({"task": task.name, "path": str(path), **info})
    op, bwt = op_bwt(matrix)
    return {
        "lr": lr,
        "op": op,
        "bwt": bwt,
        "la": learning_accuracy(matrix),
        "general_after": gen[-1],
        "general": gen,
        "matrix": matrix,
        "seconds": time.perf_counter() - t0,
        "deltas": deltas,
        "stages": reports,
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


def learning_accuracy(matrix: list[list[float | None]]) -> float:
    """LA = mean_j R[j][j]: each task's score right after learning it."""
    diag = [matrix[j][j] for j in range(len(matrix))]
    if not diag or any(v is None for v in diag):
        raise ValueError("matrix lacks a diagonal entry")
    return sum(diag) / len(diag)


def op_floor(tasks: list[TaskData], split: str = "test") -> float:
    """OP of answering every prompt of each task with that task's most frequent answer
    (on ``split``): what the answer format alone scores."""
    fracs = []
    for t in tasks:
        answers = [a for _, a in getattr(t, split)]
        fracs.append(max(answers.count(a) for a in set(answers)) / len(answers))
    return sum(fracs) / len(fracs)


@dataclass
class Bench:
    """What every run shares: the pretrained model, the tasks, the general windows
    (``{"val", "test"}``), the stdlib train split (reference text) and the model info."""

    base: nn.Module
    tasks: list[TaskData]
    windows: dict[str, Tensor]
    general_text: Tensor
    info: dict


def setup(cfg: DemoConfig, progress: bool = True) -> Bench:
    """Corpus, pretrained model, tasks, general windows."""
    corpus = general_corpus(max_bytes=3_000_000 if cfg.size != "tiny" else 200_000)
    model, info = pretrained_model(
        cfg.size,
        corpus,
        cfg.pretrain_steps,
        seed=0,
        use_cache=cfg.use_cache,
        progress=progress,
    )
    tasks = [make_task(t, cfg.n_train, cfg.n_eval, cfg.data_seed) for t in cfg.tasks]
    windows = {s: general_windows(corpus, s, cfg.n_general) for s in ("val", "test")}
    return Bench(model, tasks, windows, corpus["train"], info)


_ORIGIN = {True: "loaded from cache", "shipped": "shipped weights", False: "trained"}


def describe(bench: Bench) -> str:
    n = sum(p.numel() for p in bench.base.parameters())
    origin = _ORIGIN[bench.info["cached"]]
    return f"pretrained model: {origin} ({bench.info['path']}), {n:,} parameters"


def start(
    cfg: DemoConfig, methods: tuple[str, ...], progress: bool, log: Callable[[str], None]
) -> Bench:
    """The start of a demo run: every method spec checked (before any work), the benchmark
    set up, and the model it uses logged."""
    for m in methods:
        parse_method(m)
    bench = setup(cfg, progress)
    log(describe(bench))
    return bench


def run_benchmark(
    cfg: DemoConfig,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    out: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every method once at its family's lr; returns the dict written to results.json."""
    t0 = time.perf_counter()
    bench = start(cfg, methods, progress, log)
    base = bench.base
    g0 = next_token_accuracy(base, bench.windows["test"])
    results: dict = {
        "config": asdict(cfg),
        "general_before": g0,
        "op_floor": op_floor(bench.tasks, "test"),
        "tasks": [t.name for t in bench.tasks],
        "methods": {},
    }
    for m in methods:
        r = run_method(
            m,
            base,
            bench.tasks,
            cfg,
            bench.windows["test"],
            delta_dir=(out / "deltas") if out is not None else None,
            progress=progress,
            general_text=bench.general_text,
        )
        model = r.pop("model")
        if r["deltas"] and m == "piece-s":
            results["revert_check"] = _revert_check(model, base, r["deltas"])
        results["methods"][m] = r
        log(
            f"  {m:10s} OP {r['op']:.3f}  BWT {r['bwt']:+.3f}  LA {r['la']:.3f}  general "
            f"{g0:.3f} -> {r['general_after']:.3f}  ({r['seconds']:.0f} s)"
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
