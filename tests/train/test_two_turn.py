"""Two-question chats: the annealing twins, their grounding, and the eval's second-turn prompts,
which must be the strings the runtime renders (r4b_edge.model.template)."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.errors import TrainingError
from r4b_edge.model.template import Message, render_prompt
from r4b_edge.train import data as D
from r4b_edge import world as W
from r4b_edge.train.stages import tokenizer_texts
from r4b_edge.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(tokenizer_texts(1, n=20), vocab_size=400)


def world_record(family: str, index: int = 0) -> dict:
    scene, q = W.make_example(1, index, family)
    return D.make_record(f"train-1-{family}-{index:06d}", "a.png", q.question, q.answer, q.trace or None,
                         {"family": family, "tier": q.tier, "scene": scene.key(), **q.meta},
                         "think" if q.tier == "reasoning" else "direct")


def test_scene_key_round_trip_and_bad_keys():
    for i in range(20):
        scene, _ = W.make_example(3, i, "sum")
        assert W.Scene.from_key(scene.key()) == scene
    with pytest.raises(TrainingError, match="4 cells"):
        W.Scene.from_key("digit:1:red|digit:2:red")


def test_opening_question_is_a_perception_question_the_scene_suits():
    four_digits = W.Scene((W.Item("digit", 1, "red"),) * 4)
    no_digits = W.Scene((W.Item("shape", "circle", "red"),) * 4)
    fams = {W.opening_question(s, np.random.default_rng(i)).family for s in (four_digits, no_digits) for i in range(60)}
    assert fams == set(W.PERCEPTION)  # every family occurs...
    assert "shape" not in {W.opening_question(four_digits, np.random.default_rng(i)).family for i in range(60)}
    assert "digit" not in {W.opening_question(no_digits, np.random.default_rng(i)).family for i in range(60)}


def test_two_turn_twin_keeps_the_item_and_opens_with_the_image():
    from r4b_edge.train.anneal import two_turn

    r = world_record("sum")
    t = two_turn(r, 1234)
    assert t == two_turn(r, 1234) and D.validate_record(t)  # seeded by the record id
    m = t["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant"]
    assert m[0]["content"].startswith("<image>\n") and "<image>" not in m[2]["content"]
    assert m[2]["content"] == r["messages"][0]["content"].split("\n", 1)[1] and m[3] == r["messages"][1]
    scene = W.Scene.from_key(r["meta"]["scene"])
    opening = [W.ask(scene, f, np.random.default_rng(0)) for f in W.PERCEPTION if f != "shape" or len(scene.digits) < 4]
    assert any(m[0]["content"] == "<image>\n" + q.question for q in opening)
    assert (t["mode"], t["trace"], t["answer"], t["meta"]["opening"] in W.PERCEPTION) == (r["mode"], r["trace"], r["answer"], True)


def test_mix_gives_the_twins_their_share_of_every_group():
    from r4b_edge.train.anneal import mix_weights
    from r4b_edge.train.common import Recipe

    cur = [world_record("digit"), world_record("count"), world_record("sum"), world_record("row-max", 3)]
    r = Recipe(an_direct_to_reasoning=1.0, an_perception_trace_frac=0.2, an_two_turn_frac=0.25, colour_count_weight=1.0)
    out, modes, w = mix_weights(cur, r)
    twin = np.array([len(o["messages"]) == 4 for o in out])
    assert w.sum() == pytest.approx(1.0) and w[twin].sum() == pytest.approx(0.25)
    for mode in ("direct", "think", "forced-think"):
        sel = np.array([m == mode for m in modes])
        assert w[sel & twin].sum() == pytest.approx(0.25 * w[sel].sum())
    base = mix_weights(cur, Recipe(an_direct_to_reasoning=1.0, an_perception_trace_frac=0.2, colour_count_weight=1.0))
    assert len(base[0]) == len(cur) + 2 and not any(len(o["messages"]) == 4 for o in base[0])  # 0: off
    with pytest.raises(TrainingError, match="an_two_turn_frac=1.0"):
        mix_weights(cur, Recipe(an_two_turn_frac=1.0))


def test_twins_get_image_grounding_but_no_answer_carry(tok):
    from r4b_edge.train.anneal import two_turn
    from r4b_edge.train.common import Recipe, model_config
    from r4b_edge.train.stages import add_grounding_labels

    cfg = model_config(Recipe.preset("micro"), tok.get_vocab_size(), tok.token_to_id("<image>"))
    r = world_record("digit")
    for rec, carried in ((r, True), (two_turn(r, 1), False)):
        e = D.encode_record(tok, rec, cfg.image_token_index, cfg.tokens_per_view, None)
        before = list(e.labels)
        g = add_grounding_labels(tok, e, rec, cfg, response_slots=False)
        changed = sum(a != b for a, b in zip(g.labels, before))
        assert (changed > 20) == carried and changed >= 20  # 16 patches + 4 colours at least


def test_second_turn_prompt_is_the_runtime_template(tok):
    from r4b_edge.train.evaluate import second_turn_items
    from r4b_edge.train.rollout import encode_prompt, items_from_records

    items = second_turn_items(items_from_records([world_record("colour-count"), world_record("product-plus")]), 7)
    for it in items:
        (q0, a0), = it["history"]
        for mode, tmode in (("auto", "auto"), ("think", "think"), ("no-think", "no-think")):
            want = render_prompt([Message("user", q0, images=1), Message("assistant", a0),
                                  Message("user", it["question"])], tmode)
            ids = encode_prompt(tok, it["question"], mode, tok.token_to_id("<image>"), 1, it["history"])
            assert tok.decode(ids, skip_special_tokens=False) == want
    assert encode_prompt(tok, "Q?", "auto", tok.token_to_id("<image>"), 1) == \
        tok.encode(render_prompt([Message("user", "Q?", images=1)], "auto")).ids  # single turn unchanged
