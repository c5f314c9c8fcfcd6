"""Data for the continual-learning demo: a byte tokenizer, the general corpus, the tasks.

Everything is made locally and deterministically, with no download:

* **Tokenizer**: raw UTF-8 bytes (vocab 256).  Nothing to train or ship, and the same on
  every machine.
* **General corpus**: the Python standard library's own ``.py`` sources (tests and
  ``site-packages`` left out), split *by file* into train / validation / test with a
  stable hash of the relative path, so held-out files are never seen in pretraining.
  General ability = next-token accuracy on windows of the held-out files ("programming
  ability", the role HumanEval plays in the paper).
* **Tasks**: short instruction -> answer pairs, each answer ended by ``"\\n"``; the loss
  is on answer tokens only and the score is exact match of the greedy answer.  The
  tasks are plain English / digits, far from Python source, so fitting them pulls the
  model away from its pretraining distribution (that is what makes SeqFT forget).
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
NEWLINE = 10
IGNORE = -100


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


# -- general corpus ------------------------------------------------------------------------


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without tests and site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for d, dirs, names in os.walk(root):  # prune while walking: site-packages can be huge
        dirs[:] = [x for x in dirs if x not in skip]
        files += [Path(d) / n for n in names if n.endswith(".py")]
    if not files:
        raise RuntimeError(f"no Python source files found under {root}; is the stdlib there?")
    return sorted(files, key=lambda f: str(f.relative_to(root)))


def _split_of(rel: str) -> str:
    h = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def general_corpus(max_bytes: int = 3_000_000, root: str | Path | None = None) -> dict[str, Tensor]:
    """``{"train", "val", "test"}`` -> uint8 tensor of concatenated file bytes.

    Split by file (stable hash of the path: 80/10/10).  Each split is capped at
    ``max_bytes`` (train) or ``max_bytes // 8`` (val/test), taking files in path order.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    size = {"train": 0, "val": 0, "test": 0}
    cap = {"train": max_bytes, "val": max_bytes // 8, "test": max_bytes // 8}
    for f in stdlib_files(root):
        split = _split_of(str(f.relative_to(root)))
        if size[split] >= cap[split]:
            continue
        data = f.read_bytes()
        parts[split].append(data)
        size[split] += len(data)
    out = {}
    for split, chunks in parts.items():
        buf = b"\n".join(chunks)[: cap[split]]
        if len(buf) < 4096:
            raise RuntimeError(f"stdlib split {split!r} too small ({len(buf)} bytes)")
        out[split] = torch.frombuffer(bytearray(buf), dtype=torch.uint8).clone()
    return out


def fixed_windows(data: Tensor, n: int, length: int, seed: int) -> Tensor:
    """``n`` windows of ``length`` bytes at seeded random offsets (int64, [n, length])."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - length - 1, (n,), generator=g)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()


# -- tasks ---------------------------------------------------------------------------------

_POS = [
    "great",
    "wonderful",
    "superb",
    "lovely",
    "brilliant",
    "delightful",
    "excellent",
    "charming",
    "moving",
    "fun",
]
_NEG = [
    "awful",
    "boring",
    "dreadful",
    "dull",
    "terrible",
    "bland",
    "painful",
    "weak",
    "clumsy",
    "tedious",
]
_NOUNS = ["film", "plot", "cast", "story", "ending", "score", "script", "pacing"]
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.random() < 0.5
    words = _POS if label else _NEG
    a, b = rng.sample(words, 2)
    n1, n2 = rng.sample(_NOUNS, 2)
    return f"review: the {n1} was {a}, the {n2} {b}.\nsentiment:", (
        " positive" if label else " negative"
    )


def _dates(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"date {d} {_MONTHS[m - 1]} {y} ->", f" {y}-{m:02d}-{d:02d}"


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a} and {b} =", f" {a + b}"


_TOPICS = {
    "sports": ["goal", "match", "coach", "league", "striker", "season", "referee", "title"],
    "science": ["atom", "genome", "telescope", "cell", "laser", "fossil", "vaccine", "orbit"],
    "food": ["bread", "cheese", "soup", "pasta", "spice", "bakery", "recipe", "dessert"],
}


def _topic(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(_TOPICS))
    a, b = rng.sample(_TOPICS[topic], 2)
    verb = rng.choice(["meets", "beats", "changes", "surprises", "follows"])
    return f"headline: new {a} {verb} old {b}\ntopic:", " " + topic


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 9999)
    return f"is {n} odd or even?", " odd" if n % 2 else " even"


def _upper(rng: random.Random) -> tuple[str, str]:
    w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    return f"upper {w} ->", " " + w.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
    return f"reverse {w} ->", " " + w[::-1]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "sentiment": _sentiment,
    "dates": _dates,
    "addition": _addition,
    "reverse": _reverse,
    "upper": _upper,
    "topic": _topic,
    "parity": _parity,
}
"""Task name -> generator of one (prompt, answer) pair.  Answers get a final ``"\\n"``."""


@dataclass
class TaskData:
    """One task's train / validation / test examples as (prompt, answer) strings."""

    name: str
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]


def make_task(name: str, n_train: int, n_eval: int, seed: int) -> TaskData:
    """Deterministic examples; test and validation prompts never occur in train."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} is unknown; choose from {sorted(TASKS)}")
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train={n_train} and n_eval={n_eval} must be >= 1")
    rng = random.Random(f"{name}/{seed}")
    gen = TASKS[name]
    held: dict[str, str] = {}
    tries = 0
    while len(held) < 2 * n_eval:
        p, a = gen(rng)
        held.setdefault(p, a)
        tries += 1
        if tries > 100 * n_eval:
            raise RuntimeError(f"task {name!r} cannot make {2 * n_eval} distinct prompts")
    items = list(held.items())
    val, test = items[:n_eval], items[n_eval:]
    train = []
    while len(train) < n_train:
        p, a = gen(rng)
        if p not in held:
            train.append((p, a))
    return TaskData(name, train, val, test)


def collate(pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Right-padded batch; labels are -100 except on answer bytes (answer + ``"\\n"``).

    No attention mask is needed: with causal attention and right padding no real token
    ever attends to a pad.
    """
    seqs, labels = [], []
    for prompt, answer in pairs:
        p, a = encode(prompt), encode(answer) + [NEWLINE]
        seqs.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    for i, (s, l_) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l_)] = torch.tensor(l_)
    return {"input_ids": ids, "labels": lab}
