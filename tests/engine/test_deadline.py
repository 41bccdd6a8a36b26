"""Deadline mode: the plan (pinned numbers) and the engine following it on the scripted
backend, in scripted time (each forward call is one 10 ms decode step)."""
from __future__ import annotations

import pytest

from r4b_edge.engine.deadline import CLOSE_COST_TOKENS, OPEN_COST_TOKENS, SAFETY, DeadlineTracker
from r4b_edge.engine.events import Decision
from r4b_edge.engine.generate import DEFAULT_BUDGET_CLOSING, Engine, GenerationOptions
from r4b_edge.errors import GenerationOptionError
from r4b_edge.model.template import Message

from .scripted import ANSWER, REASONING, ScriptedBackend, VirtualClock

Q = [Message("user", "what is two plus two?")]


def tracker() -> DeadlineTracker:
    return DeadlineTracker(think_tokens=40, answer_tokens_think=5, answer_tokens_no_think=5)


@pytest.mark.parametrize("deadline,think,budget,why", [
    (1000, True, 80, "think fits with a budget of 80"),     # (900-20)/10 = 88 tokens left: 88-5-2-1 = 80 >= 40
    (300, True, 17, "think fits with a budget of 17"),      # 25 left: 17 tokens of reasoning, acc 0.4825 > 0.1
    (100, False, None, "no room to think"),                 # 7 left: the answer fits, no reasoning does
    (50, False, None, "nothing fits"),                      # 2.5 left: not even the answer
])
def test_plan_choices_are_pinned(deadline, think, budget, why):
    p = tracker().plan(deadline, elapsed_ms=20.0, p_think=0.9, fallback_s=0.01)
    assert (p.think, p.max_think_tokens) == (think, budget)
    assert why in p.reason
    assert p.tok_s == pytest.approx(100.0) and p.tok_s_source.startswith("decision forward")
    assert p.expected_accuracy["no-think"] == pytest.approx(0.1)
    if budget is not None:
        assert p.expected_accuracy["think"] == pytest.approx(1 - 0.9 * (1 - min(1, budget / 40)))
        assert p.expected_total_ms <= SAFETY * deadline + 1e-9


def test_plan_keeps_no_think_when_thinking_adds_little():
    p = tracker().plan(1000, elapsed_ms=20.0, p_think=0.01, fallback_s=0.01)
    assert not p.think and "< 0.02" in p.reason


def test_plan_uses_the_measured_speed_and_lengths():
    t = tracker()
    t.observe(decode_s=0.5, decode_tokens=26, thought=True, think_tokens=30, closed_itself=True, answer_tokens=3)
    p = t.plan(1000, elapsed_ms=0.0, p_think=0.9, fallback_s=0.01)
    assert p.tok_s == pytest.approx(50.0) and p.tok_s_source == "measured decode (1 replies)"
    assert p.expected_think_tokens == 30 and p.expected_answer_tokens == 3
    assert p.max_think_tokens == int((900 / 20) - 3 - CLOSE_COST_TOKENS - OPEN_COST_TOKENS)


def test_plan_respects_a_user_budget():
    p = tracker().plan(1000, elapsed_ms=20.0, p_think=0.9, fallback_s=0.01, user_budget=12)
    assert p.think and p.max_think_tokens == 12


def engine(tok, p_think=0.9):
    clock = VirtualClock()
    eng = Engine(ScriptedBackend(tok, p_think, clock=clock, prefill_s=0.02, step_s=0.01))
    eng.clock = clock
    n_reason = len(tok.encode(REASONING)) + 1
    eng.deadline = DeadlineTracker(think_tokens=n_reason, answer_tokens_think=4, answer_tokens_no_think=4)
    return eng, clock, n_reason


def ask(eng, clock, deadline_ms, **kw):
    start = clock()
    events = list(eng.stream(Q, [], GenerationOptions(deadline_ms=deadline_ms, **kw)))
    return events[0], events[-1].result, (clock() - start) * 1000.0


def test_generous_deadline_thinks_fully(tiny_tokenizer):
    eng, clock, n_reason = engine(tiny_tokenizer)
    d, r, ms = ask(eng, clock, 2000)
    assert isinstance(d, Decision) and d.deadline is not None and d.think and d.forced
    assert d.deadline.max_think_tokens >= n_reason and d.deadline.tok_s == pytest.approx(100.0)
    assert r.reasoning == REASONING.strip() and r.answer == ANSWER and not r.stats.budget_hit
    assert ms <= 2000


def test_tight_deadline_thinks_with_a_fitting_budget(tiny_tokenizer):
    eng, clock, n_reason = engine(tiny_tokenizer)
    T = (20 + 10 + (n_reason // 2 + 4 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS) * 10) / SAFETY  # half the reasoning
    d, r, ms = ask(eng, clock, T)
    assert d.think and 1 <= d.deadline.max_think_tokens < n_reason
    closing = len(tiny_tokenizer.encode(DEFAULT_BUDGET_CLOSING)) + 1  # think_tokens count the close and </think>
    assert r.stats.budget_hit and r.stats.think_tokens - closing <= d.deadline.max_think_tokens
    assert r.answer == ANSWER and ms <= T


def test_too_tight_for_thinking_answers_directly(tiny_tokenizer):
    eng, clock, _ = engine(tiny_tokenizer)
    d, r, ms = ask(eng, clock, 100)  # 20 prefill + 10 decision: 60 ms left = 6 tokens: the answer (4), no reasoning
    assert not d.think and "no room to think" in d.deadline.reason
    assert r.reasoning == "" and r.answer == ANSWER and ms <= 100


def test_low_p_think_answers_directly_whatever_the_deadline(tiny_tokenizer):
    eng, clock, _ = engine(tiny_tokenizer, p_think=0.005)
    d, r, _ = ask(eng, clock, 5000)
    assert not d.think and r.answer == ANSWER


def test_the_engine_learns_the_speed_between_replies(tiny_tokenizer):
    eng, clock, _ = engine(tiny_tokenizer)
    ask(eng, clock, 2000)
    d, _, _ = ask(eng, clock, 2000)
    assert d.deadline.tok_s_source.startswith("measured decode") and d.deadline.tok_s == pytest.approx(100.0)


def test_forced_think_gets_only_a_budget(tiny_tokenizer):
    eng, clock, n_reason = engine(tiny_tokenizer)
    d, r, ms = ask(eng, clock, 150, mode="think")
    assert d.think and d.deadline.expected_accuracy["no-think"] is None
    assert r.answer == ANSWER and ms <= 150 + 10  # forced: the smallest budget, the answer still comes


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "100", True])
def test_bad_deadline_is_refused(bad):
    with pytest.raises(GenerationOptionError, match="deadline_ms"):
        GenerationOptions(deadline_ms=bad).validate()
