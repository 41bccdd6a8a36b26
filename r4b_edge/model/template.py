"""ChatML rendering with R-4B's `thinking_mode` (auto | long | short).

The Python renderer is the source of truth (golden tests pin it); the Jinja
template below renders the same strings and is shipped in tokenizer_config.json
and the GGUF so other runtimes agree. The token strings and what follows `<think>`
in each mode come from `reply.py` (R-4B's reply rules).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from ..errors import GenerationOptionError
from .reply import (
    ANSWER_SEPARATOR, EMPTY_THINK_CONTINUATION, FORCED_OPENING, IM_END, IM_START, IMAGE_PLACEHOLDER, THINK_CLOSE,
    THINK_OPEN,
)

# What follows the assistant header in each thinking mode (R4B.md): `<think>`, then the mode's
# forced opening (`reply.FORCED_OPENING`).
MODE_SUFFIX = {mode: THINK_OPEN + opening for mode, opening in FORCED_OPENING.items()}
# Earlier assistant turns: the answer only (`reply.history_answer`), behind an empty think block.
HISTORY_THINK = MODE_SUFFIX["short"]

# ---- the one table of modes ------------------------------------------------------------------
# Template names (vLLM's R-4B `thinking_mode`) are the keys of MODE_SUFFIX; the API's names:
API_MODE = {"auto": "auto", "long": "think", "short": "no-think"}
API_MODES = tuple(API_MODE.values())  # what users pass: auto | think | no-think
# Every accepted name -> template name.
MODE_ALIASES = {
    **{m: m for m in MODE_SUFFIX}, **{api: t for t, api in API_MODE.items()},
    "nothink": "short", "no_think": "short",
}
# OpenAI `reasoning_effort` -> API mode: `none`/`minimal` never think, `high` always thinks,
# `low`/`medium`/`auto` let the model decide (as when it is unset).
EFFORT_MODES = {"none": "no-think", "minimal": "no-think", "low": "auto", "medium": "auto",
                "auto": "auto", "high": "think"}
# `chat_template_kwargs.thinking_mode` (the template's names, plus the API's) -> API mode.
THINKING_MODES = {**API_MODE, **{api: api for api in API_MODES}}


def template_mode(mode: str) -> str:
    """Map an API mode (`auto`, `think`, `no-think`) to the template's name."""
    try:
        return MODE_ALIASES[mode]
    except (KeyError, TypeError):
        raise GenerationOptionError(
            f"unknown mode {mode!r}: use one of 'auto', 'think', 'no-think'"
        ) from None


def api_mode(mode: str) -> str:
    """Any accepted mode name -> the API's name (`auto`, `think`, `no-think`): the canonical
    name, which `GenerationOptions.validate` sets, the engine speaks and `Result.mode` reports."""
    return API_MODE[template_mode(mode)]


@dataclass
class Message:
    """One chat turn. `images` counts the images of a user turn (rendered as
    `<image>` lines before the text). `reasoning` of an assistant turn is the trace
    a training conversation's last turn teaches in `think` mode; earlier turns'
    reasoning is dropped (history keeps the answer only)."""

    role: str
    content: str
    images: int = 0
    reasoning: str = ""


#: How the last assistant turn of a training conversation is rendered (the `mode` field of a
#: training record, docs/data-format.md): `think` is the long mode with the turn's reasoning
#: as the trace; `forced-think` the same with the decision `\n` after `<think>` untrained;
#: `direct` is the short mode (empty think block, then the answer).
TARGET_MODES = ("think", "forced-think", "direct")


def _target_pieces(m: Message, mode: str, mask_empty_think: bool) -> list[tuple[str, bool]]:
    """(text, trained) of one assistant turn after its header; `<think>` is never trained."""
    answer = f"{m.content}{IM_END}"
    if mode == "direct":
        return [(THINK_OPEN, False), (EMPTY_THINK_CONTINUATION, not mask_empty_think), (answer, True)]
    if mode not in ("think", "forced-think"):
        raise GenerationOptionError(f"a conversation ending with an assistant turn is rendered in one of "
                                    f"{', '.join(TARGET_MODES)}, got {mode!r}")
    if not m.reasoning:
        raise GenerationOptionError(f"mode {mode!r} needs the last assistant turn's reasoning (the trace)")
    opening, trace = FORCED_OPENING["long"], f"{m.reasoning}\n{THINK_CLOSE}{ANSWER_SEPARATOR}{answer}"
    if mode == "forced-think":
        return [(THINK_OPEN, False), (opening, False), (trace, True)]
    return [(THINK_OPEN, False), (opening + trace, True)]


