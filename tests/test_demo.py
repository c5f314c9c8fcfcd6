"""The continual-learning demo: data, metrics, the method loop, and results.json (tiny run)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from piece_optim.cli import main
from piece_optim.demo.bench import METHODS, op_bwt, preset, random_mask
from piece_optim.demo.data import IGNORE, NEWLINE, collate, decode, encode, make_task
from piece_optim.demo.model import build_model

pytestmark = pytest.mark.cpu_only("the demo trains on CPU by design (issue 15 owns it)")


def test_tasks_are_deterministic_and_disjoint():
    for name in ("sentiment", "topic", "parity", "dates", "addition", "upper", "reverse"):
        a, b = make_task(name, 50, 10, seed=3), make_task(name, 50, 10, seed=3)
        assert a == b
        held = {p for p, _ in a.val + a.test}
        assert len(held) == 20
        assert not held.intersection(p for p, _ in a.train)
    with pytest.raises(ValueError, match="unknown"):
        make_task("nope", 5, 5, 0)
    with pytest.raises(ValueError, match="n_train"):
        make_task("dates", 0, 5, 0)


def test_collate_masks_prompt_and_padding(seed):
    rng = random.Random(seed)
    pairs = [("x" * rng.randint(1, 9), "y" * rng.randint(1, 5)) for _ in range(7)]
    b = collate(pairs)
    for row, lab, (p, a) in zip(b["input_ids"], b["labels"], pairs, strict=True):
        n = len(p) + len(a) + 1
        assert decode(row[:n].tolist()) == p + a + "\n"
        assert (lab[: len(p)] == IGNORE).all() and (lab[n:] == IGNORE).all()
        assert lab[len(p) : n].tolist() == encode(a) + [NEWLINE]


def test_op_bwt_matches_trace_definition(seed):
    g = torch.Generator().manual_seed(seed)
    T = 4
    R = torch.rand(T, T, generator=g).tolist()
    op, bwt = op_bwt(R)
    assert op == pytest.approx(sum(R[T - 1]) / T, abs=1e-12)
    assert bwt == pytest.approx(
        sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1), abs=1e-12
    )
    with pytest.raises(ValueError, match="square"):
        op_bwt([[0.1, 0.2]])


def test_random_mask_size_and_exclusions(seed):
    model = build_model("tiny", seed=seed % 1000)
    total = sum(p.numel() for p in model.parameters())
    m = random_mask(model, 0.05, ("embed", "lm_head"), seed)
    assert m.numel_selected() == int(0.05 * total)
    assert m.numel_total() == total
    assert not any("embed" in n or "lm_head" in n for n in m)


def test_demo_cli_tiny_writes_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIECE_OPTIM_CACHE", str(tmp_path / "cache"))
    rc = main(["demo", "--preset", "tiny", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    cfg = preset("tiny")
    T = len(cfg.tasks)
    assert 0 <= res["general_before"] <= 1
    assert list(res["methods"]) == list(METHODS)
    for m, r in res["methods"].items():
        assert {"op", "bwt", "general_after", "general", "matrix", "lr"} <= set(r), m
        assert len(r["matrix"]) == T and len(r["general"]) == T + 1
        assert r["general"][0] == res["general_before"]
        assert r["general"][-1] == r["general_after"]
        for i, row in enumerate(r["matrix"]):
            assert all((v is None) == (j > i) for j, v in enumerate(row))
        assert (r["op"], r["bwt"]) == pytest.approx(op_bwt(r["matrix"]))
        if m in ("random", "piece-f", "piece-s"):
            assert len(r["deltas"]) == T
            assert all(d["entries"] <= int(cfg.ratio * 40_000) for d in r["deltas"])
    assert res["revert_check"] is True
    assert (tmp_path / "out" / "demo.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "piece-s" in out and "full checkpoint" in out


def test_demo_cli_bad_input(tmp_path, capsys):
    assert main(["demo", "--methods", "seqft,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["demo", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown" in capsys.readouterr().err


def test_tuning_select_skips_lrs_that_learn_nothing(seed):
    from piece_optim.demo.tuning import criterion, select

    rng = random.Random(seed)
    g0 = rng.uniform(0.3, 0.6)
    op_hi = rng.uniform(0.1, 0.45)
    # lr 1e-3 learns nothing but keeps all general ability: best criterion, not eligible
    rows = [(0.0, g0, 1e-3), (op_hi, 0.5 * g0, 3e-3), (0.9 * op_hi, 0.2 * g0, 1e-2)]
    scored = [(criterion(op, ga, g0), op, lr) for op, ga, lr in rows]
    assert max(scored)[2] == 1e-3
    assert select(scored) == 3e-3
    with pytest.raises(ValueError, match="empty"):
        select([])


def test_shipped_weights_match_the_default_config(tmp_path, monkeypatch):
    """The default preset finds its shipped weights; any other configuration does not."""
    from piece_optim.demo.model import pretrained_model, shipped_weights

    cfg = preset("default")
    path = shipped_weights(cfg.size, cfg.pretrain_steps, cfg.batch, 128, cfg.seed)
    assert path is not None, "piece_optim/demo/weights/ lacks the default model"
    assert shipped_weights(cfg.size, cfg.pretrain_steps + 1, cfg.batch, 128, cfg.seed) is None
    assert shipped_weights(cfg.size, cfg.pretrain_steps, cfg.batch, 128, cfg.seed + 1) is None
    # an empty cache loads the shipped weights instead of pretraining (no steps run)
    monkeypatch.setenv("PIECE_OPTIM_CACHE", str(tmp_path / "cache"))
    corpus = {"train": torch.randint(0, 256, (4096,), dtype=torch.uint8)}
    model, info = pretrained_model(cfg.size, corpus, cfg.pretrain_steps, seed=cfg.seed,
                                   progress=False)  # fmt: skip
    assert info["cached"] == "shipped"
    fresh = build_model(cfg.size, cfg.seed)
    # trained weights, not the initialisation
    pairs = zip(model.parameters(), fresh.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    # use_cache=False (--no-cache) never takes them: it pretrains (1 step here)
    _, info = pretrained_model(cfg.size, corpus, 1, seed=cfg.seed, use_cache=False,
                               progress=False)  # fmt: skip
    assert info["cached"] is False
