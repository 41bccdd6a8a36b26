"""Follow-up questions: every eval item asked again as the 2nd and as the 3rd question of a chat
about its image, after earlier questions (`train.world.history_for`, salt EVAL_CHAT_SALT) whose
answers in the history are the model's own (auto, greedy, answer text only: what the runtime's
`Conversation` keeps)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from r4b_edge.model.reply import answer_text
from .world import history_for

#: World seed salt of the eval chats' earlier questions (training's is train.stages.CHAT_SALT = 53).
EVAL_CHAT_SALT = 59
#: A follow-up is asked as question 2 or 3 of its chat.
TURNS = (2, 3)

#: ask(rows) -> the model's raw answer (text after `</think>`, None if the think block never
#: closed) for each row {question, image, answer, history}, auto mode, greedy.
AskFn = Callable[[Sequence[dict]], Sequence["str | None"]]


def runtime_answer(raw: str | None) -> str:
    """The answer the runtime returns and keeps in a chat's history: the text after `</think>` up
    to any think tag (the engine stops the answer there), stripped (`r4b_edge.model.reply.answer_text`);
    "" when the think block never closed (the reply was all reasoning)."""
    return "" if raw is None else answer_text(raw)


def follow_up_items(items: Sequence[dict], seed: int, ask: AskFn) -> dict[int, list[dict]]:
    """{2: items asked second, 3: items asked third}: each item with `history` [(question, the
    model's own runtime answer)] for its chat's earlier questions (`history_for(scene, seed,
    EVAL_CHAT_SALT, id, turn - 1)`). The earlier answers come from `ask`, turn by turn (a third
    question's second answer is generated with the first in its history), all items batched per
    round. Each item also gets `history_gold` (the earlier questions' gold answers) and
    `history_correct` (how many of the model's earlier answers were right)."""
    from .world import check_answer

    hist = {t: [history_for(it["scene"], seed, EVAL_CHAT_SALT, it["id"], t - 1) for it in items] for t in TURNS}
    answers: dict[int, list[list[str]]] = {t: [[] for _ in items] for t in TURNS}
    for k in range(max(TURNS) - 1):  # round k: the (k+1)-th earlier question of every chat that has one
        rows, where = [], []
        for t in TURNS:
            for i, it in enumerate(items):
                if k < t - 1:
                    q = hist[t][i][k]
                    rows.append({"question": q.question, "answer": q.answer, "image": it["image"],
                                 "history": [(h.question, a) for h, a in zip(hist[t][i][:k], answers[t][i])]})
                    where.append((t, i))
        for (t, i), raw in zip(where, ask(rows)):
            answers[t][i].append(runtime_answer(raw))
    out: dict[int, list[dict]] = {}
    for t in TURNS:
        out[t] = []
        for i, it in enumerate(items):
            h = hist[t][i]
            out[t].append(dict(it, history=[(q.question, a) for q, a in zip(h, answers[t][i])],
                               history_gold=[q.answer for q in h],
                               history_correct=sum(check_answer(a, q.answer) for q, a in zip(h, answers[t][i]))))
    return out


def follow_up_summary(first: dict, turn: dict, groups: dict[str, np.ndarray]) -> dict:
    """Per group: n, accuracy, think-rate, mean tokens of the follow-up, answers holding a think
    tag, the same items' think-rate when asked first (single-turn auto) and the gap (follow-up
    minus first, in rate units), and the share of chats whose earlier answers were all right.
    `first`/`turn`: per-item arrays {correct, thought, tokens, tags} (`turn` also `history_ok`)."""
    out = {}
    for name, m in groups.items():
        if not m.any():
            continue
        tr, tr0 = float(np.mean(turn["thought"][m])), float(np.mean(first["thought"][m]))
        out[name] = {"n": int(m.sum()), "accuracy": float(np.mean(turn["correct"][m])), "think_rate": tr,
                     "mean_tokens": float(np.mean(turn["tokens"][m])), "think_tags": int(np.sum(turn["tags"][m])),
                     "think_rate_first": tr0, "think_gap": tr - tr0,
                     "history_all_right": float(np.mean(turn["history_ok"][m]))}
    return out