def render_conversation(messages: Sequence[Message], mode: str | None = "auto", system: str | None = None,
                        mask_empty_think: bool = False) -> list[tuple[str, bool]]:
    """The one chat renderer: (text, trained) pieces whose concatenation is the exact text the
    tokenizer sees (nanochat's `render_conversation`). The engine (`render_prompt`), training
    (`train.data.record_pieces`), rollouts and eval use it; the Jinja template renders the same text.

    - system and user turns and the `<|im_start|>...` headers are never trained; a user turn puts
      one `<image>` line per image before its text;
    - earlier assistant turns are direct answers (the empty think block, then the answer; their
      reasoning is dropped), trained after `<think>` (`mask_empty_think`: not the empty block);
    - ending with a user turn it is a prompt: the assistant header, then `mode`'s think suffix
      (any `MODE_ALIASES` name; None: the header only), nothing trained;
    - ending with an assistant turn it is a training example whose last turn is rendered in
      `mode`, one of `TARGET_MODES`.
    """
    if not messages or messages[-1].role not in ("user", "assistant"):
        raise GenerationOptionError("the conversation must end with a user turn")
    prompt = messages[-1].role == "user"
    suffix = MODE_SUFFIX[template_mode(mode)] if prompt and mode is not None else ""
    pieces: list[tuple[str, bool]] = []
    if system:
        pieces.append((f"{IM_START}system\n{system}{IM_END}\n", False))
    for k, m in enumerate(messages):
        if m.role == "user":
            body = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(m.images)) + m.content
            nxt = messages[k + 1].role if k + 1 < len(messages) else None
            head = f"{IM_START}assistant\n" if nxt in (None, "assistant") else ""
            pieces.append((f"{IM_START}user\n{body}{IM_END}\n{head}", False))
        elif m.role == "assistant":
            if k == 0 or messages[k - 1].role != "user":
                pieces.append((f"{IM_START}assistant\n", False))
            last = k == len(messages) - 1
            pieces += _target_pieces(m, mode if last else "direct", mask_empty_think)
            if not last:
                pieces.append(("\n", False))
        elif m.role == "system":
            pieces.append((f"{IM_START}system\n{m.content}{IM_END}\n", False))
        else:
            raise GenerationOptionError(f"unknown role {m.role!r}: use 'system', 'user' or 'assistant'")
    if suffix:
        pieces.append((suffix, False))
    return pieces


def render_prompt(messages: Sequence[Message], thinking_mode: str = "auto",
                  system: str | None = None) -> str:
    """Render a conversation up to and including the assistant header plus the
    mode's think suffix (the text of `render_conversation`)."""
    if not messages or messages[-1].role != "user":
        raise GenerationOptionError("the conversation must end with a user turn")
    return "".join(t for t, _ in render_conversation(messages, thinking_mode, system))


def phase_after(prompt: str) -> str:
    """'reasoning' if the prompt ends inside an open think block, else 'answer'.

    Decided from the text, so prompts that open or close `<think>` themselves
    are split correctly."""
    tail = prompt.rsplit(f"{IM_START}assistant", 1)[-1]
    opened, closed = tail.rfind(THINK_OPEN), tail.rfind(THINK_CLOSE)
    return "reasoning" if opened > closed else "answer"




# ---- the Jinja copy (GGUF `tokenizer.chat_template`, HF tokenizer/processor) ----------------
# llama.cpp's media markers: `<__media__>` (mtmd_default_marker(): llama-cpp-python's
# MTMDChatHandler, llama-mtmd-cli) and `<__media_<random>__>` (llama-server). Stock tools put
# them into the user text where the image goes; the template moves each one to the front,
# followed by a newline, exactly where r4b-edge renders `<image>\n`.
MEDIA_MARKER_HEAD = "<__media"
MEDIA_MARKER_TAIL = "__>"


def _lit(s: str) -> str:
    """A Jinja string literal (json.dumps escapes are valid Jinja escapes)."""
    return json.dumps(s, ensure_ascii=True)


