"""Golden renderings of the chat template (Python renderer and the Jinja copy)."""
from __future__ import annotations

import jinja2
import pytest

from r4b_edge.errors import GenerationOptionError
from r4b_edge.model.template import (
    CHAT_TEMPLATE, Message, phase_after, render_prompt, render_target, template_mode,
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


def test_targets():
    assert render_target("7", "3 + 4 = 7") == "<think>\n3 + 4 = 7\n</think>\n\n7<|im_end|>"
    assert render_target("red", None) == "<think>\n\n</think>\n\nred<|im_end|>"


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
