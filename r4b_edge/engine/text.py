"""Streamed text of one reply: its parts' stream decoders, whitespace trimming, the
answer's stop filter and the logprob entries (`ReplyText`). (The think tags an answer
never contains are `model.reply.THINK_TAGS`: the engine adds them to the answer's
stop strings, `stop.StopFilter`, so the answer ends where a tag begins, whether
the model wrote it as the token or spelled it out.)"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..model.tokenizer import StreamDecoder
from .events import AnswerDelta, Event, ReasoningDelta
from .stop import StopFilter

if TYPE_CHECKING:
    import numpy as np

    from ..model.tokenizer import Tokenizer
    from .logprobs import LogprobRecorder

PHASES = ("reasoning", "answer")


class TrimmedText:
    """Streams text with leading and trailing whitespace held back, so the
    concatenated deltas equal the final `.strip()`ped text."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""
        self.parts: list[str] = []

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = self.pending + text
        stripped = body.rstrip()
        self.pending = body[len(stripped):]
        self.parts.append(stripped)
        return stripped

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ReplyText:
    """The text side of one reply: token ids in, delta events out. Per part (reasoning,
    answer): a stream decoder, the trimmed text, the logprob entries (all of them, and
    those no delta has carried yet). The answer's text passes the stop filter, which
    also ends it at a think tag written as text (`stop.hit` then names the string)."""

    def __init__(self, tok: "Tokenizer", piece_len: dict, stops: Sequence[str],
                 recorder: "LogprobRecorder | None") -> None:
        self.decoders = {p: StreamDecoder(tok, piece_len=piece_len) for p in PHASES}
        self.texts = {p: TrimmedText() for p in PHASES}
        self.stop = StopFilter(stops)
        self.recorder = recorder
        self.entries: dict[str, list] = {p: [] for p in PHASES}
        self.unsent: dict[str, list] = {p: [] for p in PHASES}

    def push(self, phase: str, token_ids: Sequence[int], row: "np.ndarray | None" = None) -> list[Event]:
        """Text of `token_ids`. `row`: the logits the (single) token was sampled
        from, for its logprob entry; forced tokens have none."""
        if row is not None and self.recorder is not None:
            e = self.recorder.entry(row, token_ids[0])
            self.entries[phase].append(e)
            self.unsent[phase].append(e)
        events: list[Event] = []
        dec = self.decoders[phase]
        for t in token_ids:
            piece = dec.push(t)
            if piece and phase == "answer":
                piece = self.stop.push(piece)
            if piece:
                events.extend(self._delta(phase, self.texts[phase].push(piece)))
        return events

    def flush(self) -> list[Event]:
        """The text the decoders and the answer's stop filter still hold."""
        events: list[Event] = []
        for p in PHASES:
            rest = self.decoders[p].flush()
            if p == "answer":  # the stop filter's held tail is answer text after all
                rest = self.stop.push(rest) + self.stop.flush()
            if rest:
                events.extend(self._delta(p, self.texts[p].push(rest)))
        return events

    def _delta(self, phase: str, text: str) -> list[Event]:
        """A delta event for `text` (none if empty), carrying the entries not sent yet."""
        if not text:
            return []
        unsent = self.unsent[phase]
        lps = tuple(unsent) if unsent else ()
        unsent.clear()
        return [ReasoningDelta(text, lps) if phase == "reasoning" else AnswerDelta(text, lps)]
