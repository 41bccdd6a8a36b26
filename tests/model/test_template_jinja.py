"""The Jinja chat template (GGUF `tokenizer.chat_template`, HF tokenizer_config) renders exactly
what `render_prompt` renders, for every content shape stock tools hand it.

Shapes: HF `image` parts, OpenAI `image_url` parts, text parts, string content, the media-marker
text part that llama-cpp-python's MTMDChatHandler substitutes (its own conversion code is used
here), llama-mtmd-cli's marker-in-the-string, llama-server's `<__media_<random>__>` marker,
system/developer turns and multi-turn history whose assistant turns carry reasoning.
"""
from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r4b_edge.model.template import (
    CHAT_TEMPLATE, IMAGE_PLACEHOLDER, MODE_ALIASES, Message, chat_template_jinja, render_prompt,
)

MODES = ["auto", "long", "short"]
SERVER_MARKER = "<__media_Q7x2Lk9PzA0bWcR4tY8uNe3Hs6VfJd1M__>"  # llama-server: random per process


def _raise(msg: str) -> None:
    raise ValueError(msg)


def render(messages: list, mode: str | None = "auto", template: str = CHAT_TEMPLATE) -> str:
    """Render like the stock tools do: a sandboxed environment with trim/lstrip_blocks
    (llama-cpp-python, transformers) and the kwargs as template variables."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    kw = {} if mode is None else {"thinking_mode": mode}
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                 raise_exception=_raise, **kw)


def ours(msgs: list[Message], mode: str = "auto", marker: str = IMAGE_PLACEHOLDER,
         system: str | None = None) -> str:
    """r4b-edge's prompt, the image placeholder written as the tool's marker."""
    return render_prompt(msgs, mode, system=system).replace(IMAGE_PLACEHOLDER, marker)


IMG = {"type": "image"}
URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


# (OpenAI/HF-shaped request messages, the r4b-edge Message list the same request becomes)
CASES = {
    "hf_image_first": ([{"role": "user", "content": [IMG, text("What is the sum?")]}],
                       [Message("user", "What is the sum?", images=1)]),
    "image_url_first": ([{"role": "user", "content": [URL, text("What is the sum?")]}],
                        [Message("user", "What is the sum?", images=1)]),
    "image_url_after_text": ([{"role": "user", "content": [text("What is the sum?"), URL]}],
                             [Message("user", "What is the sum?", images=1)]),
    "two_images_split_text": ([{"role": "user", "content": [text("Compare "), URL, text("these."), URL]}],
                              [Message("user", "Compare these.", images=2)]),
    "string_content": ([{"role": "user", "content": "Name a colour."}], [Message("user", "Name a colour.")]),
    "text_parts_only": ([{"role": "user", "content": [text("Name "), text("a colour.")]}],
                        [Message("user", "Name a colour.")]),
    "system_multi_turn": (
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [URL, text("How many dots?")]},
         {"role": "assistant", "content": "<think>\none, two, three\n</think>\n\n3"},
         {"role": "user", "content": "And squares?"}],
        [Message("system", "Be brief."), Message("user", "How many dots?", images=1),
         Message("assistant", "3", reasoning="one, two, three"), Message("user", "And squares?")]),
    "developer_and_typed_assistant": (
        [{"role": "developer", "content": [text("Answer with a number.")]},
         {"role": "user", "content": [text("How many dots?"), URL]},
         {"role": "assistant", "content": [text("3")]},
         {"role": "user", "content": [text("And squares?")]},
         {"role": "assistant", "content": None},
         {"role": "user", "content": "Sure?"}],
        [Message("system", "Answer with a number."), Message("user", "How many dots?", images=1),
         Message("assistant", "3"), Message("user", "And squares?"), Message("assistant", ""),
         Message("user", "Sure?")]),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_request_shapes_render_like_r4b_edge(case: str, mode: str) -> None:
    request, msgs = CASES[case]
    assert render(request, mode) == ours(msgs, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "hf_image_first"))  # OpenAI shapes only
def test_mtmd_chat_handler_shapes(case: str, mode: str) -> None:
    """What llama-cpp-python's MTMDChatHandler hands the template: its own conversion code
    turns each image_url part into a text part holding mtmd_default_marker()."""
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
    from llama_cpp.llama_chat_format import MTMDChatHandler

    marker = mtmd.mtmd_default_marker().decode()
    assert marker == "<__media__>"
    request, msgs = CASES[case]
    converted = [MTMDChatHandler._convert_message_for_template(m, marker) for m in request]
    if any(p == URL for m in request if isinstance(m["content"], list) for p in m["content"]):
        assert converted != request  # the handler did substitute markers
    assert render(converted, mode) == ours(msgs, mode, marker=marker)


def _llama_server_shape(messages: list, marker: str) -> list:
    """llama-server's preparation (tools/server/server-common.cpp oaicompat_content_load_media +
    common/chat.cpp to_json_oaicompat): image_url parts become media markers and a message with
    media becomes one string: text parts joined by '\\n', no newline next to a marker."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list) and any(p["type"] == "image_url" for p in c):
            s, last_marker = "", False
            for p in c:
                if p["type"] == "image_url":
                    s, last_marker = s + marker, True
                else:
                    s += ("\n" if s and not last_marker else "") + p["text"]
                    last_marker = False
            m = {**m, "content": s}
        out.append(m)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["image_url_first", "image_url_after_text", "system_multi_turn"])
