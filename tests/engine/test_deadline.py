"""Deadline mode: the plan (pinned numbers) and the engine following it on the scripted
backend, in scripted time (each forward call is one 10 ms decode step)."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.engine.events import Progress
from r4b_edge.engine.deadline import (CLOSE_COST_TOKENS, EXPLORE_MIN_TOKENS, MIN_STEPS, OPEN_COST_TOKENS,
                                      PROBE_STEPS, QUANTILE, SAFETY, DeadlineTracker)
from r4b_edge.engine.events import Decision
from r4b_edge.engine.generate import DEFAULT_BUDGET_CLOSING, Engine, GenerationOptions
from r4b_edge.errors import GenerationOptionError
from r4b_edge.model.reply_lengths import ReplyLengths
from r4b_edge.model.template import Message

from .scripted import ANSWER, REASONING, ScriptedBackend, VirtualClock

Q = [Message("user", "what is two plus two?")]


def tracker() -> DeadlineTracker:
    return DeadlineTracker(think_tokens=40, answer_tokens_think=5, answer_tokens_no_think=5)


@pytest.mark.parametrize("deadline,think,budget,why", [
    (1000, True, 90, "think fits with a budget of 80"),     # (900-20)/10 = 88 left: 80 >= 40; cap (1000-20)/10-8
    (560, True, 46, "think fits with a budget of 40"),      # (504-20)/10 = 48.4 left: 40 >= the usual 40; cap 46
    (300, False, None, "does not fit"),                     # 25 left: 17 tokens < the usual 40: no gain
    (100, False, None, "no room to think"),                 # 7 left: the answer fits, no reasoning does
    (50, False, None, "nothing fits"),                      # 2.5 left: not even the answer
])
def test_plan_choices_are_pinned(deadline, think, budget, why):  # budget: the cap handed to the reply
    p = tracker().plan(deadline, elapsed_ms=20.0, p_think=0.9, fallback_s=0.01)
    assert (p.think, p.max_think_tokens) == (think, budget)
    assert why in p.reason
    assert p.tok_s == pytest.approx(100.0) and p.tok_s_source.startswith("decision forward")
    assert p.expected_accuracy["no-think"] == pytest.approx(0.1)
    if budget is not None:
        assert p.expected_accuracy["think"] == pytest.approx(1.0)
        assert p.expected_total_ms <= SAFETY * deadline + 1e-9


def test_plan_keeps_no_think_when_thinking_adds_little():
    p = tracker().plan(1000, elapsed_ms=20.0, p_think=0.01, fallback_s=0.01)
    assert not p.think and "< 0.02" in p.reason


def test_plan_uses_the_measured_speed_and_lengths():
    t = tracker()
    for s in [0.02] * 8 + [0.01, 0.05]:
        t.observe_step(s)
    t.observe(thought=True, think_tokens=30, closed_itself=True, answer_tokens=3)
    p = t.plan(1000, elapsed_ms=0.0, p_think=0.9, fallback_s=0.01)
    assert p.tok_s == pytest.approx(50.0) and p.tok_s_source == "measured decode (median of 10 steps)"
    assert p.step_ms_conservative == pytest.approx(1000 * float(np.percentile([0.02] * 8 + [0.01, 0.05], QUANTILE)))
    assert p.expected_think_tokens == 30 and p.expected_answer_tokens == 3
    # the cap handed to the reply: what fits in the whole of T (the live check closes earlier if needed)
    assert p.max_think_tokens == int((1000 / 20) - 3 - CLOSE_COST_TOKENS - OPEN_COST_TOKENS)
    assert "a budget of 39" in p.reason  # what fits in SAFETY * T decides whether to think
    t.observe_close(0.1)  # a timed closing batch (5 steps) replaces the two-step guess
    assert t.plan(1000, elapsed_ms=0.0, p_think=0.9, fallback_s=0.01).max_think_tokens == int(
        (1000 / 20) - 3 - 5 - OPEN_COST_TOKENS)


def test_must_close_assumes_the_slowest_close_and_a_long_answer():
    t = tracker()
    assert not t.must_close(1000, 869.0, 0.01)  # 869 + (1 + 5 answer) * 10 + 2 * 10 = 949 < 950
    assert t.must_close(1000, 870.0, 0.01)
    t.observe_close(0.05)
    t.observe_close(0.03)
    for n in (2, 2, 2, 12):
        t.observe(thought=True, think_tokens=0, closed_itself=False, answer_tokens=n)
    need = (1 + np.percentile([2, 2, 2, 12], QUANTILE)) * 10 + 50
    assert not t.must_close(1000, 949.0 - need, 0.01) and t.must_close(1000, 950.0 - need, 0.01)


def test_plan_before_prefill_only_when_the_usual_reasoning_cannot_fit_at_all():
    t = tracker()  # usual reasoning 40 tokens, answers 5
    assert t.plan_before_prefill(100) is None  # no decode step measured yet: prefill and decide
    for _ in range(MIN_STEPS):
        t.observe_step(0.01)
    # with nothing spent: SAFETY * T / 10 ms - 5 - 2 - 1 tokens of reasoning must reach 40
    edge = (40 + 5 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS) * 10 / SAFETY
    assert t.plan_before_prefill(edge + 1) is None
    p = t.plan_before_prefill(edge - 20)
    assert p is not None and not p.think and p.elapsed_ms == 0 and p.max_think_tokens is None
    assert p.expected_accuracy == {"no-think": None, "think": None} and "before the prefill" in p.reason
    # whatever p_think, the plan after the prefill would have chosen no-think too
    for p_think in (0.0, 0.5, 1.0):
        assert not t.plan(edge - 20, 0.0, p_think, None).think
    assert t.plan_before_prefill(edge - 20, user_budget=10) is None  # the user's budget is the usual length


def test_a_fresh_tracker_thinks_where_some_reasoning_fits_and_learns_its_length():
    """No reply has closed its reasoning yet: no made-up usual length decides. The plan thinks
    with the budget that fits when at least EXPLORE_MIN_TOKENS do, and learns L from the reply."""
    t = DeadlineTracker(answer_tokens_think=5, answer_tokens_no_think=5)
    assert t.usual() is None and t.usual(user_budget=12) == 12
    p = t.plan(1000, elapsed_ms=20.0, p_think=0.9, fallback_s=0.01)  # (900 - 20) / 10 = 88 left: 80
    assert p.think and "no reasoning length measured yet" in p.reason and p.expected_think_tokens == 80
    assert p.expected_total_ms <= SAFETY * 1000 + 1e-9
    T = (20 + (EXPLORE_MIN_TOKENS - 1 + 5 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS) * 10) / SAFETY  # room for 15
    p = t.plan(T, elapsed_ms=20.0, p_think=0.9, fallback_s=0.01)
    assert not p.think and f"{EXPLORE_MIN_TOKENS} tokens of reasoning" in p.reason
    assert not t.plan(1000, elapsed_ms=20.0, p_think=0.01, fallback_s=0.01).think  # the model says: no need
    t.observe(thought=True, think_tokens=30, closed_itself=False, answer_tokens=3)  # cut: says nothing of L
    assert t.usual() is None
    t.observe(thought=True, think_tokens=30, closed_itself=True, answer_tokens=3)
    assert t.usual() == 30 and t.plan(1000, 20.0, 0.9, 0.01).expected_think_tokens == 30


def test_a_fresh_engine_thinks_under_a_deadline(tiny_tokenizer):
    """A process whose first request has a deadline (the CLI's `chat --deadline`): it thinks,
    the reasoning closes itself within the budget, and the next plan knows its length."""
    eng, clock, n_reason = engine(tiny_tokenizer)
    eng.deadline = DeadlineTracker()  # as the Engine makes it
    d, r, ms = ask(eng, clock, 2000)
    assert d.think and "no reasoning length measured yet" in d.deadline.reason
    assert r.reasoning == REASONING.strip() and r.answer == ANSWER and not r.stats.budget_hit and ms <= 2000
    assert eng.deadline.usual() == n_reason - 1  # the reasoning's tokens (n_reason counts `</think>` too)
    d, _, _ = ask(eng, clock, 2000)
    assert d.think and f"expected reasoning {n_reason - 1}" in d.deadline.reason


def _fresh(tok, decision_s: float, step_s: float = 0.005):
    """A fresh engine with the model's lengths (as `Model` makes it from eval results) on a backend that
    reports its prefill (20 ms) and whose first forward, the decision's batch, costs `decision_s`."""
    clock = VirtualClock()
    be = ScriptedBackend(tok, 0.9, clock=clock, prefill_s=0.02, report_prefill=True,
                         step_time=lambda call, n: decision_s if call == 1 else step_s)
    n_reason = len(tok.encode(REASONING))
    eng = Engine(be, ReplyLengths(n_reason, 4.0, 4.0, "eval results"))
    eng.clock = clock
    return eng, clock, n_reason


def test_a_fresh_engine_plans_from_the_models_lengths(tiny_tokenizer):
    eng, _, n_reason = _fresh(tiny_tokenizer, 0.005)
    t = eng.deadline
    assert (t.usual(), t.answer_tokens[True], t.answer_tokens[False]) == (n_reason, 4.0, 4.0)
    assert "the model's eval results" in t.lengths_source
    assert "no eval results" in Engine(eng.backend).deadline.lengths_source  # a model without them: defaults
    assert Engine(eng.backend).deadline.usual() is None


def test_a_fresh_engine_measures_the_pace_where_it_decides(tiny_tokenizer):
    """A fresh process knows a step costs between the prefill's time per position (20 ms / the prompt
    here) and the decision forward's (15 ms here, against 5 ms steps): thinking fits T at the fast
    bound, probe included, but not at the slow one, so the engine times PROBE_STEPS steps first,
    rolls them back, and thinks at the measured pace, in time."""
    eng, clock, n_reason = _fresh(tiny_tokenizer, 0.015)
    steps = n_reason + 4 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS  # the reasoning, answer, close, opening
    T = (20 + 15 + PROBE_STEPS * 5 + steps * 5) / SAFETY + 1  # fits at 5 ms a step, not at 15
    assert 20 + 15 + steps * 15 > SAFETY * T
    d, r, ms = ask(eng, clock, T)
    assert d.think and d.deadline.tok_s == pytest.approx(200.0)
    assert d.deadline.tok_s_source == f"measured decode (median of {PROBE_STEPS} steps)"
    assert "the model's eval results" in d.deadline.lengths_source
    assert r.reasoning == REASONING.strip() and r.answer == ANSWER and not r.stats.budget_hit and ms <= T
    assert eng.backend.forwarded[1:1 + PROBE_STEPS] == [1] * PROBE_STEPS  # the probe's steps, rolled back
    assert d.deadline.elapsed_ms == pytest.approx(20 + 15 + PROBE_STEPS * 5)  # the probe counts in the reply


def test_the_probe_stops_once_thinking_cannot_fit(tiny_tokenizer):
    """At a tight T thinking fits only at the prefill's pace: the probe's first two steps (5 ms) say
    it does not, so the probe stops there and the direct answer pays two steps, not PROBE_STEPS."""
    eng, clock, _ = _fresh(tiny_tokenizer, 0.015)
    d, r, ms = ask(eng, clock, 100.0)
    assert not d.think and r.answer == ANSWER and ms <= 100.0
    assert d.deadline.elapsed_ms == pytest.approx(20 + 15 + 2 * 5) and len(eng.deadline.steps) >= 2
    assert d.deadline.tok_s_source.startswith("decision forward")  # one step is not a measured pace


def test_no_probe_where_the_slow_bound_already_fits(tiny_tokenizer):
    eng, clock, n_reason = _fresh(tiny_tokenizer, 0.015)
    T = (20 + 15 + (n_reason + 4 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS) * 15) / SAFETY + 1
    d, r, ms = ask(eng, clock, T)
    assert d.think and d.deadline.tok_s_source.startswith("decision forward") and r.answer == ANSWER
    assert d.deadline.elapsed_ms == pytest.approx(20 + 15) and ms <= T


def test_percentile_is_numpys_linear_one():
    from r4b_edge.engine.deadline import percentile

    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 5, 37, 512):
        xs = list(rng.random(n))
        for q in (0.0, 50.0, QUANTILE, 100.0):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)


