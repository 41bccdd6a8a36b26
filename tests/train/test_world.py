"""The procedural world: determinism, the exact drawing spec, questions, answer checker, splits."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.errors import R4BError, TrainingError
from r4b_edge.train import world as W


def test_same_seed_same_world_different_seed_differs():
    a = [W.make_example(5, i, f) for i in range(3) for f in W.FAMILIES]
    b = [W.make_example(5, i, f) for i in range(3) for f in W.FAMILIES]
    c = [W.make_example(6, i, f) for i in range(3) for f in W.FAMILIES]
    assert [(s.key(), q.question, q.answer, q.trace) for s, q in a] == [(s.key(), q.question, q.answer, q.trace) for s, q in b]
    assert np.array_equal(np.asarray(W.render(a[0][0])), np.asarray(W.render(b[0][0])))
    assert [s.key() for s, _ in a] != [s.key() for s, _ in c]


def test_seven_segment_drawing_matches_spec():
    scene = W.Scene((W.Item("digit", 8, "red"), W.Item("digit", 1, "blue"),
                     W.Item("shape", "square", "green"), W.Item("shape", "circle", "white")))
    a = np.asarray(W.render(scene))
    assert a.shape == (64, 64, 3)
    red, blue = W.COLOURS["red"], W.COLOURS["blue"]
    # digit 8 in the top-left cell: box x 9..22, y 4..27, stroke 3
    assert tuple(a[4, 9]) == red and tuple(a[27, 22]) == red and tuple(a[16, 15]) == red  # a, d, g segments
    assert tuple(a[8, 15]) == W.BACKGROUND  # hole of the 8
    assert tuple(a[4, 8]) == W.BACKGROUND and tuple(a[28, 9]) == W.BACKGROUND
    # digit 1 in the top-right cell: only segments b and c (x 52..54)
    assert tuple(a[5, 52]) == blue and tuple(a[26, 54]) == blue
    assert tuple(a[5, 41]) == W.BACKGROUND  # no segment a
    # square: rows/cols 8..23 of the bottom-left cell
    assert tuple(a[32 + 8, 8]) == W.COLOURS["green"] and tuple(a[32 + 24, 8]) == W.BACKGROUND
    # circle radius 8.5 around the centre of the bottom-right cell
    assert tuple(a[48, 48]) == W.COLOURS["white"] and tuple(a[32 + 3, 32 + 3]) == W.BACKGROUND
    assert set(map(tuple, a.reshape(-1, 3))) <= {W.BACKGROUND, *W.COLOURS.values()}


def test_questions_answers_and_traces():
    scene = W.Scene((W.Item("digit", 7, "red"), W.Item("shape", "triangle", "blue"),
                     W.Item("digit", 4, "green"), W.Item("digit", 9, "white")))
    rng = np.random.default_rng(0)
    q = W.ask(scene, "sum", rng)
    scan = W.scan_text(scene)
    assert (q.answer, q.trace, q.tier) == ("20", scan + "\n7+4=11\n11+9=20", "reasoning")
    q = W.ask(scene, "product-plus", rng)
    assert (q.answer, q.trace) == ("37", scan + "\n7*4=28\n28+9=37")
    assert W.ask(scene, "count", rng).answer == "1"
    q = W.ask(scene, "shape", rng)
    assert (q.answer, q.meta["pos"], q.tier) == ("triangle", "top-right", "perception")
    assert W.scan_text(scene) == "top-left red 7\ntop-right blue triangle\nbottom-left green 4\nbottom-right white 9"
    assert q.trace == scan + "\ntop-right -> triangle"
    assert W.ask(scene, "colour", np.random.default_rng(1)).trace.split("\n")[-1] in {f"{p} -> {it.colour}" for p, it in zip(W.POSITIONS, scene.items)}
    assert W.ask(scene, "count", rng).trace == scan + "\nshapes: top-right -> 1"
    none = W.Scene((W.Item("digit", 1, "red"),) * 4)
    assert W.ask(none, "count", rng).trace.endswith("\nshapes: none -> 0")
    q = W.ask(scene, "colour-count", np.random.default_rng(3))
    assert q.trace.split("\n")[-1] == f"{q.meta['colour']}: " + (" ".join(p for p, it in zip(W.POSITIONS, scene.items) if it.colour == q.meta["colour"]) or "none") + f" -> {q.answer}"
    with pytest.raises(TrainingError, match="4 digits, scene has 3"):
        W.ask(scene, "row-max", rng)
    full = W.Scene((W.Item("digit", 3, "red"), W.Item("digit", 5, "red"), W.Item("digit", 7, "red"), W.Item("digit", 2, "red")))
    q = W.ask(full, "row-max", rng)
    assert (q.answer, q.trace) == ("9", W.scan_text(full) + "\ntop 3+5=8\nbottom 7+2=9\nlarger 9")
    with pytest.raises(TrainingError, match="unknown question family"):
        W.ask(full, "nope", rng)


@pytest.mark.parametrize("pred,gold,ok", [
    ("17", "17", True), (" 17. ", "17", True), ("017", "17", True), ("Red", "red", True),
    ("red circle", "red", False), ("18", "17", False), ("", "0", False), ("-3", "-3", True),
])
def test_answer_checker(pred, gold, ok):
    assert W.check_answer(pred, gold) is ok


def test_splits_are_scene_disjoint():
    train = {W.make_example(1, i, f, "train")[0].key() for i in range(40) for f in W.FAMILIES}
    ev = {W.make_example(1, i, f, "eval")[0].key() for i in range(40) for f in W.FAMILIES}
    assert not train & ev
    assert all(W.Scene(tuple(W.Item(k, int(v) if k == "digit" else v, c) for k, v, c in
                             (x.split(":") for x in key.split("|")))).split() == "eval" for key in ev)


def test_write_world(tmp_path):
    from r4b_edge.train.data import read_jsonl
    from r4b_edge.train.world import write_world

    p = write_world(tmp_path, 3, {"digit": 2, "sum": 2})
    recs = read_jsonl(p)
    assert len(recs) == 4 and all((tmp_path / r["images"][0]).exists() for r in recs)
    assert recs[2]["meta"]["tier"] == "reasoning" and recs[2]["trace"]


def test_eval_items_are_the_written_eval_records(tmp_path):
    """eval_items is what train/evaluate.py writes and scores (the model card's split), with one
    default seed: the shipped recipe's seed + EVAL_SEED_OFFSET."""
    pytest.importorskip("torch")
    from r4b_edge.train.recipe import Recipe
    from r4b_edge.train.data import read_jsonl
    from r4b_edge.train.rollout import items_from_records
    from r4b_edge.train.world import write_world

    assert Recipe().seed + W.EVAL_SEED_OFFSET == W.EVAL_SEED == 1334
    recs = read_jsonl(write_world(tmp_path, W.EVAL_SEED, {f: 2 for f in W.FAMILIES}, "eval"))
    written = items_from_records(recs)
    items = W.eval_items(per_family=2)
    keys = ("id", "family", "tier", "question", "answer")
    assert [tuple(it[k] for k in keys) for it in items] == [tuple(it[k] for k in keys) for it in written]
    assert [it["scene"].key() for it in items] == [it["scene"] for it in written]
    assert all(it["image"].tobytes() == W.render(it["scene"]).tobytes() for it in items)
    mixed = W.eval_items(per_family=2, interleaved=True)
    assert [it["family"] for it in mixed[:len(W.FAMILIES)]] == W.FAMILIES  # every prefix covers the families
    assert sorted(it["id"] for it in mixed) == sorted(it["id"] for it in items)
    with pytest.raises(R4BError, match="unknown eval families"):
        W.eval_items(per_family=1, families=["digit", "nope"])