def test_llama_server_shapes(case: str, mode: str) -> None:
    request, msgs = CASES[case]
    shaped = _llama_server_shape(request, SERVER_MARKER)
    assert any(isinstance(m["content"], str) and SERVER_MARKER in m["content"] for m in shaped)
    assert render(shaped, mode) == ours(msgs, mode, marker=SERVER_MARKER)


@pytest.mark.parametrize("prompt", ["<__media__>What is the sum?", "What is the sum?<__media__>"])
def test_llama_mtmd_cli_string(prompt: str) -> None:
    """llama-mtmd-cli puts the marker into the user string (before the prompt, or where typed)."""
    got = render([{"role": "user", "content": prompt}], "auto")
    assert got == ours([Message("user", "What is the sum?", images=1)], "auto", marker="<__media__>")


def test_marker_lookalike_text_stays_text() -> None:
    msgs = [{"role": "user", "content": "What does <__media mean?"}]
    assert render(msgs) == ours([Message("user", "What does <__media mean?")])


@pytest.mark.parametrize("alias,name", sorted(MODE_ALIASES.items()))
def test_mode_names_and_default(alias: str, name: str) -> None:
    msgs = [{"role": "user", "content": [IMG, text("q")]}]
    assert render(msgs, alias) == ours([Message("user", "q", images=1)], name)
    assert render(msgs, None) == ours([Message("user", "q", images=1)], "auto")


@pytest.mark.parametrize("mode", MODES)
def test_default_mode_for_tools_without_kwargs(mode: str) -> None:
    """llama-mtmd-cli passes no template kwargs: a template built with another default."""
    msgs = [{"role": "user", "content": "<__media__>q"}]
    want = ours([Message("user", "q", images=1)], mode, marker="<__media__>")
    assert render(msgs, None, template=chat_template_jinja(mode)) == want
    assert render(msgs, "long", template=chat_template_jinja(mode)) == ours(
        [Message("user", "q", images=1)], "long", marker="<__media__>")


def test_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="unknown thinking_mode"):
        render([{"role": "user", "content": "q"}], "medium")


def test_no_generation_prompt_and_plain_environment() -> None:
    """Whitespace control does not depend on trim_blocks/lstrip_blocks (llama.cpp's engine has neither)."""
    msgs = [{"role": "user", "content": [URL, text("q")]}, {"role": "assistant", "content": "a"}]
    plain = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=False)
    full = ours([Message("user", "q", images=1), Message("assistant", "a"), Message("user", "x")])
    assert plain == full[: full.index("<|im_start|>user\nx")]
    assert chat_template_jinja() == CHAT_TEMPLATE


def test_template_is_built_from_the_constants() -> None:
    """No rendering string is retyped: changing a constant changes the template."""
    import r4b_edge.model.template as t

    saved = t.MODE_SUFFIX["long"]
    try:
        t.MODE_SUFFIX["long"] = "<think>\nLONG"
        assert "LONG" in t.chat_template_jinja()
    finally:
        t.MODE_SUFFIX["long"] = saved
