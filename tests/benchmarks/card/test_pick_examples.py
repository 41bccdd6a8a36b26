"""benchmarks/card/pick_examples.py: which items the pair takes, the read-back check, the errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from r4b_edge.benchmarks.card import pick_examples
from r4b_edge.engine.events import Result, Stats
from r4b_edge.errors import R4BError
from r4b_edge.train.world import check_answer, eval_items


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return eval_items(families=["total"], per_family=6)


class ScriptedModel:
    """Answers by image pixels: a scripted (answer, thought) per held-out image, as `Model.chat` would."""

    def __init__(self, items: list[dict], script: list[tuple[str, bool]]):
        self.replies = {it["image"].tobytes(): (*s, it["trace"]) for it, s in zip(items, script)}
        self.calls: list[dict] = []

    def chat(self, image, prompt: str, **options) -> Result:
        img = Image.open(image).convert("RGB") if isinstance(image, str) else image
        self.calls.append(options)
        answer, thought, reasoning = self.replies[img.tobytes()]
        return Result(answer=answer, reasoning=reasoning if thought else "", thought=thought,
                      p_think=0.9 if thought else 0.1, mode="auto", forced=False,
                      stats=Stats(think_tokens=3 if thought else 0, answer_tokens=2))


def test_levels_follow_the_digit_count(items: list[dict]) -> None:
    for it in items:
        n = len(it["scene"].digits)
        assert pick_examples.level_of(it) == ("easy" if n == 1 else "hard"), it["id"]


def test_pick_takes_the_first_right_direct_and_think_items(items: list[dict], tmp_path: Path) -> None:
    gold = [it["answer"] for it in items]
    wrong = [str(int(g) + 1) for g in gold]
    # item 0 direct wrong, 1 think wrong, 2 direct right, 3 direct right, 4 think right after a wrong
    # trace line, 5 think right with the world's trace
    script = [(wrong[0], False), (wrong[1], True), (gold[2], False), (gold[3], False), (gold[4], True), (gold[5], True)]
    model = ScriptedModel(items, script)
    k = items[4]["image"].tobytes()
    model.replies[k] = (gold[4], True, "top-left red 9\n" + model.replies[k][2])
    got = pick_examples.pick(model, items)
    assert got["direct"]["id"] == items[2]["id"] and got["think"]["id"] == items[5]["id"]
    assert got["scanned"] == 6 and got["tally"] == {"direct right": 2, "direct wrong": 1, "think right": 2,
                                                    "think wrong": 1, "think right, other trace": 1}
    assert all(c["mode"] == "auto" and c["temperature"] == 0.0 for c in model.calls)
    assert check_answer(got["think"]["answer"], items[5]["answer"]) and got["think"]["p_think"] == 0.9
    paths = pick_examples.write_pair(model, got, items, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["total-direct.png", "total-think.png"]
    assert Image.open(paths["think"]).convert("RGB").tobytes() == items[5]["image"].tobytes()
    text = pick_examples.describe("think", got["think"], paths["think"])
    assert "thought through" in text and f"total {gold[5]}" in text.splitlines()[-1]


def test_pick_raises_with_the_counts_when_a_decision_is_missing(items: list[dict]) -> None:
    model = ScriptedModel(items, [(it["answer"], False) for it in items])
    with pytest.raises(R4BError, match=r"decision think among the 6 scanned \(6 direct right"):
        pick_examples.pick(model, items)
    with pytest.raises(R4BError, match="'digit'"):
        pick_examples.pick(model, eval_items(families=["digit"], per_family=1))


def test_write_pair_fails_when_the_file_reads_back_differently(items: list[dict], tmp_path: Path) -> None:
    model = ScriptedModel(items, [(items[0]["answer"], False), (items[1]["answer"], True)])
    got = pick_examples.pick(model, items[:2])
    model.replies[items[1]["image"].tobytes()] = ("0", False, "")  # the saved file gets another reply
    with pytest.raises(R4BError, match="read back from disk"):
        pick_examples.write_pair(model, got, items, tmp_path)


def test_main_rejects_bad_counts() -> None:
    with pytest.raises(R4BError, match="--per-family"):
        pick_examples.main(["--per-family", "0"])
