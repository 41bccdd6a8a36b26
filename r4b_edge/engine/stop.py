"""Stop sequences: cut the answer at the first stop string, as OpenAI does.

The answer is matched as it is returned: after the whitespace its start drops
(so `stop="\\n"` does not end a reply at the blank line after `</think>`).
The reply ends at the token that completes a stop string; the stop string and
anything after it are not part of the answer, and `finish_reason` is "stop".
Stop strings never cut the reasoning (bound it with `max_think_tokens`).

While streaming, text that may be the start of a stop string is held back
until the next tokens settle it, so a stop string split across tokens (or
across several) is never shown.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import GenerationOptionError

#: the most stop strings one call may pass, and the longest one (characters)
MAX_STOPS = 16
MAX_STOP_CHARS = 1000


def normalize_stop(stop: Any) -> tuple[str, ...]:
    """`None`, one string or a list of strings -> a tuple of distinct non-empty strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise GenerationOptionError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(items) > MAX_STOPS:
        raise GenerationOptionError(f"stop takes at most {MAX_STOPS} strings, got {len(items)}")
    out: list[str] = []
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise GenerationOptionError(f"stop[{i}] must be a string, got {type(s).__name__}")
        if not s:
            raise GenerationOptionError(f"stop[{i}] is empty: a stop string needs at least one character")
        if len(s) > MAX_STOP_CHARS:
            raise GenerationOptionError(f"stop[{i}] has {len(s)} characters; the limit is {MAX_STOP_CHARS}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise GenerationOptionError(f"stop[{i}] is not valid Unicode (a lone surrogate)") from None
        if s not in out:
            out.append(s)
    return tuple(out)


class StopFilter:
    """Streams text up to the first stop string.

    `push(text)` returns the text that can no longer be part of a stop string;
    the longest tail that is the start of some stop string is held back. When
    a stop string completes, `hit` names it, `push` returns the text before it
    and every later call returns "". `flush()` releases the held tail at the
    end of a reply that did not stop. Leading whitespace is dropped (the
    answer starts at its first non-space character)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self._firsts = "".join(sorted({s[0] for s in self.stops}))  # every match starts at one of these
        self.hit: str | None = None
        self.held = ""
        self.started = False

    def push(self, text: str) -> str:
        if self.hit is not None:
            return ""
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        if not self.stops:
            return text
        if not self.held:  # no stop's first character: nothing to match, nothing to hold
            for c in self._firsts:
                if c in text:
                    break
            else:
                return text
        buf = self.held + text
        first: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.hit, self.held = first[1], ""
            return buf[:first[0]]
        keep, n = 0, len(buf)
        for s in self.stops:  # the longest tail of buf that is a proper prefix of s
            c = s[0]
            p = buf.find(c, max(0, n - len(s) + 1))  # tails start where s's first character is
            while p >= 0 and n - p > keep:
                if s.startswith(buf[p:]):
                    keep = n - p
                    break
                p = buf.find(c, p + 1)
        self.held = buf[n - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail (empty after a hit)."""
        out, self.held = ("" if self.hit is not None else self.held), ""
        return out