def test_plan_respects_a_user_budget():
    p = tracker().plan(1000, elapsed_ms=20.0, p_think=0.9, fallback_s=0.01, user_budget=12)
    assert p.think and p.max_think_tokens == 12


def engine(tok, p_think=0.9, step_time=None, usual=1.0):
    """`usual`: the tracker's usual reasoning length as a share of the script's (below 1, the
    reasoning runs longer than planned for, and the budget cuts it)."""
    clock = VirtualClock()
    eng = Engine(ScriptedBackend(tok, p_think, clock=clock, prefill_s=0.02, step_s=0.01, step_time=step_time))
    eng.clock = clock
    n_reason = len(tok.encode(REASONING)) + 1
    eng.deadline = DeadlineTracker(think_tokens=int(usual * n_reason), answer_tokens_think=4, answer_tokens_no_think=4)
    return eng, clock, n_reason


def ask(eng, clock, deadline_ms, **kw):
    start = clock()
    events = [e for e in eng.stream(Q, [], GenerationOptions(deadline_ms=deadline_ms, **kw)) if not isinstance(e, Progress)]
    return events[0], events[-1].result, (clock() - start) * 1000.0


def test_generous_deadline_thinks_fully(tiny_tokenizer):
    eng, clock, n_reason = engine(tiny_tokenizer)
    d, r, ms = ask(eng, clock, 2000)
    assert isinstance(d, Decision) and d.deadline is not None and d.think and d.forced
    assert d.deadline.max_think_tokens >= n_reason and d.deadline.tok_s == pytest.approx(100.0)
    assert r.reasoning == REASONING.strip() and r.answer == ANSWER and not r.stats.budget_hit
    assert ms <= 2000


