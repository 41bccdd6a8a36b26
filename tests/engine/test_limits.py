"""The engine's limits hold (#14 items 1-5): max_tokens and the context are hard
bounds even when the budget closes the reasoning, token counts are one definition
in every mode, the answer never holds a think tag, forced modes skip the decision."""
from __future__ import annotations

import pytest

from r4b_edge.engine.events import Progress
from r4b_edge.engine.events import AnswerDelta, Done, ReasoningDelta
from r4b_edge.engine.generate import Engine, GenerationOptions
from r4b_edge.model.template import EMPTY_THINK_CONTINUATION, Message, render_prompt

from .scripted import ANSWER, REASONING, ScriptedBackend

Q = [Message("user", "what is two plus two?")]
CLOSING = "\nOut of time.\n"


def run(tok, p_think, n_ctx=4096, answer_ids=None, **opts):
    be = ScriptedBackend(tok, p_think, n_ctx=n_ctx, answer_ids=answer_ids)
    events = [e for e in Engine(be).stream(Q, [], GenerationOptions(**opts)) if not isinstance(e, Progress)]
    return events, events[-1].result, be


# ---- 1. max_tokens is a hard bound ----------------------------------------------------------
def test_budget_close_counts_against_max_tokens(tiny_tokenizer):
    """The issue's case: think mode, budget 1, max_tokens 3 returned 45 tokens."""
    _, r, _ = run(tiny_tokenizer, 0.99, mode="think", max_think_tokens=1, max_tokens=3)
    assert len(r.token_ids) <= 3
    assert r.stats.finish_reason == "length"
    assert "budget" not in r.reasoning  # the closing line did not fit: none of it is written


@pytest.mark.parametrize("mode", ["auto", "think", "no-think"])
@pytest.mark.parametrize("budget", [None, 0, 2, 5])
def test_reply_never_exceeds_max_tokens(tiny_tokenizer, mode, budget):
    for max_tokens in range(1, 45):
        _, r, _ = run(tiny_tokenizer, 0.99, mode=mode, max_think_tokens=budget, max_tokens=max_tokens,
                      budget_closing=CLOSING)
        assert len(r.token_ids) <= max_tokens, (mode, budget, max_tokens)
        s = r.stats
        assert s.finish_reason in ("stop", "length")
        if s.finish_reason == "stop":
            assert r.token_ids[-1] == tiny_tokenizer.im_end and r.answer == ANSWER
        if s.budget_hit and CLOSING.strip() in r.reasoning:
            assert tiny_tokenizer.end_think in r.token_ids  # the closing is written whole or not at all


def test_closing_that_fits_exactly_is_written(tiny_tokenizer):
    closing = tiny_tokenizer.encode(CLOSING)
    # think mode: 2 budget tokens (the forced "\n" opening is the first), closing, </think>, "\n\n"
    n = 2 + len(closing) + 1 + len(tiny_tokenizer.encode("\n\n"))
    _, r, _ = run(tiny_tokenizer, 0.99, mode="think", max_think_tokens=2, max_tokens=n, budget_closing=CLOSING)
    assert len(r.token_ids) == n and r.stats.finish_reason == "length"
    assert r.reasoning.endswith(CLOSING.strip()) and r.answer == ""
    _, r, _ = run(tiny_tokenizer, 0.99, mode="think", max_think_tokens=2, max_tokens=n - 1, budget_closing=CLOSING)
    assert len(r.token_ids) == 2 and r.stats.finish_reason == "length"
    assert CLOSING.strip() not in r.reasoning


# ---- 2. the context is a hard bound ---------------------------------------------------------
def _prompt_len(tok) -> int:
    return len(tok.encode(render_prompt(Q, "auto")))


@pytest.mark.parametrize("room", [7, 12, 20, 30, 40])
def test_budget_close_past_the_context_ends_with_length(tiny_tokenizer, room):
    n_ctx = _prompt_len(tiny_tokenizer) + room
    events, r, be = run(tiny_tokenizer, 0.99, n_ctx=n_ctx, mode="think", max_think_tokens=3,
                        budget_closing="\nThe thinking budget is used up, so I answer now.\n")
    assert isinstance(events[-1], Done)
    assert r.stats.finish_reason in ("length", "stop")
    assert be.n_past <= n_ctx
    assert r.stats.prompt_tokens + len(r.token_ids) <= n_ctx + 1  # the last token need not be fed


def test_reply_fills_the_context_then_stops(tiny_tokenizer):
    n_ctx = _prompt_len(tiny_tokenizer) + 10
    _, r, be = run(tiny_tokenizer, 0.99, n_ctx=n_ctx, mode="think", max_tokens=1000)
    assert r.stats.finish_reason == "length" and be.n_past == n_ctx
    assert r.stats.prompt_tokens + len(r.token_ids) == n_ctx + 1


# ---- 3. one definition of the token counts ------------------------------------------------
def test_same_reply_same_token_ids_in_every_mode(tiny_tokenizer):
    _, auto, _ = run(tiny_tokenizer, 0.9)
    _, think, _ = run(tiny_tokenizer, 0.9, mode="think")
    assert auto.thought and think.thought
    assert auto.token_ids == think.token_ids
    assert auto.stats.think_tokens == think.stats.think_tokens
    _, direct, _ = run(tiny_tokenizer, 0.1)
    _, nothink, _ = run(tiny_tokenizer, 0.9, mode="no-think")
    assert direct.token_ids == nothink.token_ids
    assert direct.stats.prompt_tokens == nothink.stats.prompt_tokens == auto.stats.prompt_tokens


