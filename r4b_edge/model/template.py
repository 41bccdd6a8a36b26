"""ChatML rendering with R-4B's `thinking_mode` (auto | long | short).

The Python renderer is the source of truth (golden tests pin it); the Jinja
template below renders the same strings and is shipped in tokenizer_config.json
and the GGUF so other runtimes agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import GenerationOptionError

IMAGE_PLACEHOLDER = "<image>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# What follows the assistant header in each thinking mode (R4B.md).
MODE_SUFFIX = {
    "auto": "<think>",
    "long": "<think>\n",
    "short": "<think>\n\n</think>\n\n",
}
# The empty think block as the model writes it after an auto-mode `<think>`.
EMPTY_THINK_CONTINUATION = "\n\n</think>\n\n"

# API names -> template names.
MODE_ALIASES = {
    "auto": "auto", "think": "long", "no-think": "short",
    "long": "long", "short": "short", "nothink": "short", "no_think": "short",
}


def template_mode(mode: str) -> str:
    """Map an API mode (`auto`, `think`, `no-think`) to the template's name."""
    try:
        return MODE_ALIASES[mode]
    except (KeyError, TypeError):
        raise GenerationOptionError(
            f"unknown mode {mode!r}: use one of 'auto', 'think', 'no-think'"
        ) from None


@dataclass
class Message:
    """One chat turn. `images` counts the images of a user turn (rendered as
    `<image>` lines before the text); `reasoning` is kept for the record only:
    earlier turns' reasoning is dropped from the prompt."""

    role: str
    content: str
    images: int = 0
    reasoning: str = ""


def render_prompt(messages: Sequence[Message], thinking_mode: str = "auto",
                  system: str | None = None) -> str:
    """Render a conversation up to and including the assistant header plus the
    mode's think suffix."""
    mode = template_mode(thinking_mode)
    if not messages or messages[-1].role != "user":
        raise GenerationOptionError("the conversation must end with a user turn")
    parts: list[str] = []
    if system:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        if m.role == "user":
            body = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(m.images)) + m.content
            parts.append(f"<|im_start|>user\n{body}<|im_end|>\n")
        elif m.role == "assistant":
            # History keeps the answer only, behind an empty think block.
            parts.append(f"<|im_start|>assistant\n<think>\n\n</think>\n\n{m.content}<|im_end|>\n")
        elif m.role == "system":
            parts.append(f"<|im_start|>system\n{m.content}<|im_end|>\n")
        else:
            raise GenerationOptionError(f"unknown role {m.role!r}: use 'system', 'user' or 'assistant'")
    parts.append("<|im_start|>assistant\n" + MODE_SUFFIX[mode])
    return "".join(parts)


def render_target(answer: str, reasoning: str | None) -> str:
    """The assistant text a training sample teaches (after the header)."""
    if reasoning:
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}<|im_end|>"
    return f"<think>\n\n</think>\n\n{answer}<|im_end|>"


def phase_after(prompt: str) -> str:
    """'reasoning' if the prompt ends inside an open think block, else 'answer'.

    Decided from the text, so prompts that open or close `<think>` themselves
    are split correctly."""
    tail = prompt.rsplit("<|im_start|>assistant", 1)[-1]
    opened, closed = tail.rfind(THINK_OPEN), tail.rfind(THINK_CLOSE)
    return "reasoning" if opened > closed else "answer"


CHAT_TEMPLATE = (
    "{%- set mode = thinking_mode | default('auto') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|im_start|>user\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'].split('</think>')[-1].lstrip() }}"
    "{%- else -%}{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if mode == 'long' -%}{{ '<think>\\n' }}"
    "{%- elif mode == 'short' -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}{{ '<think>' }}{%- endif -%}"
    "{%- endif -%}"
)