def test_half_the_usual_reasoning_answers_directly(tiny_tokenizer):
    """A deadline with room for half the usual reasoning: cut-short reasoning counts as no gain."""
    eng, clock, n_reason = engine(tiny_tokenizer)
    T = (20 + 10 + (n_reason // 2 + 4 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS) * 10) / SAFETY
    d, r, ms = ask(eng, clock, T)
    assert not d.think and "does not fit" in d.deadline.reason and r.answer == ANSWER and ms <= T


def test_tight_deadline_thinks_with_a_fitting_budget(tiny_tokenizer):
    """The usual reasoning (half the script's) fits: think with that budget; this reasoning runs
    longer, the budget cuts it, and the answer is in time."""
    eng, clock, n_reason = engine(tiny_tokenizer, usual=0.5)
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


def test_a_deadline_too_tight_to_think_skips_the_decision_forward(tiny_tokenizer):
    """Once the pace is measured, a T where no reasoning could fit even with a free prefill is
    answered like fixed no-think: the empty think block is prefilled with the prompt, no
    decision forward runs, and the reply arrives sooner than one that measures p_think."""
    eng, clock, _ = engine(tiny_tokenizer)
    ask(eng, clock, 2000)  # a first reply measures the steps
    calls = eng.backend.calls
    d, r, ms = ask(eng, clock, 100)
    assert not d.think and d.forced and d.p_think is None and "before the prefill" in d.deadline.reason
    assert r.answer == ANSWER and r.reasoning == "" and r.stats.decision_ms < 1.0
    skipped_calls = eng.backend.calls - calls
    eng2, clock2, _ = engine(tiny_tokenizer)  # the same reply, deciding after the prefill
    d2, r2, ms2 = ask(eng2, clock2, 100)
    assert d2.p_think is not None and "no room to think" in d2.deadline.reason and r2.answer == ANSWER
    assert eng2.backend.calls == skipped_calls + 1 and ms == pytest.approx(ms2 - 10)


def test_low_p_think_answers_directly_whatever_the_deadline(tiny_tokenizer):
    eng, clock, _ = engine(tiny_tokenizer, p_think=0.005)
    d, r, _ = ask(eng, clock, 5000)
    assert not d.think and r.answer == ANSWER


def test_the_engine_learns_the_speed_between_replies(tiny_tokenizer):
    eng, clock, _ = engine(tiny_tokenizer)
    ask(eng, clock, 2000)
    d, _, _ = ask(eng, clock, 2000)
    assert d.deadline.tok_s_source.startswith("measured decode") and d.deadline.tok_s == pytest.approx(100.0)


def test_a_budget_cut_reply_does_not_make_decoding_look_faster(tiny_tokenizer):
    """The closing line goes in one batch: the tracker times it apart from the steps, so after
    a budget-cut reply the pace is still one step per 10 ms (dividing the loop's time by its
    filed tokens, closing line included, made it look about twice as fast)."""
    eng, clock, n_reason = engine(tiny_tokenizer, usual=0.5)
    T = (20 + 10 + (n_reason // 2 + 4 + CLOSE_COST_TOKENS + OPEN_COST_TOKENS) * 10) / SAFETY
    _, r, _ = ask(eng, clock, T)
    assert r.stats.budget_hit and list(eng.deadline.closes) == [pytest.approx(0.01)]
    assert set(round(s, 6) for s in eng.deadline.steps) == {0.01}
    d, _, _ = ask(eng, clock, T)
    assert d.deadline.tok_s == pytest.approx(100.0) and d.deadline.step_ms_conservative == pytest.approx(10.0)


def _slowdown(after_calls: int, factor: float):
    """Step time 10 ms, `factor` times that from forward call `after_calls` on (load arrives)."""
    return lambda call, n: 0.01 * (factor if call >= after_calls else 1.0)


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_a_machine_that_slows_down_mid_reply_still_answers_within_t(tiny_tokenizer, factor):
    """The plan assumed 10 ms steps; from the third forward call (the first reasoning step) on
    they take `factor` x that. The live check re-measures every step and closes the reasoning
    earlier: the answer is still in time (the reasoning shorter), at every deadline where
    thinking was planned. (A 4x jump cannot be met at T = 230: the closing batch and the
    answer's three steps alone then take 160 ms after the 80 ms already spent.)"""
    for T in (230, 260, 330, 420):
        eng, clock, n_reason = engine(tiny_tokenizer, step_time=_slowdown(3, factor), usual=0.5)
        d, r, ms = ask(eng, clock, T)
        assert d.think, T
        assert r.answer == ANSWER and ms <= T, (T, ms, r.stats.think_tokens)


def test_jittery_steps_are_planned_at_their_quantile(tiny_tokenizer):
    """Steps alternating 5 / 25 ms (median 15): the live check paces the reply at the 90th
    percentile, so the replies stay within T though half the steps are slower than planned."""
    eng, clock, n_reason = engine(tiny_tokenizer, step_time=lambda call, n: 0.005 if call % 2 else 0.025)
    ask(eng, clock, 5000)  # a first reply: the steps get measured
    for T in (200, 260, 330, 420):
        d, r, ms = ask(eng, clock, T)
        assert d.deadline.tok_s_source.startswith("measured decode")
        assert d.deadline.step_ms_conservative == pytest.approx(25.0)
        assert r.answer == ANSWER and ms <= T, (T, ms)


def test_forced_think_gets_only_a_budget(tiny_tokenizer):
    eng, clock, n_reason = engine(tiny_tokenizer)
    d, r, ms = ask(eng, clock, 150, mode="think")
    assert d.think and d.deadline.expected_accuracy["no-think"] is None
    assert r.answer == ANSWER and ms <= 150 + 10  # forced: the smallest budget, the answer still comes


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "100", True])
def test_bad_deadline_is_refused(bad):
    with pytest.raises(GenerationOptionError, match="deadline_ms"):
        GenerationOptions(deadline_ms=bad).validate()
