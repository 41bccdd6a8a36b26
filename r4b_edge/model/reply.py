"""R-4B's reply rules: the token strings, what a reply is, where its answer ends, what history keeps.

A prompt ends at `<think>`, the decision point (`template.render_prompt`). The **reply** is every
token after it, forced or sampled: the mode's forced opening (`forced_opening`), the reasoning,
`</think>`, the separator, the answer and the end token (`END_TOKENS`) when the model stopped.
The engine (`Result.token_ids`), training's rollouts and eval count and parse replies with these
rules; the chat renderer (`template.py`) writes the same strings. No torch, no tokenizer here.

The Hugging Face remote code (`model/hf_remote/`) must stay importable on its own under
transformers' `trust_remote_code`, so it imports nothing from here: it holds none of these rules,
only its processor's `<image>` default (the folders' processor_config.json passes
`IMAGE_PLACEHOLDER`). The Jinja chat template's copy of `history_answer` is built from these
strings (`template.chat_template_jinja`; a test holds the two equal).
"""
from __future__ import annotations

# ---- the token strings: the tokenizer's added tokens (`model/tokenizer.py` requires all but ENDOFTEXT) --
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PLACEHOLDER = "<image>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

#: Either ends a reply (the tokenizer's `eos_ids` holds both where the vocabulary has them).
END_TOKENS = (IM_END, ENDOFTEXT)
#: An answer never holds these: one in the answer phase, as the token or spelled out, ends the reply.
THINK_TAGS = (THINK_OPEN, THINK_CLOSE)
#: What follows `</think>` before the answer.
ANSWER_SEPARATOR = "\n\n"
#: The empty think block as the model writes it after `<think>` (a direct reply's opening).
EMPTY_THINK_CONTINUATION = f"\n\n{THINK_CLOSE}{ANSWER_SEPARATOR}"
#: What each thinking mode (the template's names: auto | long | short) writes after the prompt's
#: `<think>`: nothing (the model decides), the decision `\n` (think), the empty block (no-think).
FORCED_OPENING = {"auto": "", "long": "\n", "short": EMPTY_THINK_CONTINUATION}


def forced_opening(mode: str) -> str:
    """The reply text `mode` (a template name: `template.template_mode` maps any alias) forces
    after the prompt's `<think>`; these tokens count in the reply."""
    return FORCED_OPENING[mode]


def split_reply(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a reply's text (everything after the prompt's `<think>`, the forced
    opening included, without the end token), each stripped: the reasoning is the think block up
    to the first `</think>`, the answer all after it, as written (it may hold a think tag:
    `answer_text` cuts it there); the answer is None when the think block never closed."""
    if THINK_CLOSE not in text:
        return text.strip(), None
    reasoning, answer = text.split(THINK_CLOSE, 1)
    return reasoning.strip(), answer.strip()


def answer_text(answer: str) -> str:
    """The answer the runtime returns: `answer` (the text after `</think>`) up to its first think
    tag, where the engine ends the reply, stripped."""
    cut = min((answer.find(t) for t in THINK_TAGS if t in answer), default=len(answer))
    return answer[:cut].strip()


def has_think_tag(text: str | None) -> bool:
    """Whether `text` holds `<think>` or `</think>`."""
    return text is not None and any(t in text for t in THINK_TAGS)


def history_answer(text: str) -> str:
    """What an earlier assistant turn keeps in a conversation's history: the text after its last
    `</think>` (a reasoning block a client sent back is dropped), left-stripped; text without one
    is kept as it is. The chat template renders it behind an empty think block."""
    return text.split(THINK_CLOSE)[-1].lstrip() if THINK_CLOSE in text else text
