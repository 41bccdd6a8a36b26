"""Golden renderings of the chat template (Python renderer and the Jinja copy)."""
from __future__ import annotations

import jinja2
import pytest

from r4b_edge.errors import GenerationOptionError
from r4b_edge.model.template import (
    CHAT_TEMPLATE, Message, phase_after, render_conversation, render_prompt, template_mode,
)

HEAD = "<|im_start|>user\n<image>\nWhat is the sum?<|im_end|>\n<|im_start|>assistant\n"
GOLDEN = {
    "auto": HEAD + "<think>",
    "long": HEAD + "<think>\n",
    "short": HEAD + "<think>\n\n</think>\n\n",
}
MULTI = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<image>\nHow many dots?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n3<|im_end|>\n"
    "<|im_start|>user\nAnd squares?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)


@pytest.mark.parametrize("mode", ["auto", "long", "short"])
def test_golden_modes(mode):
    assert render_prompt([Message("user", "What is the sum?", images=1)], mode) == GOLDEN[mode]


@pytest.mark.parametrize("api,tmpl", [("auto", "auto"), ("think", "long"), ("no-think", "short")])
def test_api_names_map(api, tmpl):
    assert template_mode(api) == tmpl
    assert render_prompt([Message("user", "What is the sum?", images=1)], api) == GOLDEN[tmpl]


def test_golden_multi_turn_drops_reasoning():
    msgs = [Message("user", "How many dots?", images=1),
            Message("assistant", "3", reasoning="one, two, three"),
            Message("user", "And squares?")]
    out = render_prompt(msgs, "think", system="Be brief.")
    assert out == MULTI
    assert "one, two, three" not in out


@pytest.mark.parametrize("mode", ["auto", "long", "short"])
def test_jinja_copy_renders_the_same(mode):
    t = jinja2.Environment().from_string(CHAT_TEMPLATE)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many dots?"}]},
            {"role": "assistant", "content": "<think>\none, two, three\n</think>\n\n3"},
            {"role": "user", "content": "And squares?"}]
    ours = render_prompt([Message("user", "How many dots?", images=1),
                          Message("assistant", "3", reasoning="one, two, three"),
                          Message("user", "And squares?")], mode, system="Be brief.")
    assert t.render(messages=msgs, add_generation_prompt=True, thinking_mode=mode) == ours


def test_training_conversation_pieces():
    """The renderer's trained pieces are what a training example teaches after the header."""
    q = [Message("user", "What is the sum?", images=1)]

    def trained(mode, reasoning="", mask=False):
        pieces = render_conversation(q + [Message("assistant", "7", reasoning=reasoning)], mode, mask_empty_think=mask)
        assert "".join(t for t, _ in pieces).startswith(HEAD)
        return [t for t, on in pieces if on]

    assert trained("think", "3 + 4 = 7") == ["\n3 + 4 = 7\n</think>\n\n7<|im_end|>"]
    assert trained("forced-think", "3 + 4 = 7") == ["3 + 4 = 7\n</think>\n\n7<|im_end|>"]
    assert trained("direct") == ["\n\n</think>\n\n", "7<|im_end|>"]
    assert trained("direct", mask=True) == ["7<|im_end|>"]
    # a prompt is never trained; its text is render_prompt's; mode None stops after the header
    assert not any(on for _, on in render_conversation(q, "think"))
    assert "".join(t for t, _ in render_conversation(q, None)) == HEAD
    with pytest.raises(GenerationOptionError, match="needs the last assistant turn's reasoning"):
        trained("think")
    with pytest.raises(GenerationOptionError, match="got 'auto'"):
        trained("auto")


def test_history_answers_are_trained_direct_turns():
    msgs = [Message("user", "How many dots?", images=1), Message("assistant", "3", reasoning="one, two, three"),
            Message("user", "And squares?"), Message("assistant", "2", reasoning="a, b")]
    pieces = render_conversation(msgs, "think")
    assert "".join(t for t, _ in pieces) == (
        "<|im_start|>user\n<image>\nHow many dots?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n3<|im_end|>\n"
        "<|im_start|>user\nAnd squares?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\na, b\n</think>\n\n2<|im_end|>")
    assert [t for t, on in pieces if on] == ["\n\n</think>\n\n", "3<|im_end|>", "\na, b\n</think>\n\n2<|im_end|>"]


@pytest.mark.parametrize("prompt,phase", [
    (GOLDEN["auto"], "reasoning"), (GOLDEN["long"], "reasoning"), (GOLDEN["short"], "answer"),
    (HEAD, "answer"), (HEAD + "<think>\nhmm\n</think>\n\n", "answer"),
])
def test_phase_after(prompt, phase):
    assert phase_after(prompt) == phase


def test_errors():
    with pytest.raises(GenerationOptionError, match="unknown mode 'x'"):
        template_mode("x")
    with pytest.raises(GenerationOptionError, match="end with a user turn"):
        render_prompt([Message("assistant", "hi")], "auto")
    with pytest.raises(GenerationOptionError, match="unknown role"):
        render_prompt([Message("robot", "hi"), Message("user", "q")], "auto")