def chat_template_jinja(default_mode: str = "auto") -> str:
    """The chat template as Jinja, built from this module's constants.

    Renders what `render_prompt` renders for the message shapes callers send: string
    content; `text`, `image`, `image_url` and llama.cpp `media_marker` parts; text holding
    media markers; system/developer, user and assistant turns (an earlier assistant turn keeps
    only the text after its last `</think>`, behind an empty think block: the Jinja copy of
    `reply.history_answer`). `thinking_mode`
    (auto | long | short, or the API names in MODE_ALIASES) picks the generation suffix; an
    unknown mode raises. `default_mode` applies when the caller passes no `thinking_mode`
    (for tools that cannot pass template kwargs, e.g. llama-mtmd-cli)."""
    default = template_mode(default_mode)
    head, tail, nl = _lit(MEDIA_MARKER_HEAD), _lit(MEDIA_MARKER_TAIL), _lit("\n")
    by_name: dict[str, list[str]] = {}
    for alias, name in MODE_ALIASES.items():
        by_name.setdefault(name, []).append(alias)
    gen = "".join(
        ("{%- if" if i == 0 else "{%- elif") + f" mode in [{', '.join(map(_lit, aliases))}] -%}}"
        f"{{{{ {_lit(MODE_SUFFIX[name])} }}}}"
        for i, (name, aliases) in enumerate(by_name.items())
    )
    unknown = _lit(f"unknown thinking_mode: use one of {', '.join(MODE_ALIASES)}")
    return (
        f"{{%- set mode = {_lit(default)} -%}}"
        "{%- if thinking_mode is defined and thinking_mode is not none -%}"
        "{%- set mode = thinking_mode -%}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- set role = message['role'] -%}"
        "{%- set content = message['content'] if message['content'] is defined "
        "and message['content'] is not none else '' -%}"
        "{%- set parts = [{'type': 'text', 'text': content}] if content is string else content -%}"
        "{%- set ns = namespace(media='', text='') -%}"
        "{%- for part in parts -%}"
        "{%- if part['type'] in ['image', 'image_url'] -%}"
        f"{{%- set ns.media = ns.media + {_lit(IMAGE_PLACEHOLDER + chr(10))} -%}}"
        "{%- elif part['type'] == 'media_marker' -%}"
        f"{{%- set ns.media = ns.media + part['text'] + {nl} -%}}"
        "{%- elif part['type'] == 'text' -%}"
        f"{{%- set segs = part['text'].split({head}) -%}}"
        "{%- set ns.text = ns.text + segs[0] -%}"
        "{%- for s in segs[1:] -%}"
        f"{{%- if {tail} in s -%}}"
        f"{{%- set ns.media = ns.media + {head} + s.split({tail})[0] + {tail} + {nl} -%}}"
        f"{{%- set ns.text = ns.text + (s.split({tail})[1:] | join({tail})) -%}}"
        f"{{%- else -%}}{{%- set ns.text = ns.text + {head} + s -%}}{{%- endif -%}}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if role == 'user' -%}"
        f"{{{{ {_lit(IM_START + 'user' + chr(10))} + ns.media + ns.text + {_lit(IM_END + chr(10))} }}}}"
        "{%- elif role == 'assistant' -%}"
        "{%- set answer = ns.text -%}"
        f"{{%- if {_lit(THINK_CLOSE)} in answer -%}}"
        f"{{%- set answer = (answer.split({_lit(THINK_CLOSE)}) | last).lstrip() -%}}{{%- endif -%}}"
        f"{{{{ {_lit(IM_START + 'assistant' + chr(10) + HISTORY_THINK)} + answer + {_lit(IM_END + chr(10))} }}}}"
        "{%- elif role in ['system', 'developer'] -%}"
        f"{{{{ {_lit(IM_START + 'system' + chr(10))} + ns.text + {_lit(IM_END + chr(10))} }}}}"
        "{%- else -%}"
        f"{{{{ {_lit(IM_START)} + role + {nl} + ns.text + {_lit(IM_END + chr(10))} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        f"{{{{ {_lit(IM_START + 'assistant' + chr(10))} }}}}"
        f"{gen}{{%- else -%}}{{{{ raise_exception({unknown}) }}}}{{%- endif -%}}"
        "{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template_jinja()
