"""Scoring a given continuation (`Model.score`; `score_ids` for token ids): the log-probability the model
gives each of its tokens after a rendered prompt, on any backend.

The prompt is prefilled once; each continuation is then evaluated from the
same cache position (the cache is rolled back between continuations), so the
choices of a multiple-choice question cost one prefill in all. A continuation
is tokenized on its own (`tokenizer.encode(text)`: no BOS, special tokens
such as `<|im_end|>` written in the text become their ids) and its tokens
follow the prompt's tokens directly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import ContextLengthError, GenerationOptionError
from ..model.processing import PreparedImage
from .logprobs import Score, check_top_logprobs, score_rows

if TYPE_CHECKING:  # pragma: no cover
    from .generate import Engine


def score_prompt(engine: "Engine", prompt: str, images: Sequence[PreparedImage],
                 continuations: Sequence[str], top_logprobs: int = 0) -> list[Score]:
    """One `Score` per continuation, each read right after `prompt`."""
    check_top_logprobs(bool(top_logprobs), top_logprobs)
    if not continuations:
        raise GenerationOptionError("score needs at least one continuation")
    ids_list: list[list[int]] = []
    for i, c in enumerate(continuations):
        if not isinstance(c, str):
            raise GenerationOptionError(f"continuation {i} must be a string, got {type(c).__name__}")
        ids_list.append(engine.tok.encode(c))
    return score_ids(engine, prompt, images, ids_list, top_logprobs, texts=list(continuations))


def score_ids(engine: "Engine", prompt: str, images: Sequence[PreparedImage], ids_list: Sequence[Sequence[int]],
              top_logprobs: int = 0, texts: Sequence[str] | None = None) -> list[Score]:
    """`score_prompt` for continuations given as token ids (e.g. a reply's own
    `token_ids`, which need not re-tokenize to themselves)."""
    check_top_logprobs(bool(top_logprobs), top_logprobs)
    tok, be = engine.tok, engine.backend
    if not ids_list:
        raise GenerationOptionError("score needs at least one continuation")
    for i, ids in enumerate(ids_list):
        if not len(ids):
            raise GenerationOptionError(f"continuation {i} is empty: there is nothing to score")
        bad = [t for t in ids if not 0 <= int(t) < be.config.vocab_size] if hasattr(be.config, "vocab_size") else []
        if bad:
            raise GenerationOptionError(f"continuation {i} has token ids outside the vocabulary: {bad[:5]}")
    if texts is None:
        texts = [tok.decode(ids) for ids in ids_list]
    segs = engine._segments(prompt, images)
    n_prompt = sum(be.image_token_count(s) if isinstance(s, PreparedImage) else len(s) for s in segs)
    longest = max(len(ids) for ids in ids_list)
    if n_prompt + longest > be.n_ctx:
        raise ContextLengthError(
            f"the prompt ({n_prompt} tokens) plus the longest continuation ({longest} tokens) do not fit "
            f"the model's context of {be.n_ctx} tokens: shorten them or use a smaller image")
    last = be.prefill(segs)
    n0 = be.n_past
    out = []
    for c, ids in zip(texts, ids_list):
        ids = [int(t) for t in ids]
        be.truncate(n0)
        rows = last[None] if len(ids) == 1 else np.vstack([last[None], be.forward(ids[:-1])])
        out.append(score_rows(rows, ids, tok, c, n0, top_logprobs))
    return out
