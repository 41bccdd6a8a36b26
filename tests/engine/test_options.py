"""Options and texts are checked once per call and fail as R4BError (#14 item 7);
the mode is data with one precedence rule (#17 item 8), spelled one way (#25 item 2)."""
from __future__ import annotations

import pytest

from r4b_edge.engine.generate import Engine, GenerationOptions
from r4b_edge.engine.options import options_from
from r4b_edge.errors import GenerationOptionError, R4BError
from r4b_edge.model.template import API_MODE, MODE_ALIASES, Message, render_prompt

from .scripted import ANSWER, REASONING, ScriptedBackend

Q = [Message("user", "what is two plus two?")]


def engine(tok, p=0.9):
    return Engine(ScriptedBackend(tok, p))


@pytest.mark.parametrize("opts,msg", [
    (dict(max_tokens="5"), "max_tokens must be an integer >= 1, got '5'"),
    (dict(max_tokens=2.5), "max_tokens must be an integer >= 1, got 2.5"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1, got True"),
    (dict(max_think_tokens="3"), "max_think_tokens must be an integer >= 0 or None, got '3'"),
    (dict(temperature=None), "temperature must be a finite number >= 0, got None"),
    (dict(temperature="0.5"), "temperature must be a finite number >= 0, got '0.5'"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(top_p=None), "top_p must be a number in (0, 1], got None"),
    (dict(top_k=1.5), "top_k must be an integer >= 0, got 1.5"),
    (dict(seed="7"), "seed must be a non-negative integer, got '7'"),
    (dict(think_threshold="0.5"), "think_threshold must be None or a number within [0, 1], got '0.5'"),
    (dict(mode=None), "unknown mode None"),
    (dict(mode=["auto"]), "unknown mode ['auto']"),
    (dict(budget_closing=None), "budget_closing must be a string, got NoneType None"),
    (dict(budget_closing="stop \ud800 here"), "budget_closing is not valid Unicode: a lone surrogate '\\ud800' at character 5"),
    (dict(measure_p_think="yes"), "measure_p_think must be True or False, got 'yes'"),
])
def test_bad_option_types_raise_r4b_errors(tiny_tokenizer, opts, msg):
    with pytest.raises(GenerationOptionError) as e:
        engine(tiny_tokenizer).stream(Q, [], GenerationOptions(**opts))  # raised at the call
    assert isinstance(e.value, R4BError) and not isinstance(e.value, TypeError)
    assert msg in str(e.value)


def test_unknown_option_names_the_known_ones():
    with pytest.raises(GenerationOptionError) as e:
        options_from({"max_token": 5})
    assert "unknown generation option(s): max_token" in str(e.value) and "max_tokens" in str(e.value)


@pytest.mark.parametrize("messages,system,msg", [
    ([Message("user", None)], None, "message 0 (user) content must be a string, got NoneType None"),
    ([Message("user", b"bytes")], None, "message 0 (user) content must be a string, got bytes"),
    ([Message("user", "caf\udce9")], None, "message 0 (user) content is not valid Unicode: a lone surrogate"),
    (Q, "sys \ud83d", "system is not valid Unicode: a lone surrogate '\\ud83d' at character 4"),
    (Q, 42, "system must be a string, got int 42"),
])
def test_bad_texts_raise_r4b_errors(tiny_tokenizer, messages, system, msg):
    with pytest.raises(GenerationOptionError) as e:
        engine(tiny_tokenizer).stream(messages, [], GenerationOptions(), system=system)
    assert msg in str(e.value)


def test_stream_prompt_checks_the_prompt(tiny_tokenizer):
    with pytest.raises(GenerationOptionError, match="prompt must be a string"):
        engine(tiny_tokenizer).stream_prompt(None, [])
    with pytest.raises(GenerationOptionError, match="prompt is not valid Unicode"):
        engine(tiny_tokenizer).stream_prompt("<|im_start|>user\n\udfff<|im_end|>\n", [])


def test_options_validated_once_per_call(tiny_tokenizer, monkeypatch):
    calls = []
    orig = GenerationOptions.validate

    def counting(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(GenerationOptions, "validate", counting)
    list(engine(tiny_tokenizer).stream(Q, [], GenerationOptions(mode="think")))
    assert len(calls) == 1


# ---- the mode as data, one precedence rule --------------------------------------------------
def test_stream_renders_no_mode_suffix_to_detect(tiny_tokenizer, monkeypatch):
    """stream() passes the mode on as data: its prompt text is the same in every mode."""
    import r4b_edge.engine.generate as g

    seen = []
    real = g.render_prompt

    def spy(messages, thinking_mode="auto", system=None):
        seen.append(thinking_mode)
        return real(messages, thinking_mode, system=system)

    monkeypatch.setattr(g, "render_prompt", spy)
    for mode in ("auto", "think", "no-think"):
        list(engine(tiny_tokenizer).stream(Q, [], GenerationOptions(mode=mode)))
    assert seen == ["auto", "auto", "auto"]


@pytest.mark.parametrize("mode,think", [("auto", True), ("think", True), ("no-think", False)])
def test_prompt_at_the_decision_point_takes_the_mode(tiny_tokenizer, mode, think):
    prompt = render_prompt(Q, "auto")
    r = engine(tiny_tokenizer).generate_prompt(prompt, [], GenerationOptions(mode=mode))
    assert r.thought == think and r.answer == ANSWER
    assert r.forced == (mode != "auto")


@pytest.mark.parametrize("rendered,mode", [("think", "no-think"), ("no-think", "think")])
def test_prompt_past_the_decision_point_must_agree_with_the_mode(tiny_tokenizer, rendered, mode):
    prompt = render_prompt(Q, rendered)
    with pytest.raises(GenerationOptionError, match=f"mode '{mode}' contradicts the prompt"):
        engine(tiny_tokenizer).stream_prompt(prompt, [], GenerationOptions(mode=mode))


@pytest.mark.parametrize("rendered,think", [("think", True), ("no-think", False)])
def test_prompt_past_the_decision_point_continues_as_written(tiny_tokenizer, rendered, think):
    prompt = render_prompt(Q, rendered)
    for mode in ("auto", rendered):
        r = engine(tiny_tokenizer, 0.9).generate_prompt(prompt, [], GenerationOptions(mode=mode))
        assert (r.thought, r.forced, r.p_think) == (think, True, None)
        assert r.answer == ANSWER and (r.reasoning == REASONING.strip()) == think
    with pytest.raises(GenerationOptionError, match="measure_p_think needs a prompt that ends in '<think>'"):
        engine(tiny_tokenizer).stream_prompt(prompt, [], GenerationOptions(measure_p_think=True))


@pytest.mark.parametrize("alias,name", sorted(MODE_ALIASES.items()))
def test_every_alias_becomes_the_api_name(tiny_tokenizer, alias, name):
    """validate() spells the mode by its API name: the engine and Result.mode speak one vocabulary."""
    assert GenerationOptions(mode=alias).validate().mode == API_MODE[name]
    assert engine(tiny_tokenizer).generate(Q, [], GenerationOptions(mode=alias)).mode == API_MODE[name]
    prompt = render_prompt(Q, "auto")
    assert engine(tiny_tokenizer).generate_prompt(prompt, [], GenerationOptions(mode=alias)).mode == API_MODE[name]


def test_a_contradicting_alias_is_named_by_its_api_name(tiny_tokenizer):
    with pytest.raises(GenerationOptionError, match="mode 'think' contradicts the prompt"):
        engine(tiny_tokenizer).stream_prompt(render_prompt(Q, "no-think"), [], GenerationOptions(mode="long"))
