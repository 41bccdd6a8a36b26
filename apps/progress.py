"""The CLI's one-line progress indicator while a prompt is read (vision views, prefill).

A reply about a big image can spend tens of seconds before its first token. On a terminal,
once the wait passes `delay` seconds, one line on stderr shows the latest `Progress` and the
time waited (`[encoding image: view 3/7 · 12.4 s]`), redrawn a few times a second by a
background thread (the stream blocks between events), and erased when the reply starts.
Nothing is written when stderr is not a terminal.
"""
from __future__ import annotations

import threading
import time
from typing import Optional, TextIO

DIM, RESET, CLEAR = "\033[2m", "\033[0m", "\r\033[K"


class ProgressLine:
    """`update(progress)` as events arrive, `close()` when the reply starts (or ends)."""

    def __init__(self, stream: TextIO, delay: float = 1.0, interval: float = 0.25) -> None:
        self.stream, self.delay, self.interval = stream, delay, interval
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._t0 = time.monotonic()
        self._text = "reading the prompt"
        self._shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="r4b-progress", daemon=True)
            self._thread.start()

    def update(self, progress) -> None:
        """The latest `Progress` event (its `line()` is shown)."""
        with self._lock:
            self._text = progress.line()

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    break
                waited = time.monotonic() - self._t0
                self.stream.write(f"{CLEAR}{DIM}[{self._text} · {waited:.1f} s]{RESET}")
                self.stream.flush()
                self._shown = True
            self._stop.wait(self.interval)

    def close(self) -> None:
        """Stop redrawing and erase the line (if it was shown). Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._shown:
                self.stream.write(CLEAR)
                self.stream.flush()
                self._shown = False
