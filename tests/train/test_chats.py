"""Training chats (follow-up questions) and the graded family: the records `follow_up` builds,
what they train, where the grounding carry goes, and the shares stages 1 and 2 give them."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.errors import TrainingError
from r4b_edge.model.template import Message, render_conversation
from r4b_edge.train import data as D
from r4b_edge.train import world as W
from r4b_edge.train.recipe import Recipe, model_config, recipe_from_dict
from r4b_edge.train.stages import (add_grounding_labels, carries_answer, chat_versions, follow_up,
                                   tokenizer_texts)
from r4b_edge.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(tokenizer_texts(1, n=20), vocab_size=400)


def world_record(family: str, index: int = 0, mode: str | None = None) -> dict:
    scene, q = W.make_example(1, index, family)
    mode = mode or ("direct" if q.tier == "perception" else "think")
    return D.make_record(W.item_id("train", 1, family, index), "a.png", q.question, q.answer, q.trace or None,
                         {"family": family, "tier": q.tier, "scene": scene.key(), **q.meta}, mode)


def test_total_levels_answers_and_traces():
    levels = {"easy": 0, "hard": 0}
    for i in range(200):
        scene, q = W.make_example(7, i, "total")
        d = scene.digits
        assert (q.tier, q.answer, q.question) == ("graded", str(sum(d)), W.TEMPLATES["total"])
        assert q.meta == {"level": "easy" if len(d) == 1 else "hard", "n_digits": len(d)} and len(d) in (1, 3, 4)
        assert q.trace.startswith(W.scan_text(scene)) and q.trace.endswith(f"total {sum(d)}")
        assert q.trace.count("+") == len(d) - 1
        levels[q.meta["level"]] += 1
    assert 70 <= levels["easy"] <= 130  # p = 0.5 each
    with pytest.raises(TrainingError, match="total needs >= 1 digit"):
        W.ask(W.Scene((W.Item("shape", "circle", "red"),) * 4), "total", np.random.default_rng(0))


def test_old_families_draw_the_same_items_as_before_the_graded_family():
    # the salt of a family is its position in FAMILIES; the graded family is appended last
    assert W.FAMILIES[:8] == W.PERCEPTION + W.REASONING and W.FAMILIES[8:] == W.GRADED
    scene, q = W.make_example(1234, 0, "sum")
    assert W.make_example(1234, 0, "sum")[1] == q and q.family == "sum"


def test_history_is_seeded_and_suits_the_scene():
    for i in range(30):
        scene, _ = W.make_example(2, i, "colour")
        h = W.history_for(scene.key(), 1, 53, f"id{i}", 2)
        assert h == W.history_for(scene.key(), 1, 53, f"id{i}", 2) and len(h) == 2
        assert all(W.suits(scene, q.family) for q in h)
    fams = {q.family for i in range(200) for q in W.history_for(W.make_example(3, i, "row-max")[0].key(), 1, 53,
                                                                    str(i), 1)}
    assert {"sum", "product-plus", "row-max", "total", "digit", "colour"} <= fams  # every tier opens chats
    with pytest.raises(TrainingError, match=">= 0 earlier"):
        W.history_for(scene.key(), 1, 53, "x", -1)


@pytest.mark.parametrize("n_prev", [1, 2])
def test_follow_up_keeps_the_item_and_trains_only_its_last_turn(tok, n_prev):
    r = world_record("sum")
    t = follow_up(r, 1234, n_prev)
    assert t == follow_up(r, 1234, n_prev) and D.validate_record(t)
    m = t["messages"]
    assert len(m) == 2 * (n_prev + 1) and m[0]["content"].startswith("<image>\n")
    assert sum(x["content"].count("<image>") for x in m) == 1
    assert m[-2]["content"] == r["messages"][0]["content"].split("\n", 1)[1] and m[-1] == r["messages"][1]
    assert (t["mode"], t["trace"], t["answer"], t["meta"]["turn"]) == (r["mode"], r["trace"], r["answer"], n_prev + 1)
    pieces = D.record_pieces(t)
    trained = "".join(x for x, tr in pieces if tr)
    assert trained == "".join(x for x, tr in D.record_pieces(r) if tr)  # the same target as asked first
    full = "".join(x for x, _ in pieces)
    assert full == "".join(x for x, _ in render_conversation(
        [Message(x["role"], x["content"].replace("<image>\n", ""), images=x["content"].count("<image>"))
         for x in m[:-1]] + [Message("assistant", r["answer"], reasoning=r["trace"])], "think"))


def test_chat_versions_split_second_and_third_questions():
    recs = [world_record("colour", i) for i in range(40)]
    v = chat_versions(recs, 1, 0.5)
    turns = [x["meta"]["turn"] for x in v]
    assert set(turns) == {2, 3} and 12 <= turns.count(3) <= 28
    assert all(x["meta"]["turn"] == 2 for x in chat_versions(recs, 1, 0.0))
    with pytest.raises(TrainingError, match="chat_three_frac=1.5"):
        chat_versions(recs, 1, 1.5)


def test_answer_carry_goes_to_the_last_turn_for_glance_questions_only(tok):
    cfg = model_config(Recipe.preset("micro"), tok.get_vocab_size(), tok.token_to_id("<image>"))
    easy = next(world_record("total", i, "direct") for i in range(50)
                if W.make_example(1, i, "total")[1].meta["level"] == "easy")
    hard = next(world_record("total", i) for i in range(50) if W.make_example(1, i, "total")[1].meta["level"] == "hard")
    cases = [(world_record("digit"), True), (easy, True), (hard, False), (world_record("sum"), False)]
    for rec, carried in cases:
        assert carries_answer(rec) == carried
        for version in (rec, follow_up(rec, 1, 1), follow_up(rec, 1, 2)):
            e = D.encode_record(tok, version, cfg.image_token_index, cfg.tokens_per_view, None)
            before = list(e.labels)
            g = add_grounding_labels(tok, e, version, cfg, response_slots=False)
            changed = [i for i, (a, b) in enumerate(zip(g.labels, before)) if a != b]
            img_end = max(i for i, t in enumerate(g.ids) if t == cfg.image_token_index) + 6  # + 4 colour slots
            late = [i for i in changed if i > img_end]  # the answer carry
            heads = [i for i, t in enumerate(g.ids) if t == tok.token_to_id("<|im_start|>")]
            assert all(i > heads[-2] for i in late)  # only in the last user turn and its header
            a0 = tok.encode(rec["answer"], add_special_tokens=False).ids[0]
            assert bool(late) == carried and all(g.labels[i] == a0 for i in late)
            assert len(changed) - len(late) >= 20  # 16 image patches + 4 colours, in every version


def test_stage1_shows_the_graded_easy_level_only_and_gives_chats_their_share():
    from r4b_edge.train.pretrain import stage1_records

    recs = [world_record(f, i) for f in ("digit", "colour-count", "total") for i in range(12)]
    recs.append(D.make_record("cap", "a.png", "Describe the image.", "x", None,
                              {"family": "caption", "tier": "caption", "scene": recs[0]["meta"]["scene"]}))
    out, w = stage1_records(recs, Recipe(pt_chat_frac=0.3, colour_count_weight=3.0))
    assert not any(x["meta"].get("level") == "hard" for x in out)
    assert any(x["meta"].get("level") == "easy" for x in out)
    chat = np.array([x["meta"].get("turn", 1) > 1 for x in out])
    assert w.sum() == pytest.approx(1.0) and w[chat].sum() == pytest.approx(0.3)
    assert not any(x["meta"]["family"] == "caption" for x, c in zip(out, chat) if c)
    single, w0 = stage1_records(recs, Recipe(pt_chat_frac=0.0))
    assert not any(x["meta"].get("turn", 1) > 1 for x in single)
    with pytest.raises(TrainingError, match="pt_chat_frac=1.0"):
        stage1_records(recs, Recipe(pt_chat_frac=1.0))


def test_anneal_mix_gives_follow_ups_their_share_of_every_group():
    from r4b_edge.train.anneal import mix_weights

    cur = [world_record("digit"), world_record("count"), world_record("sum"), world_record("row-max", 3)]
    r = Recipe(an_direct_to_reasoning=1.0, an_perception_trace_frac=0.2, an_chat_frac=0.25, colour_count_weight=1.0)
    out, modes, w = mix_weights(cur, r)
    chat = np.array([len(o["messages"]) > 2 for o in out])
    assert w.sum() == pytest.approx(1.0) and w[chat].sum() == pytest.approx(0.25)
    for mode in ("direct", "think", "forced-think"):
        sel = np.array([m == mode for m in modes])
        assert w[sel & chat].sum() == pytest.approx(0.25 * w[sel].sum())
    base = mix_weights(cur, Recipe(an_direct_to_reasoning=1.0, an_perception_trace_frac=0.2, an_chat_frac=0.0,
                                   colour_count_weight=1.0))
    assert len(base[0]) == len(cur) + 2 and not any(len(o["messages"]) > 2 for o in base[0])
    with pytest.raises(TrainingError, match="an_chat_frac=1.0"):
        mix_weights(cur, Recipe(an_chat_frac=1.0))


def test_anneal_mix_weighs_product_plus_inside_its_group():
    from r4b_edge.train.anneal import mix_weights

    cur = [world_record("digit"), world_record("sum"), world_record("product-plus"), world_record("row-max", 3)]
    kw = dict(an_direct_to_reasoning=1.0, an_perception_trace_frac=0.0, an_chat_frac=0.0, colour_count_weight=1.0)
    out, modes, w1 = mix_weights(cur, Recipe(**kw))
    _, _, w2 = mix_weights(cur, Recipe(an_product_plus_weight=2.0, **kw))
    fam = [o["meta"]["family"] for o in out]
    pp, sm = fam.index("product-plus"), fam.index("sum")
    assert w1[pp] == pytest.approx(w1[sm]) and w2[pp] == pytest.approx(2 * w2[sm])
    for mode in set(modes):  # each group keeps its share of the mix
        sel = np.array([m == mode for m in modes])
        assert w2[sel].sum() == pytest.approx(w1[sel].sum())
    with pytest.raises(TrainingError, match="an_product_plus_weight=0"):
        mix_weights(cur, Recipe(an_product_plus_weight=0, **kw))


def test_old_recipe_files_still_load():
    from dataclasses import asdict

    d = asdict(Recipe())
    d["an_two_turn_frac"] = d.pop("an_chat_frac")
    assert recipe_from_dict(d) == Recipe()
    with pytest.raises(TrainingError, match="unknown fields \\['nope'\\]"):
        recipe_from_dict({"nope": 1})


def test_stage1_replay_records_are_stage0_reasoning_traces():
    from r4b_edge.train.pretrain import replay_records

    recs, modes = replay_records(Recipe(pt_replay_frac=0.2, pt_replay_per_reasoning=3))
    fams = sorted({x["meta"]["family"] for x in recs})
    assert fams == ["product-plus", "row-max", "sum"] and len(recs) == 9 and set(modes) == {"think"}
    assert all(not x.get("images") and x.get("trace") for x in recs)
    for bad in (dict(pt_replay_frac=1.0), dict(pt_replay_frac=-0.1), dict(pt_replay_frac=0.2, pt_replay_per_reasoning=0)):
        with pytest.raises(TrainingError, match="pt_replay"):
            replay_records(Recipe(**bad))
