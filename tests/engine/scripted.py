"""A backend whose 'model' is a script, to test the engine's logic exactly.

After the prompt, the reply follows one of two continuations of the think
block: empty (`\\n\\n</think>\\n\\n`) with probability 1 - p_think, or a
reasoning text with probability p_think; once `</think>` is written it
answers `ANSWER` and stops. Off-script histories keep emitting FILLER (to test
budgets and max_tokens).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from r4b_edge.backends.base import Backend, PrefillTimings
from r4b_edge.engine.events import Progress
from r4b_edge.errors import ContextLengthError
from r4b_edge.model.processing import PreparedImage

REASONING = "\nfirst two plus two is four\n"
ANSWER = "four"
FILLER = " step"


class VirtualClock:
    """A clock the scripted backend advances: `prefill_s` per prefill, `step_s` per forward call
    (or `step_time(call, n_tokens)` when given: a machine whose pace changes, batches that cost
    more than a step); give it to `Engine.clock`, so deadline mode plans in scripted time."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, tokenizer, p_think: float, n_ctx: int = 4096, clock: "VirtualClock | None" = None,
                 prefill_s: float = 0.0, step_s: float = 0.0, answer_ids: list[int] | None = None,
                 step_time=None, report_prefill: bool = False):
        self.clock, self.prefill_s, self.step_s, self.step_time = clock, prefill_s, step_s, step_time
        self.report_prefill = report_prefill  # timings.prefill_ms = prefill_s, as a real backend reports it
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_position_embeddings=n_ctx)
        self.p_think = p_think
        tok = tokenizer
        self.empty = tok.encode("\n\n") + [tok.end_think]
        self.think = tok.encode(REASONING) + [tok.end_think]
        self.answer = tok.encode("\n\n") + (tok.encode(ANSWER) if answer_ids is None else list(answer_ids)) + [tok.im_end]
        self.filler = tok.encode(FILLER)[0]
        self.seq: list[int] = []
        self.n_prompt = 0
        self.calls = 0
        self.forwarded: list[int] = []  # tokens per forward call
        self.timings = PrefillTimings()
        self.model_path = "scripted"

    @property
    def n_past(self) -> int:
        return len(self.seq)

    @property
    def n_ctx(self) -> int:
        return self.config.max_position_embeddings

    def image_token_count(self, image: PreparedImage) -> int:
        return 4

    def _probs(self, hist: list[int]) -> np.ndarray:
        V = self.tokenizer.vocab_size
        p = np.full(V, 1e-12)
        tok = self.tokenizer
        if tok.end_think in hist:
            rest = hist[len(hist) - hist[::-1].index(tok.end_think):]
            if rest == self.answer[: len(rest)] and len(rest) < len(self.answer):
                p[self.answer[len(rest)]] = 1.0
            else:
                p[tok.im_end] = 1.0
        else:
            for cand, w in ((self.empty, 1.0 - self.p_think), (self.think, self.p_think)):
                if hist == cand[: len(hist)] and len(hist) < len(cand):
                    p[cand[len(hist)]] += w
            if p.max() < 1e-6:
                p[self.filler] = 1.0
        return p / p.sum()

    def _logits(self) -> np.ndarray:
        # The script starts after the sequence's last `<think>` (the prompt's, or
        # after the whole prompt when it has none).
        tok = self.tokenizer
        start = len(self.seq) - self.seq[::-1].index(tok.think) if tok.think in self.seq else self.n_prompt
        hist = self.seq[start:]
        return np.log(self._probs(hist)).astype(np.float32)

    def prefill_steps(self, segments, *, reuse: bool = True):
        """Always from an empty sequence (the script has no cache); one `Progress` at the end."""
        self.seq = []
        n_img = 0
        for s in segments:
            if isinstance(s, PreparedImage):
                self.seq += [-1] * 4
                n_img += 4
            else:
                self.seq += list(s)
        if len(self.seq) > self.n_ctx:
            raise ContextLengthError(f"a prompt of {len(self.seq)} positions exceeds the context of {self.n_ctx}")
        self.n_prompt = len(self.seq)
        self.timings = PrefillTimings(image_tokens=n_img, prefill_ms=self.prefill_s * 1000.0 if self.report_prefill else 0.0,
                                      positions_evaluated=len(self.seq))
        if self.clock is not None:
            self.clock.t += self.prefill_s
        yield Progress("prefill", len(self.seq), len(self.seq))
        return self._logits()

    def forward(self, token_ids) -> np.ndarray:
        self.calls += 1
        if self.clock is not None:  # one decode step per call (a batch costs about one step)
            self.clock.t += self.step_s if self.step_time is None else self.step_time(self.calls, len(token_ids))
        self.forwarded.append(len(token_ids))
        if len(self.seq) + len(token_ids) > self.n_ctx:
            raise ContextLengthError(f"{len(self.seq) + len(token_ids)} positions exceed the context of {self.n_ctx}")
        out = []
        for t in token_ids:
            self.seq.append(int(t))
            out.append(self._logits())
        return np.stack(out)

    def forward_last(self, token_ids) -> np.ndarray:
        return self.forward(token_ids)[-1]

    def truncate(self, n_past: int) -> None:
        self.seq = self.seq[:n_past]

    # the hooks a real backend implements: the script overrides the calls above instead
    def _unused(self, *args, **kwargs):
        raise NotImplementedError("the scripted backend overrides prefill_steps / forward / truncate")

    _reset = _truncate = _eval = _forward = _vision_view = _pack = _snapshot = _restore = _unused
