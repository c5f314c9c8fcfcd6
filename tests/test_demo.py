"""The continual-learning demo: data, metrics, the method loop, and results.json (tiny run)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from piece_optim.cli import main
from piece_optim.demo.data import IGNORE, NEWLINE, collate, decode, encode, make_task
from piece_optim.demo.methods import (
    DEFAULT_METHODS,
    learning_accuracy,
    op_bwt,
    op_floor,
    parse_method,
    preset,
    random_low_mask,
    random_mask,
    reference_fisher,
)
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
    assert list(res["methods"]) == list(DEFAULT_METHODS)
    assert 0 < res["op_floor"] <= 1
    for m, r in res["methods"].items():
        assert {"op", "bwt", "la", "general_after", "general", "matrix", "lr"} <= set(r), m
        assert r["la"] == pytest.approx(learning_accuracy(r["matrix"]))
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
    assert "piece-s" in out and "full checkpoint" in out and "OP floor" in out


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
    med = preset("quick", size="medium")
    assert shipped_weights(med.size, med.pretrain_steps, med.batch, 128, 0) is not None
    # an empty cache loads the shipped weights instead of pretraining (no steps run)
    monkeypatch.setenv("PIECE_OPTIM_CACHE", str(tmp_path / "cache"))
    corpus = {"train": torch.randint(0, 256, (4096,), dtype=torch.uint8)}
    model, info = pretrained_model(
        cfg.size, corpus, cfg.pretrain_steps, seed=cfg.seed, progress=False
    )
    assert info["cached"] == "shipped"
    fresh = build_model(cfg.size, cfg.seed)
    # trained weights, not the initialisation
    pairs = zip(model.parameters(), fresh.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    # use_cache=False (--no-cache) never takes them: it pretrains (1 step here)
    _, info = pretrained_model(cfg.size, corpus, 1, seed=cfg.seed, use_cache=False, progress=False)
    assert info["cached"] is False


def test_learning_accuracy_and_op_floor(seed):
    rng = random.Random(seed)
    R = [[rng.random() if j <= i else None for j in range(3)] for i in range(3)]
    assert learning_accuracy(R) == pytest.approx((R[0][0] + R[1][1] + R[2][2]) / 3)
    task = make_task("topic", 10, 60, seed=seed % 1000)
    answers = [a for _, a in task.test]
    top = max(answers.count(a) for a in set(answers)) / len(answers)
    other = make_task("parity", 10, 60, seed=seed % 1000)
    answers2 = [a for _, a in other.test]
    top2 = max(answers2.count(a) for a in set(answers2)) / len(answers2)
    assert op_floor([task, other], "test") == pytest.approx((top + top2) / 2)
    assert 1 / 3 <= top <= 1


def test_parse_method_overrides():
    assert parse_method("piece-s") == ("piece-s", {})
    assert parse_method("piece-s:eps=1e-8:tie_break=position") == (
        "piece-s",
        {"eps": 1e-8, "tie_break": "position"},
    )
    assert parse_method("piece-s:eps=auto@0.9x0.1") == ("piece-s", {"eps": "auto@0.9x0.1"})
    assert parse_method("piece-ref:ref_weight=10:ref_batches=2") == (
        "piece-ref",
        {"ref_weight": 10.0, "ref_batches": 2},
    )
    for bad in ("bogus", "piece-s:eps", "piece-s:nope=1", "piece-s:seed=3"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_random_low_mask_draws_from_the_least_important_pool(seed):
    model = build_model("tiny", seed=seed % 1000)
    excl = ("embed", "lm_head")
    g = torch.Generator().manual_seed(seed)
    elig = {n: p for n, p in model.named_parameters() if not any(e in n for e in excl)}
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in elig.items()}
    total = sum(p.numel() for p in model.parameters())
    k = int(0.05 * total)
    m = random_low_mask(model, fisher, 0.05, 3.0, excl, seed)
    assert m.numel_selected() == k
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    cut = torch.sort(flat).values[3 * k - 1]
    for n in m:
        assert bool((fisher[n].reshape(-1)[m[n].long()] <= cut).all()), n
    assert m != random_low_mask(model, fisher, 0.05, 3.0, excl, seed + 1)


@pytest.mark.parametrize("kind", ["general", "self"])
def test_reference_fisher_is_a_per_term_fisher(seed, kind):
    model = build_model("tiny", seed=seed % 1000)
    cfg = preset("tiny")
    text = torch.randint(
        0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    fisher, secs = reference_fisher(model, kind, cfg, text, seed)
    names = {n for n, _ in model.named_parameters() if not any(e in n for e in cfg.exclude)}
    assert set(fisher) == names and secs >= 0
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    again, _ = reference_fisher(model, kind, cfg, text, seed)
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)


def test_frontier_and_matched_op_interpolation():
    from piece_optim.demo.pareto import at_op, frontier

    pts = [
        {"lr": 1e-3, "op": 0.2, "general_after": 0.60, "bwt": -0.1, "la": 0.5},
        {"lr": 3e-3, "op": 0.6, "general_after": 0.50, "bwt": -0.3, "la": 0.9},
        {"lr": 1e-2, "op": 0.5, "general_after": 0.40, "bwt": -0.5, "la": 1.0},  # dominated
        {"lr": 3e-2, "op": 0.8, "general_after": 0.30, "bwt": -0.7, "la": 1.0},
    ]
    f = frontier(pts)
    assert [p["lr"] for p in f] == [1e-3, 3e-3, 3e-2]
    r = at_op(pts, 0.5)  # 3/4 of the way from op 0.2 to 0.6
    assert r["general_after"] == pytest.approx(0.525)
    assert r["bwt"] == pytest.approx(-0.25) and r["la"] == pytest.approx(0.8)
    assert at_op(pts, 0.85) is None
    assert at_op(pts, 0.1)["general_after"] == 0.60  # below the frontier: its first point


def test_demo_pareto_tiny_writes_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIECE_OPTIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p"
    argv = [
        "demo",
        "--pareto",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        "--seeds",
        "0",
        "--jobs",
        "1",
        "--lrs",
        "full=1e-4/1e-3;sparse=3e-3",
        "--methods",
        "seqft,piece-self",
    ]
    assert main(argv) == 0
    data = json.loads((out / "pareto.json").read_text())
    assert {"general_before", "op_floor", "runs"} <= set(data)
    assert isinstance(data["general_before"], float) and 0 < data["op_floor"] <= 1
    assert len(data["runs"]) == 2 + 1
    for r in data["runs"]:
        assert {"method", "lr", "seed", "op", "bwt", "la", "general_after"} <= set(r)
        assert isinstance(r["op"], float) and r["seed"] == 0
        assert (r["op"], r["bwt"]) == pytest.approx(op_bwt(r["matrix"]))
    assert {(r["method"], r["lr"]) for r in data["runs"]} == {
        ("seqft", 1e-4),
        ("seqft", 1e-3),
        ("piece-self", 3e-3),
    }
    assert set(data["summary"]["methods"]) == {"seqft", "piece-self"}
    assert (out / "pareto.png").stat().st_size > 1000
    assert "matched OP" in capsys.readouterr().out
    # --resume keeps what is there and runs only what is missing
    argv[argv.index("0")] = "0,1"
    argv[argv.index("--jobs") + 1] = "2"  # the process-pool path
    assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "pareto.json").read_text())
    assert len(again["runs"]) == 6 and again["runs"][0] == data["runs"][0]
    assert {r["seed"] for r in again["runs"]} == {0, 1}


def test_combine_fishers_weighs_each_by_its_median(seed):
    from piece_optim.demo.methods import combine_fishers

    g = torch.Generator().manual_seed(seed)
    a = {"x": torch.rand(5, 7, generator=g) * 1e-6, "y": torch.rand(11, generator=g) * 1e-6}
    b = {"x": torch.rand(5, 7, generator=g) * 1e3, "y": torch.zeros(11)}
    out = combine_fishers([a, b])
    med_a = torch.cat([t.reshape(-1) for t in a.values()]).median()
    flat_b = torch.cat([t.reshape(-1) for t in b.values()])
    med_b = flat_b[flat_b > 0].median()
    for n in a:
        torch.testing.assert_close(out[n], a[n] / med_a + b[n] / med_b)
