"""The eval's pieces on hand-made data (AUROC, reliability bins, threshold sweep, follow-up chats,
the target check) and, on the bundled model, against the runtime: the follow-up prompts and
answers the eval builds are the runtime Conversation's, its p_think is the engine's, and its token
count is the engine's `Result.token_ids`."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from r4b_edge.model.reply import has_think_tag
from r4b_edge.model.template import Message, render_prompt
from r4b_edge.train import world as W
from r4b_edge.train.eval_calibration import auroc, reliability, sweep_check, threshold_sweep
from r4b_edge.train.eval_chat import EVAL_CHAT_SALT, follow_up_items, runtime_answer
from r4b_edge.train.stages import CHAT_SALT, tokenizer_texts
from r4b_edge.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(tokenizer_texts(1, n=20), vocab_size=400)


def brute_auroc(s, y):
    pos = [a for a, b in zip(s, y) if b]
    neg = [a for a, b in zip(s, y) if not b]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auroc_hand_computed_with_ties_and_against_pairs():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # pairs (pos 0.5, 0.9) x (neg 0.5, 0.2): tie 0.5 + 1 + 1 + 1 = 3.5 of 4
    assert auroc([0.5, 0.5, 0.2, 0.9], [True, False, False, True]) == pytest.approx(0.875)
    assert auroc([0.3, 0.3, 0.3], [True, False, True]) == pytest.approx(0.5)  # all tied
    assert auroc([0.9, 0.1], [False, True]) == 0.0 and auroc([0.9, 0.1], [True, False]) == 1.0
    assert auroc([0.2, 0.4], [True, True]) is None and auroc([0.2, 0.4], [False, False]) is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = np.round(rng.random(30), 1)  # many ties
        y = rng.random(30) < 0.4
        if 0 < y.sum() < 30:
            assert auroc(s, y) == pytest.approx(brute_auroc(s, y))


def test_reliability_bins_hold_every_item_once_and_close_the_last():
    p = [0.0, 0.05, 0.1, 0.1999, 0.5, 0.95, 1.0]
    wrong = [False, True, True, True, False, True, False]
    rows = reliability(p, wrong)
    assert [r["n"] for r in rows] == [2, 2, 0, 0, 0, 1, 0, 0, 0, 2] and sum(r["n"] for r in rows) == len(p)
    assert rows[0]["error_rate"] == 0.5 and rows[1]["error_rate"] == 1.0 and rows[9]["error_rate"] == 0.5
    assert rows[9]["mean_p_think"] == pytest.approx(0.975) and rows[2]["error_rate"] is None
    assert (rows[0]["lo"], rows[0]["hi"], rows[9]["hi"]) == (0.0, 0.1, 1.0)


def test_threshold_sweep_picks_think_or_no_think_result_per_item():
    p = [0.05, 0.5, 0.9]
    think = {"correct": [1, 1, 1], "tokens": [30, 40, 50]}
    no_think = {"correct": [1, 0, 0], "tokens": [5, 5, 5]}
    rows = {r["threshold"]: r for r in threshold_sweep(p, think, no_think, [0.0, 0.05, 0.06, 0.5, 0.51, 1.0])}
    assert rows[0.0] == {"threshold": 0.0, "accuracy": 1.0, "mean_tokens": 40.0, "think_rate": 1.0}
    assert rows[0.05]["think_rate"] == 1.0  # p >= threshold thinks
    assert rows[0.06] == {"threshold": 0.06, "accuracy": 1.0, "mean_tokens": 95 / 3, "think_rate": pytest.approx(2 / 3)}
    assert rows[0.51]["accuracy"] == pytest.approx(2 / 3) and rows[0.51]["mean_tokens"] == pytest.approx(60 / 3)
    assert rows[1.0] == {"threshold": 1.0, "accuracy": pytest.approx(1 / 3), "mean_tokens": 5.0, "think_rate": 0.0}
    chk = sweep_check(np.array(p), np.array([False, True, True]),
                      {"correct": [1, 1, 1], "tokens": [5, 40, 50], "thought": [False, True, True]}, think, no_think)
    assert chk["threshold 0.5"]["decisions_differing"] == 0 and chk["own greedy choice"]["accuracy"] == 1.0
    assert chk["measured"]["mean_tokens"] == pytest.approx(95 / 3) == chk["threshold 0.5"]["mean_tokens"]


def test_runtime_answer_is_what_the_engine_keeps():
    assert runtime_answer("  7 ") == "7"
    assert runtime_answer("7</think>\n\n8") == "7" and runtime_answer("red <think>x") == "red"
    assert runtime_answer(None) == "" and runtime_answer("") == ""
    assert has_think_tag("7</think>") and has_think_tag("<think>") and not has_think_tag("7") and not has_think_tag(None)


def eval_like_items(n_per_family: int = 1) -> list[dict]:
    return [dict(it, scene=it["scene"].key(), image=f"{it['id']}.png")
            for it in W.eval_items(per_family=n_per_family)]


def test_follow_ups_hold_the_model_answers_and_render_as_the_runtime(tok):
    from r4b_edge.train.rollout import encode_prompt

    items = eval_like_items()
    calls: list[list[dict]] = []

    def ask(rows):
        calls.append([dict(r) for r in rows])
        return [f"A{len(calls)}-{len(r['history'])}-{len(r['question'])}</think>junk" for r in rows]

    fu = follow_up_items(items, W.EVAL_SEED, ask)
    assert len(calls) == 2 and len(calls[0]) == 2 * len(items) and len(calls[1]) == len(items)  # 2 rounds
    assert all(not r["history"] for r in calls[0]) and all(len(r["history"]) == 1 for r in calls[1])
    for t, n_prev in ((2, 1), (3, 2)):
        assert [x["id"] for x in fu[t]] == [x["id"] for x in items]
        for it in fu[t]:
            hist = W.history_for(it["scene"], W.EVAL_SEED, EVAL_CHAT_SALT, it["id"], n_prev)
            assert [q for q, _ in it["history"]] == [q.question for q in hist] and it["history_gold"] == [q.answer for q in hist]
            for k, (q, a) in enumerate(it["history"]):  # the model's own answer, cut as the engine cuts it
                assert a == f"A{k + 1}-{k}-{len(q)}"
            msgs = []
            for k, (q, a) in enumerate(it["history"]):  # what r4b_edge.api.Conversation keeps
                msgs += [Message("user", q, images=int(k == 0)), Message("assistant", a)]
            msgs.append(Message("user", it["question"]))
            for mode in ("auto", "think", "no-think"):
                ids = encode_prompt(tok, it["question"], mode, tok.token_to_id("<image>"), 1, it["history"])
                assert tok.decode(ids, skip_special_tokens=False) == render_prompt(msgs, mode)
    # a third question's second answer was generated with the first in its history
    second = {r["question"]: r for r in calls[1]}
    for it in fu[3]:
        (q0, a0), (q1, _) = it["history"]
        assert any(r["history"] == [(q0, a0)] and r["question"] == q1 for r in calls[1])
    assert second  # the round ran
    # the eval's chats are not training's
    same = sum(W.history_for(it["scene"], W.EVAL_SEED, CHAT_SALT, it["id"], 2) ==
               W.history_for(it["scene"], W.EVAL_SEED, EVAL_CHAT_SALT, it["id"], 2) for it in items)
    assert same < len(items)


def test_follow_up_history_correct_counts_right_earlier_answers():
    items = eval_like_items()[:4]
    right = follow_up_items(items, W.EVAL_SEED, lambda rows: [f" {r['answer']}. " for r in rows])
    assert all(x["history_correct"] == len(x["history"]) == t - 1 for t in (2, 3) for x in right[t])
    assert all(a == f"{g}." for x in right[3] for (_, a), g in zip(x["history"], x["history_gold"]))
    unclosed = follow_up_items(items, W.EVAL_SEED, lambda rows: [None for _ in rows])
    assert all(x["history_correct"] == 0 and all(a == "" for _, a in x["history"]) for x in unclosed[3])
