"""Streamed text of one reply part: whitespace trimming. (The think tags an answer
never contains are `model.reply.THINK_TAGS`: the engine adds them to the answer's
stop strings, `stop.StopFilter`, so the answer ends where a tag begins, whether
the model wrote it as the token or spelled it out.)"""
from __future__ import annotations


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
