"""The eval's second-turn prompts must be the strings the runtime renders (r4b_edge.model.template);
the training chats are tested in test_chats.py."""
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