def test_token_ids_are_the_reply_after_think(tiny_tokenizer):
    tok = tiny_tokenizer
    _, r, _ = run(tok, 0.1, mode="no-think")
    assert tok.decode(r.token_ids) == EMPTY_THINK_CONTINUATION + ANSWER + "<|im_end|>"
    assert (r.stats.think_tokens, r.stats.answer_tokens) == (0, len(r.token_ids))
    _, r, _ = run(tok, 0.9, mode="think")
    assert tok.decode(r.token_ids) == REASONING + "</think>\n\n" + ANSWER + "<|im_end|>"
    assert r.stats.think_tokens == len(tok.encode(REASONING)) + 1  # through </think>
    assert r.stats.think_tokens + r.stats.answer_tokens == len(r.token_ids)


@pytest.mark.parametrize("mode", ["auto", "think"])
def test_think_tokens_include_the_closing_line(tiny_tokenizer, mode):
    tok = tiny_tokenizer
    _, r, _ = run(tok, 0.99, mode=mode, max_think_tokens=4, budget_closing=CLOSING)
    assert r.stats.budget_hit and r.answer == ANSWER
    assert r.stats.think_tokens == 4 + len(tok.encode(CLOSING)) + 1
    assert r.stats.think_tokens + r.stats.answer_tokens == len(r.token_ids)
    assert tok.decode(r.token_ids).startswith(REASONING[:3])
    assert CLOSING + "</think>" in tok.decode(r.token_ids)


# ---- 4. no think tag in the answer -----------------------------------------------------------
@pytest.mark.parametrize("tail", ["special-close", "special-open", "text-close", "text-open"])
def test_think_tag_in_the_answer_ends_it(tiny_tokenizer, tail):
    tok = tiny_tokenizer
    tag = {"special-close": [tok.end_think], "special-open": [tok.think],
           "text-close": tok.encode("<") + tok.encode("/think>"),
           "text-open": tok.encode("<") + tok.encode("think") + tok.encode(">")}[tail]
    if tail.startswith("text"):
        assert tok.think not in tag and tok.end_think not in tag  # spelled out, not the special token
    ids = tok.encode("four") + tag + tok.encode(" more")
    events, r, _ = run(tok, 0.1, answer_ids=ids)
    streamed = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert r.answer == streamed == "four"
    assert "<think>" not in r.answer and "</think>" not in r.answer
    assert r.stats.finish_reason == "stop"


def test_raw_completion_keeps_think_tags_as_text(tiny_tokenizer):
    """A prompt with no assistant header is a plain completion: there is no answer to guard."""
    tok = tiny_tokenizer
    be = ScriptedBackend(tok, 0.1, answer_ids=tok.encode("four") + [tok.end_think] + tok.encode(" more"))
    r = Engine(be).generate_prompt("two plus two is", [], GenerationOptions(max_tokens=40))
    # the script writes its empty block, then its answer and the tag, and again: all of it is completion text
    assert r.answer.startswith("</think>\n\nfour</think>\n\nfour</think>")
    assert r.stats.finish_reason == "length" and len(r.token_ids) == 40


def test_angle_bracket_that_is_not_a_tag_stays(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("2 <") + tok.encode(" 3 </t")
    events, r, _ = run(tok, 0.1, answer_ids=ids)
    assert r.answer == "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "2 < 3 </t"


# ---- 5. forced modes skip the decision forward -----------------------------------------------
@pytest.mark.parametrize("mode,think", [("no-think", False), ("think", True)])
def test_forced_mode_runs_no_decision_forward(tiny_tokenizer, mode, think):
    events, r, be = run(tiny_tokenizer, 0.6, mode=mode)
    assert (r.thought, r.forced, r.p_think, events[0].p_think) == (think, True, None, None)
    assert set(be.forwarded) == {1}  # only the sampled tokens, one by one: no batched decision forward
    assert r.answer == ANSWER and (r.reasoning == REASONING.strip()) == think


@pytest.mark.parametrize("mode", ["no-think", "think"])
def test_forced_mode_measures_p_think_when_asked(tiny_tokenizer, mode):
    _, r, be = run(tiny_tokenizer, 0.6, mode=mode, measure_p_think=True)
    assert r.p_think == pytest.approx(0.6, abs=1e-6)
    _, plain, _ = run(tiny_tokenizer, 0.6, mode=mode)
    assert plain.token_ids == r.token_ids and plain.stats.prompt_tokens == r.stats.prompt_tokens


def test_reasoning_streams_in_forced_think(tiny_tokenizer):
    events, r, _ = run(tiny_tokenizer, 0.6, mode="think")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == r.reasoning == REASONING.strip()


def test_a_reply_that_ends_inside_its_think_block_says_so(tiny_tokenizer) -> None:
    """#27 item 6: an end token before `</think>` gives finish_reason "stop_in_reasoning" (the
    faces say "the model stopped while reasoning"), never an empty answer with "stop"."""
    tok = tiny_tokenizer
    be = ScriptedBackend(tok, 1.0)
    be.think = tok.encode(REASONING) + [tok.im_end]
    r = Engine(be).generate(Q, [], GenerationOptions(mode="auto", max_tokens=64))
    assert r.thought and r.reasoning.strip() and r.answer == ""
    assert r.stats.finish_reason == "stop_in_reasoning"
    direct = Engine(ScriptedBackend(tok, 0.0)).generate(Q, [], GenerationOptions(mode="auto", max_tokens=64))
    assert direct.stats.finish_reason == "stop" and direct.answer == ANSWER
