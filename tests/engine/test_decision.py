"""Engine logic on a scripted backend: decision, threshold, budget, split, sampling."""
from __future__ import annotations

import pytest

from r4b_edge.engine.events import Progress
from r4b_edge.engine.events import AnswerDelta, Decision, Done, ReasoningDelta
from r4b_edge.engine.generate import Engine, GenerationOptions
from r4b_edge.errors import ContextLengthError, GenerationOptionError
from r4b_edge.model.template import Message

from .scripted import ANSWER, REASONING, ScriptedBackend

Q = [Message("user", "what is two plus two?")]


def run(tok, p_think, **opts):
    eng = Engine(ScriptedBackend(tok, p_think))
    events = [e for e in eng.stream(Q, [], GenerationOptions(**opts)) if not isinstance(e, Progress)]
    return events, events[-1].result


@pytest.mark.parametrize("p", [0.9, 0.3, 0.6])
def test_p_think_is_one_minus_empty_probability(tiny_tokenizer, p):
    events, r = run(tiny_tokenizer, p)
    assert isinstance(events[0], Decision)
    assert r.p_think == pytest.approx(p, abs=1e-6)
    assert events[0].p_think == r.p_think


def test_auto_greedy_follows_model_choice_think(tiny_tokenizer):
    events, r = run(tiny_tokenizer, 0.9)
    d = events[0]
    assert (d.think, d.forced) == (True, False)
    assert r.thought and r.reasoning == REASONING.strip() and r.answer == ANSWER
    assert r.stats.think_tokens > 0 and r.stats.answer_tokens > 0
    assert r.stats.finish_reason == "stop"


def test_auto_greedy_follows_model_choice_direct(tiny_tokenizer):
    events, r = run(tiny_tokenizer, 0.2)
    assert (events[0].think, events[0].forced) == (False, False)
    assert r.reasoning == "" and r.answer == ANSWER and r.stats.think_tokens == 0
    assert not any(isinstance(e, ReasoningDelta) for e in events)


def test_decision_comes_first_and_done_last(tiny_tokenizer):
    events, _ = run(tiny_tokenizer, 0.9)
    assert isinstance(events[0], Decision) and isinstance(events[-1], Done)
    assert sum(isinstance(e, Decision) for e in events) == 1
    kinds = [type(e) for e in events[1:-1]]
    assert set(kinds) <= {ReasoningDelta, AnswerDelta}
    # reasoning streams before the answer
    last_r = max(i for i, k in enumerate(kinds) if k is ReasoningDelta)
    first_a = min(i for i, k in enumerate(kinds) if k is AnswerDelta)
    assert last_r < first_a


@pytest.mark.parametrize("threshold,p,think", [(0.5, 0.6, True), (0.5, 0.4, False), (0.95, 0.9, False),
                                               (0.1, 0.3, True), (0.0, 0.0, True), (1.0, 0.99, False)])
def test_threshold_forces_the_chosen_prefix(tiny_tokenizer, threshold, p, think):
    events, r = run(tiny_tokenizer, p, think_threshold=threshold)
    assert (events[0].think, events[0].forced) == (think, True)
    assert r.thought == think
    assert r.answer == ANSWER
    if not think:
        assert r.reasoning == "" and r.stats.think_tokens == 0


def test_forced_modes(tiny_tokenizer):
    _, r = run(tiny_tokenizer, 0.6, mode="think", think_threshold=None)
    assert r.thought and r.forced and r.reasoning == REASONING.strip() and r.answer == ANSWER
    _, r = run(tiny_tokenizer, 0.95, mode="no-think")
    assert not r.thought and r.forced and r.reasoning == "" and r.answer == ANSWER
    assert r.p_think is None  # not measured unless asked for
    _, r = run(tiny_tokenizer, 0.95, mode="no-think", measure_p_think=True)
    assert r.p_think == pytest.approx(0.95, abs=1e-6)


