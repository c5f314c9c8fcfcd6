"""The demo model: a small LLaMA built from a ``transformers`` config, pretrained on stdlib.

Sizes live in :data:`SIZES`; ``"tiny"`` is for tests only.  Pretraining is cached under
``~/.cache/piece_optim/demo`` (``PIECE_OPTIM_CACHE`` overrides), keyed by everything
that changes the weights (size, steps, seed, corpus bytes, torch/transformers versions).

Shipped weights.  The default model (``small``, 1,500 pretraining steps, seed 0) takes
about 3 minutes to pretrain on 2 CPU cores, which alone would break the ``--quick``
budget on a fresh machine; so its weights ship with the package
(``piece_optim/demo/weights/``, 3.7 MB fp32, made by :func:`pretrain` with this code on
CPython 3.11's stdlib, torch 2.13 CPU) and are used when no cached model matches.  So do
the ``medium`` model's (5.2M parameters, same recipe, 27 CPU-minutes of pretraining on
one core of this machine), in bf16 (10.5 MB) to keep the repository small.  The
file's metadata records the configuration it was trained with; a file whose
configuration differs is never used.  ``piece-optim demo --no-cache`` ignores both and
pretrains from scratch (nothing is downloaded either way).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import NEWLINE, VOCAB_SIZE, decode, encode, fixed_windows


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_len: int = 256


SIZES: dict[str, ModelSize] = {
    "small": ModelSize(hidden=128, layers=4, heads=4, intermediate=384),
    "medium": ModelSize(hidden=256, layers=6, heads=8, intermediate=768),
    "tiny": ModelSize(hidden=32, layers=2, heads=2, intermediate=64, max_len=128),
}


def build_model(size: str | ModelSize, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (untied embeddings, byte vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size] if isinstance(size, str) else size
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=s.max_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=NEWLINE,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def cache_dir() -> Path:
    return Path(os.environ.get("PIECE_OPTIM_CACHE", Path.home() / ".cache" / "piece_optim"))


PRETRAIN_LR = 2e-3


def pretrain(
    model: nn.Module,
    train: Tensor,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float = PRETRAIN_LR,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Next-byte pretraining on random windows of ``train``: AdamW, warmup + cosine."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)),
    )
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="pretrain on stdlib", disable=not progress, leave=False)
    for _ in bar:
        starts = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=g)
        x = torch.stack([train[s : s + seq_len] for s in starts.tolist()]).long()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_config(size: str, steps: int, batch: int, seq_len: int, seed: int) -> dict:
    """What a shipped weights file must have been trained with to be used."""
    return {"size": asdict(SIZES[size]), "steps": steps, "batch": batch, "seq_len": seq_len,
            "seed": seed, "lr": PRETRAIN_LR}  # fmt: skip


def shipped_weights(size: str, steps: int, batch: int, seq_len: int, seed: int) -> Path | None:
    """The shipped weights file for this configuration, or None (see the module doc)."""
    from safetensors import safe_open

    path = WEIGHTS_DIR / f"{size}-steps{steps}-seed{seed}.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("config")
    want = shipped_config(size, steps, batch, seq_len, seed)
    return path if meta is not None and json.loads(meta) == want else None


def save_shipped(model: nn.Module, size: str, steps: int, batch: int = 16, seq_len: int = 128,
                 seed: int = 0, info: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """Write ``model``'s weights as the shipped file for this configuration (maintainers).

    ``dtype=torch.bfloat16`` halves the file (the medium model: 10.5 MB instead of 21);
    loading upcasts to the model's fp32, so a run from the shipped file starts from the
    bf16-rounded weights (the documented medium results do).
    """
    from safetensors.torch import save_file

    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    path = WEIGHTS_DIR / f"{size}-steps{steps}-seed{seed}.safetensors"
    meta = {"config": json.dumps(shipped_config(size, steps, batch, seq_len, seed))}
    meta.update({k: str(v) for k, v in (info or {}).items()})
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def pretrained_model(
    size: str,
    corpus: dict[str, Tensor],
    steps: int,
    batch: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Build and pretrain (or load from the cache) the general model.

    Returns ``(model, info)``; ``info["cached"]`` says whether the cache was used.
    """
    import transformers
    from safetensors.torch import load_file, save_file

    key_src = json.dumps(
        {
            "size": asdict(SIZES[size]),
            "steps": steps,
            "batch": batch,
            "seq_len": seq_len,
            "seed": seed,
            "corpus": hashlib.sha1(corpus["train"].numpy().tobytes()).hexdigest(),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = cache_dir() / "demo" / f"{size}-{key}.safetensors"
    model = build_model(size, seed)
    if use_cache:  # a model pretrained here first, then the shipped one
        src = path if path.exists() else shipped_weights(size, steps, batch, seq_len, seed)
        if src is not None:
            model.load_state_dict(load_file(str(src)))
            model.eval()
            return model, {"cached": True if src == path else "shipped", "path": str(src)}
    losses = pretrain(model, corpus["train"], steps, batch, seq_len, seed=seed, progress=progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    return model, {"cached": False, "path": str(path), "final_loss": losses[-1]}


@torch.no_grad()
def next_token_accuracy(model: nn.Module, windows: Tensor, batch: int = 32) -> float:
    """Fraction of bytes (positions 1..L-1 of each window) the model predicts exactly."""
    model.eval()
    hit = tot = 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        pred = model(input_ids=x, use_cache=False).logits[:, :-1].argmax(-1)
        hit += int((pred == x[:, 1:]).sum())
        tot += pred.numel()
    return hit / tot


def general_windows(corpus: dict[str, Tensor], split: str, n: int, length: int = 128) -> Tensor:
    return fixed_windows(corpus[split], n, length, seed={"val": 1, "test": 2}[split])


@torch.no_grad()
def exact_match(
    model: nn.Module, pairs: list[tuple[str, str]], max_new: int = 14, batch: int = 64
) -> float:
    """Greedy-decode each prompt until ``"\\n"``; score = fraction equal to the answer.

    Prompts are grouped by byte length so no batch needs padding; each group is decoded
    with the KV cache (one prompt pass, then one token per step: 3-4x faster than
    re-running the sequence, and the same answers up to fp32 rounding).  Generation
    stops after ``min(max_new, longest answer + 1)`` bytes: a longer output cannot match
    any answer, so the cap changes no score and saves decoding steps.
    """
    model.eval()
    max_new = min(max_new, max((len(encode(a)) + 1 for _, a in pairs), default=1))
    groups: dict[int, list[tuple[list[int], str]]] = {}
    for p, a in pairs:
        ids = encode(p)
        groups.setdefault(len(ids), []).append((ids, a))
    hit = 0
    for items in groups.values():
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            out = _greedy(model, torch.tensor([ids for ids, _ in chunk]), max_new)
            for row, (_, a) in zip(out.tolist(), chunk, strict=True):
                text = decode(row[: row.index(NEWLINE)] if NEWLINE in row else row)
                hit += int(NEWLINE in row and text == a)
    return hit / len(pairs)


def _greedy(model: nn.Module, x: Tensor, max_new: int) -> Tensor:
    """Up to ``max_new`` greedy tokens after ``x`` (stops once every row has a newline)."""
    out = torch.empty(x.shape[0], 0, dtype=torch.long)
    done = torch.zeros(x.shape[0], dtype=torch.bool)
    res = model(input_ids=x, use_cache=True)
    for step in range(max_new):
        nxt = res.logits[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == NEWLINE
        if bool(done.all()) or step == max_new - 1:
            break
        res = model(input_ids=nxt[:, None], cache=res.cache, use_cache=True)
    return out
