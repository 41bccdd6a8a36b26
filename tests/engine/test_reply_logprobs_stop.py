"""Logprobs and stop strings through generation: on the scripted backend (exact probabilities, a stop
string split across tokens, reasoning never cut) and on the tiny torch model (equal to `score`, also
when sampling at a temperature)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import r4b_edge
from r4b_edge.engine.events import AnswerDelta, Done, ReasoningDelta
from r4b_edge.engine.generate import Engine, GenerationOptions
from r4b_edge.engine.score import score_ids
from r4b_edge.errors import GenerationOptionError
from r4b_edge.model.template import EMPTY_THINK_CONTINUATION, Message, render_prompt

from .scripted import ANSWER, REASONING, ScriptedBackend

Q = [Message("user", "what is two plus two?")]
LONG_ANSWER = "the sum is four, so four it is"


class LongAnswer(ScriptedBackend):
    """The scripted model with a multi-token answer."""

    def __init__(self, tok, p_think: float):
        super().__init__(tok, p_think)
        self.answer = tok.encode("\n\n" + LONG_ANSWER) + [tok.im_end]


def run(backend, **opts):
    events = list(Engine(backend).stream(Q, [], GenerationOptions(**opts)))
    return events, events[-1].result


def test_reply_logprobs_are_the_scripts_probabilities(tiny_tokenizer):
    tok = tiny_tokenizer
    events, r = run(ScriptedBackend(tok, 0.9), logprobs=True, top_logprobs=2)
    assert r.thought
    reasoning, answer = r.reasoning_logprobs, r.logprobs
    # one entry per sampled text token, in order; tags and the end token have none
    text_ids = [t for t in r.token_ids if t not in (tok.end_think, tok.think) and t not in tok.eos_ids]
    assert [e.id for e in reasoning + answer] == text_ids
    assert b"".join(bytes(e.bytes) for e in reasoning).decode() == REASONING
    assert b"".join(bytes(e.bytes) for e in answer).decode().strip() == ANSWER
    # one reasoning token is where the script branches: P = p_think (0.9) there, 1 elsewhere
    branch = [i for i, e in enumerate(reasoning) if abs(e.logprob) > 1e-6]
    assert len(branch) == 1 and branch[0] <= 1
    first = reasoning[branch[0]]
    assert first.logprob == pytest.approx(math.log(0.9), abs=1e-6)
    assert [t.id for t in first.top_logprobs][0] == first.id
    assert first.top_logprobs[1].logprob == pytest.approx(math.log(0.1), abs=1e-6)
    assert all(abs(e.logprob) < 1e-6 for e in answer)
    # the deltas carry the entries as their text is shown; what they did not carry is the result's tail
    sent_r = [e for ev in events if isinstance(ev, ReasoningDelta) for e in ev.logprobs]
    sent_a = [e for ev in events if isinstance(ev, AnswerDelta) for e in ev.logprobs]
    assert sent_r == reasoning[:len(sent_r)] and sent_a == answer[:len(sent_a)]
    assert len(sent_a) >= len(answer) - 1 and sent_a


def test_no_logprobs_unless_asked(tiny_tokenizer):
    events, r = run(ScriptedBackend(tiny_tokenizer, 0.9))
    assert r.logprobs is None and r.reasoning_logprobs is None
    assert all(ev.logprobs == () for ev in events if isinstance(ev, (AnswerDelta, ReasoningDelta)))


@pytest.mark.parametrize("stop", ["is four", ["zebra", "so f"], "four,", "e sum", ","])
def test_stop_cuts_the_answer_split_across_tokens(tiny_tokenizer, stop):
    events, r = run(LongAnswer(tiny_tokenizer, 0.1), stop=stop, logprobs=True)
    stops = [stop] if isinstance(stop, str) else stop
    hit = min((s for s in stops if s in LONG_ANSWER), key=LONG_ANSWER.find)
    want = LONG_ANSWER[:LONG_ANSWER.find(hit)].rstrip()
    assert r.answer == want and r.stop_sequence == hit and r.stats.finish_reason == "stop"
    shown = "".join(ev.text for ev in events if isinstance(ev, AnswerDelta))
    assert shown == want  # no part of the stop string was ever streamed
    # the reply ended at the token that completed the stop string
    parts = [bytes(e.bytes) for e in r.logprobs]
    seen, before = (b"".join(p).decode(errors="replace").lstrip() for p in (parts, parts[:-1]))
    assert seen.startswith(want) and hit in seen and hit not in before
    assert r.token_ids[-1] not in tiny_tokenizer.eos_ids


def test_stop_not_met_and_never_applied_to_reasoning(tiny_tokenizer):
    _, r = run(ScriptedBackend(tiny_tokenizer, 0.9), stop=["two", "zebra"])
    assert r.reasoning == REASONING.strip() and "two" in r.reasoning
    assert r.answer == ANSWER and r.stop_sequence is None and r.stats.finish_reason == "stop"
    _, r = run(LongAnswer(tiny_tokenizer, 0.1), stop=" it is!")  # a held prefix released at the end
    assert r.answer == LONG_ANSWER and r.stop_sequence is None


def test_stop_at_the_start_gives_an_empty_answer(tiny_tokenizer):
    _, r = run(LongAnswer(tiny_tokenizer, 0.1), stop="the")
    assert r.answer == "" and r.stop_sequence == "the"


def test_option_checks(tiny_tokenizer):
    eng = Engine(ScriptedBackend(tiny_tokenizer, 0.5))
    for bad in ({"stop": [""]}, {"stop": 5}, {"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(GenerationOptionError):
            list(eng.stream(Q, [], GenerationOptions(**bad)))
    assert GenerationOptions(stop="x").validate().stop == ("x",)


# ---- the tiny torch model: reply logprobs == score, at any temperature ------------------------------
@pytest.fixture(scope="module")
def model(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu") as m:
        yield m


def _img():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(5).integers(0, 255, (30, 50, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "seed": 3, "top_k": 20}])
def test_reply_logprobs_equal_score_of_the_same_tokens(model, sampling):
    """Sampled at T=1.3 with top-k 20, the entries are still the model's own distribution (score's)."""
    tok = model.tokenizer
    img = _img()
    r = model.chat(img, "what is it?", mode="no-think", max_tokens=12, logprobs=True, top_logprobs=4, **sampling)
    entries = r.reasoning_logprobs + r.logprobs
    assert entries, "fixture: the tiny model wrote some text"
    forced = len(tok.encode(EMPTY_THINK_CONTINUATION))  # token_ids start at <think>: the no-think block first
    ids = [t for t in r.token_ids[forced:] if t not in tok.eos_ids]
    rendered = render_prompt([Message("user", "what is it?", images=1)], "no-think")
    s = score_ids(model.engine, rendered, [model.prepare(img)], [ids], top_logprobs=4)[0]
    by_pos = {i: lp for i, (t, lp) in enumerate(zip(s.ids, s.logprobs)) if t not in (tok.think, tok.end_think)}
    assert [e.id for e in entries] == [s.ids[i] for i in sorted(by_pos)]
    np.testing.assert_allclose([e.logprob for e in entries], [by_pos[i] for i in sorted(by_pos)], atol=1e-5)
    tops = [s.top_logprobs[i] for i in sorted(by_pos)]
    for e, t in zip(entries, tops):
        assert [x.id for x in e.top_logprobs] == [x.id for x in t]