@pytest.mark.parametrize("mode", ["auto", "think"])
def test_budget_closes_reasoning_even_when_model_opened_it(tiny_tokenizer, mode):
    full = len(tiny_tokenizer.encode(REASONING))
    budget = 3
    _, r = run(tiny_tokenizer, 0.99, mode=mode, max_think_tokens=budget, budget_closing="\nOut of time.\n")
    assert r.stats.budget_hit
    closing = len(tiny_tokenizer.encode("\nOut of time.\n"))
    assert r.stats.think_tokens == budget + closing + 1 < full + closing + 1  # through the closing and </think>
    assert r.reasoning.endswith("Out of time.")
    assert r.answer == ANSWER


def test_budget_zero_in_auto(tiny_tokenizer):
    _, r = run(tiny_tokenizer, 0.99, max_think_tokens=0, budget_closing="")
    assert r.thought and r.stats.budget_hit and r.reasoning == "" and r.answer == ANSWER


def test_max_tokens_bounds_reply(tiny_tokenizer):
    _, r = run(tiny_tokenizer, 0.99, max_tokens=4)
    assert r.stats.finish_reason == "length"
    assert len(r.token_ids) == 4


def test_prompt_ending_with_think_close_is_answer(tiny_tokenizer):
    """A prompt that closes the think block itself: everything is answer."""
    eng = Engine(ScriptedBackend(tiny_tokenizer, 0.99))
    prompt = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nmine\n</think>\n\n"
    r = eng.generate_prompt(prompt, [], GenerationOptions())
    assert not r.thought and r.reasoning == ""
    assert r.answer  # filed as answer, not reasoning


def test_prompt_ending_with_open_think_is_reasoning(tiny_tokenizer):
    eng = Engine(ScriptedBackend(tiny_tokenizer, 0.99))
    prompt = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nlet me see"
    r = eng.generate_prompt(prompt, [], GenerationOptions(max_tokens=6, max_think_tokens=2, budget_closing=""))
    assert r.thought and r.forced
    assert r.stats.think_tokens == 2 + 1 and r.stats.budget_hit  # 2 reasoning tokens, then </think>
    assert r.reasoning and r.answer  # reasoning first, then the answer after the forced close


def test_sampling_seeded_is_reproducible(tiny_tokenizer):
    outs = {run(tiny_tokenizer, 0.5, temperature=1.0, seed=s)[1].thought for s in range(12)}
    assert outs == {True, False}  # the model's own sampled choice varies
    a = run(tiny_tokenizer, 0.5, temperature=1.0, seed=7)[1]
    b = run(tiny_tokenizer, 0.5, temperature=1.0, seed=7)[1]
    assert a.token_ids == b.token_ids and a.thought == b.thought


def test_stream_equals_blocking(tiny_tokenizer):
    events, r = run(tiny_tokenizer, 0.9)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == r.reasoning
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == r.answer
    r2 = Engine(ScriptedBackend(tiny_tokenizer, 0.9)).generate(Q, [], GenerationOptions())
    assert (r2.answer, r2.reasoning, r2.token_ids, r2.p_think) == (r.answer, r.reasoning, r.token_ids, r.p_think)


@pytest.mark.parametrize("opts,msg", [
    (dict(mode="sometimes"), "unknown mode 'sometimes'"),
    (dict(think_threshold=1.5), "within [0, 1], got 1.5"),
    (dict(think_threshold=-0.1), "within [0, 1], got -0.1"),
    (dict(max_think_tokens=-1), "max_think_tokens must be an integer >= 0 or None, got -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
    (dict(top_p=0.0), "top_p must be a number in (0, 1], got 0.0"),
    (dict(seed=-3), "seed must be a non-negative integer, got -3"),
])
def test_bad_options(tiny_tokenizer, opts, msg):
    with pytest.raises(GenerationOptionError) as e:
        run(tiny_tokenizer, 0.5, **opts)
    assert msg in str(e.value)


def test_context_length_error_names_both_numbers(tiny_tokenizer):
    eng = Engine(ScriptedBackend(tiny_tokenizer, 0.5, n_ctx=16))
    with pytest.raises(ContextLengthError) as e:
        eng.generate([Message("user", "word " * 40)], [], GenerationOptions())
    assert "context is 16 tokens" in str(e.value)
