"""R-4B's reply rules have one owner, `r4b_edge.model.reply`: the token strings, the forced
openings, the reasoning/answer split, where an answer ends and what history keeps."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import r4b_edge
from r4b_edge.api import BUNDLED_MODEL
from r4b_edge.model import reply
from r4b_edge.model.reply import (
    EMPTY_THINK_CONTINUATION, END_TOKENS, THINK_OPEN, answer_text, forced_opening, has_think_tag,
    history_answer, split_reply,
)
from r4b_edge.model.template import CHAT_TEMPLATE, MODE_SUFFIX, Message, render_conversation, render_prompt

REPO = Path(r4b_edge.__file__).resolve().parent.parent
TOKEN_STRINGS = (reply.ENDOFTEXT, reply.IM_START, reply.IM_END, reply.IMAGE_PLACEHOLDER, reply.THINK_OPEN,
                 reply.THINK_CLOSE)


def test_token_strings() -> None:
    assert TOKEN_STRINGS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<think>", "</think>")
    assert END_TOKENS == ("<|im_end|>", "<|endoftext|>") and reply.THINK_TAGS == ("<think>", "</think>")


def test_forced_openings_are_what_the_prompt_renders_after_think() -> None:
    assert [forced_opening(m) for m in ("auto", "long", "short")] == ["", "\n", "\n\n</think>\n\n"]
    assert forced_opening("short") == EMPTY_THINK_CONTINUATION
    assert MODE_SUFFIX == {m: THINK_OPEN + forced_opening(m) for m in ("auto", "long", "short")}
    for mode in MODE_SUFFIX:
        prompt = render_prompt([Message("user", "q")], mode)
        assert prompt.endswith(THINK_OPEN + forced_opening(mode))
    # a direct training target is the no-think opening, the answer and the end token
    pieces = render_conversation([Message("user", "q"), Message("assistant", "7")], "direct")
    assert "".join(t for t, _ in pieces).endswith(THINK_OPEN + forced_opening("short") + "7<|im_end|>")


@pytest.mark.parametrize("text, want", [
    ("", ("", None)),
    ("\nstill thinking", ("still thinking", None)),
    ("\nsteps\n</think>\n\n7", ("steps", "7")),
    ("\n\n</think>\n\n7", ("", "7")),
    ("\n\n</think>\n\nred <think>x", ("", "red <think>x")),  # the answer as written
    ("a</think>b</think>c", ("a", "b</think>c")),  # split at the first close
])
def test_split_reply(text: str, want: tuple) -> None:
    assert split_reply(text) == want


def test_answer_ends_at_a_think_tag() -> None:
    assert answer_text("  7 ") == "7" and answer_text("") == ""
    assert answer_text("7</think>\n\n8") == "7" and answer_text("red <think>x</think>") == "red"
    assert answer_text("x </think> y <think>") == "x"
    assert has_think_tag("7</think>") and has_think_tag("<think>") and not has_think_tag("7")
    assert not has_think_tag(None)


@pytest.mark.parametrize("text, want", [
    ("7", "7"),
    ("  7", "  7"),  # no `</think>`: kept as it is
    ("\nsteps\n</think>\n\n7", "7"),
    ("r</think>\n a </think> b", "b"),  # after the last close
    ("r</think>", ""),
])
def test_history_answer(text: str, want: str) -> None:
    assert history_answer(text) == want


@pytest.mark.parametrize("text", ["7", "  7", "\nsteps\n</think>\n\n7", "r</think>\n a </think> b", "r</think>",
                                  "<think>\n\n</think>\n\nred"])
def test_the_chat_template_keeps_history_answer(text: str) -> None:
    """The Jinja template's history rule is `history_answer`, as the server's request parsing uses it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": text},
            {"role": "user", "content": "q2"}]
    got = env.from_string(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    want = render_prompt([Message("user", "q"), Message("assistant", history_answer(text)), Message("user", "q2")])
    assert got == want


@pytest.mark.skipif(not (BUNDLED_MODEL / "tokenizer.json").exists(), reason="no bundled model")
def test_end_tokens_are_the_tokenizers_eos() -> None:
    from r4b_edge.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    assert tok.eos_ids == {tok.token_to_id(t) for t in END_TOKENS}


def _format_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants of `tree` (f-string pieces included) that spell a token string as format,
    not prose: docstrings and other bare string statements are left out, and so is text that
    reads as words once the token strings are taken out (messages, the model card's prose)."""
    bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in bare:
            rest = n.value
            for t in TOKEN_STRINGS:
                rest = rest.replace(t, "")
            if rest != n.value and not re.search(r"[A-Za-z]{2,} [A-Za-z]{2,}", rest):
                out.append((n.lineno, n.value))
    return out


def test_token_strings_are_spelled_only_in_reply_py() -> None:
    """Every other module imports them (the Hugging Face remote code, which must stay
    self-contained for `trust_remote_code`, keeps its own `<image>` default)."""
    skip = {REPO / "r4b_edge" / "model" / "reply.py"}
    skip_dirs = (REPO / "r4b_edge" / "model" / "hf_remote", REPO / "r4b_edge" / "assets")
    roots = [REPO / d for d in ("r4b_edge", "train", "export", "apps", "benchmarks") if (REPO / d).is_dir()]
    bad = []
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            if f in skip or any(d in f.parents for d in skip_dirs):
                continue
            for line, s in _format_strings(ast.parse(f.read_text(encoding="utf-8"))):
                bad.append(f"{f.relative_to(REPO)}:{line}: {s!r}")
    assert not bad, bad
