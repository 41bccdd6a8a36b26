"""Log-probabilities of tokens: the sampled token's and the top-k alternatives
of a reply (`logprobs=True, top_logprobs=k`), and the score of a given
continuation (`Model.score`, for multiple-choice evals).

Every number is the log-softmax of the model's raw logits at that position,
in float64: the model's own distribution. `temperature`, `top_k` and `top_p`
change which token is drawn, never the logprob reported for it (OpenAI
reports the model's distribution the same way), so a greedy and a sampled
reply report the same number for the same token at the same position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import GenerationOptionError
from .sampling import logsumexp

if TYPE_CHECKING:  # pragma: no cover
    from ..model.tokenizer import Tokenizer

#: the most alternatives one position may report (the OpenAI API's limit is 20)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a position: its text, id, logprob and exact bytes."""

    token: str
    id: int
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token: text (undecodable bytes shown as U+FFFD; `bytes` is
    exact), id, logprob, and the `top_logprobs` most likely tokens at its
    position (most likely first, ties by lower id; may include itself)."""

    token: str
    id: int
    logprob: float
    bytes: tuple[int, ...]
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass
class Score:
    """The log-probability of a continuation after a prompt.

    `tokens`/`ids`/`logprobs`: one entry per continuation token; `sum`: their
    total (the continuation's log-likelihood); `greedy`: every token was the
    most likely one at its position (lm-eval's `is_greedy`);
    `prompt_tokens`: positions before the continuation (text + image)."""

    continuation: str
    tokens: list[str]
    ids: list[int]
    logprobs: list[float]
    sum: float
    greedy: bool
    prompt_tokens: int = 0
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)


def check_top_logprobs(logprobs: object, top_logprobs: object) -> None:
    """`logprobs` a bool; `top_logprobs` an int in [0, MAX_TOP_LOGPROBS], > 0 only with logprobs."""
    if not isinstance(logprobs, bool):
        raise GenerationOptionError(f"logprobs must be True or False, got {logprobs!r}")
    if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) \
            or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationOptionError(
            f"top_logprobs must be an integer within [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise GenerationOptionError(f"top_logprobs={top_logprobs} needs logprobs=True")


class LogprobRecorder:
    """Turns (logits row, chosen id) into `TokenLogprob` entries."""

    def __init__(self, tokenizer: "Tokenizer", top_logprobs: int = 0):
        self.tok = tokenizer
        self.k = int(top_logprobs)

    def text_of(self, tid: int) -> tuple[str, tuple[int, ...]]:
        b = self.tok.token_bytes(tid)
        return b.decode("utf-8", errors="replace"), tuple(b)

    def top(self, row: np.ndarray, lse: float, k: int) -> tuple[TopLogprob, ...]:
        """The k most likely tokens of a row (most likely first, ties by id)."""
        n = row.shape[-1]
        k = min(k, n)
        if k <= 0:
            return ()
        # every id at or above the k-th largest value (ties included), then the k best by (value, id)
        idx = np.flatnonzero(row >= np.partition(row, n - k)[n - k]) if k < n else np.arange(n)
        order = np.lexsort((idx, -row[idx].astype(np.float64)))[:k]
        out = []
        for i in idx[order]:
            text, b = self.text_of(int(i))
            out.append(TopLogprob(text, int(i), float(np.float64(row[i]) - lse), b))
        return tuple(out)

    def entry(self, row: np.ndarray, token_id: int) -> TokenLogprob:
        """The logprob entry of `token_id` drawn from logits `row` [vocab]."""
        lse = float(logsumexp(row))
        text, b = self.text_of(int(token_id))
        return TokenLogprob(text, int(token_id), float(np.float64(row[token_id]) - lse), b,
                            self.top(row, lse, self.k))


def score_rows(rows: np.ndarray, ids: Sequence[int], tokenizer: "Tokenizer", continuation: str,
               prompt_tokens: int, top_logprobs: int = 0) -> Score:
    """Score of `ids` where rows[i] are the logits that predict ids[i]."""
    ids = [int(t) for t in ids]
    lse = np.atleast_1d(logsumexp(rows))
    idx = np.asarray(ids, dtype=np.int64)
    lps = rows[np.arange(len(ids)), idx].astype(np.float64) - lse
    greedy = bool(np.all(rows.argmax(axis=-1) == idx))
    rec = LogprobRecorder(tokenizer, top_logprobs)
    tops = [list(rec.top(rows[i], float(lse[i]), top_logprobs)) for i in range(len(ids))] if top_logprobs else []
    return Score(continuation=continuation, tokens=[rec.text_of(t)[0] for t in ids], ids=ids,
                 logprobs=[float(x) for x in lps], sum=float(lps.sum()), greedy=greedy,
                 prompt_tokens=prompt_tokens, top_logprobs=tops)
