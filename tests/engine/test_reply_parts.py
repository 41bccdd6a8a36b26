"""The engine's two per-reply parts: `ReplyText` (ids in, delta events out) and
`DeadlineController` (deadline mode's bookkeeping over one reply)."""
from __future__ import annotations

import pytest

from r4b_edge.engine.deadline import EMA, DeadlineController, DeadlineTracker
from r4b_edge.engine.events import AnswerDelta, Decision, ReasoningDelta
from r4b_edge.engine.text import ReplyText


def _text(events, kind):
    return "".join(e.text for e in events if isinstance(e, kind))


def test_reply_text_streams_each_part_trimmed_and_flushes(tiny_tokenizer):
    tok = tiny_tokenizer
    rt = ReplyText(tok, {}, (), None)
    ev = rt.push("reasoning", tok.encode("\n two plus two \n"))
    for t in tok.encode("  four  "):
        ev += rt.push("answer", (t,))
    ev += rt.flush()
    assert _text(ev, ReasoningDelta) == rt.texts["reasoning"].text == "two plus two"
    assert _text(ev, AnswerDelta) == rt.texts["answer"].text == "four"
    assert rt.stop.hit is None and rt.entries == {"reasoning": [], "answer": []}


def test_reply_text_stops_the_answer_not_the_reasoning(tiny_tokenizer):
    tok = tiny_tokenizer
    rt = ReplyText(tok, {}, ("plus",), None)
    ev = rt.push("reasoning", tok.encode("two plus two"))
    assert rt.stop.hit is None
    for t in tok.encode("two plus two"):
        ev += rt.push("answer", (t,))
    ev += rt.flush()
    assert rt.stop.hit == "plus" and _text(ev, AnswerDelta) == "two"
    assert _text(ev, ReasoningDelta) == "two plus two"


def test_deadline_controller_plans_a_forced_mode_and_tracks_the_live_pace():
    now = [0.0]
    t = DeadlineTracker(think_tokens=10, answer_tokens_think=4, answer_tokens_no_think=4)
    for _ in range(8):
        t.observe_step(0.01)
    dl = DeadlineController(t, 1000.0, None, lambda: now[0], 0.0)
    now[0] = 0.02
    dl.decision_starts()
    now[0] = 0.03
    d = dl.after_decision(Decision(True, None, True), timed=True)
    assert d.deadline is dl.plan and dl.plan.think and dl.think_budget() == dl.plan.max_think_tokens
    assert t.prefill_ms == pytest.approx(30.0) and dl.s_per_token == pytest.approx(0.01)
    dl.after_step(0.02)
    assert dl.s_per_token == pytest.approx((1 - EMA) * 0.01 + EMA * 0.02)
    assert not dl.must_close()
    now[0] = 0.95
    assert dl.must_close()
