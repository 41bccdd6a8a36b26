"""Widgets and worker threads of the desktop app (PySide6; imported only by `r4b-edge app`).

The model is touched only inside `LoadThread` and `GenerateThread`; they talk
to the window through Qt signals (queued across threads), one per stream event.
"""
from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Any, Optional

from PySide6.QtCore import QSize, Qt, QThread, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QFrame, QLabel, QPlainTextEdit, QSizePolicy, QTextBrowser, QToolButton, QVBoxLayout, QWidget,
)

from r4b_edge.engine.events import (
    STOPPED_IN_REASONING, AnswerDelta, Decision, Done, Progress, ReasoningDelta, Result,
)


def pil_to_qimage(img: Any) -> QImage:
    """A deep-copied QImage of an RGB PIL image."""
    rgb = img.convert("RGB")
    data = rgb.tobytes("raw", "RGB")
    return QImage(data, rgb.width, rgb.height, 3 * rgb.width, QImage.Format.Format_RGB888).copy()


def html_text(text: str) -> str:
    """Plain text as HTML (escaped, line breaks kept)."""
    return html.escape(text).replace("\n", "<br>")


def save_screenshot(widget: Any, path: str | Path) -> Path:
    """Grab `widget` and write it as PNG atomically (temp file + rename)."""
    from r4b_edge.errors import R4BError
    from r4b_edge.fsutil import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        if not widget.grab().save(str(tmp), "PNG"):
            raise R4BError(f"could not write the screenshot {path}")
    return path


def badge_text(d: Decision) -> str:
    """`thinking, p_think=0.93` or `direct, p_think=0.04`, as `chat` prints them; `(forced)` when the
    mode or a threshold decided; no p_think where it was not measured."""
    word = ("thinking" if d.think else "direct") + (" (forced)" if d.forced else "")
    return word if d.p_think is None else f"{word}, p_think={d.p_think:.2f}"


def stats_text(result: Result) -> str:
    """The stats strip: time to first token, time to answer, tokens/s, think tokens."""
    s = result.stats
    parts = [f"first token {s.ttft_ms:.0f} ms", f"answer after {s.time_to_answer_ms:.0f} ms",
             f"{s.decode_tps:.1f} tok/s", f"think {s.think_tokens} tok", f"answer {s.answer_tokens} tok"]
    if s.budget_hit:
        parts.append("budget hit")
    if s.finish_reason == "length":
        parts.append("max tokens hit")
    if s.finish_reason == "stop_in_reasoning":
        parts.append(STOPPED_IN_REASONING)
    if s.backend:
        parts.append(f"{s.backend}/{s.device}")
    return "  ·  ".join(parts)


class ImagePreview(QLabel):
    """The chosen image, scaled to fit and re-scaled on resize."""

    PLACEHOLDER = "Drop an image here\nor use Open image…"

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(self.PLACEHOLDER, parent)
        self._pixmap: Optional[QPixmap] = None
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setMinimumSize(QSize(280, 220))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setStyleSheet("QLabel { color: #777; background: #fafafa; }")

    def set_image(self, qimage: Optional[QImage]) -> None:
        self._pixmap = QPixmap.fromImage(qimage) if qimage is not None else None
        if self._pixmap is None:
            self.setPixmap(QPixmap())
            self.setText(self.PLACEHOLDER)
        self._rescale()

    def has_image(self) -> bool:
        return self._pixmap is not None

    def _rescale(self) -> None:
        if self._pixmap is not None:
            size = self.contentsRect().size()
            upscale = self._pixmap.width() < size.width() and self._pixmap.height() < size.height()
            mode = Qt.TransformationMode.FastTransformation if upscale else Qt.TransformationMode.SmoothTransformation
            self.setPixmap(self._pixmap.scaled(size, Qt.AspectRatioMode.KeepAspectRatio, mode))  # small: crisp pixels

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt name
        super().resizeEvent(event)
        self._rescale()


class Collapsible(QWidget):
    """A header button that shows or hides one child widget."""

    def __init__(self, title: str, child: QWidget, expanded: bool = True, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.title = title
        self.toggle = QToolButton(checkable=True, checked=expanded)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.child = child
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.toggle)
        lay.addWidget(child)
        self.toggle.toggled.connect(self.set_expanded)
        self.set_expanded(expanded)

    def set_expanded(self, on: bool) -> None:
        self.toggle.setChecked(on)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.toggle.setText(self.title)
        self.child.setVisible(on)
        vertical = QSizePolicy.Policy.Expanding if on else QSizePolicy.Policy.Fixed
        self.setSizePolicy(QSizePolicy.Policy.Preferred, vertical)  # collapsed: no empty stretch

    def is_expanded(self) -> bool:
        return self.toggle.isChecked()


BADGE_STYLE = {
    "thinking": "background: #fde7c8; color: #8a4b00;",
    "direct": "background: #d8f0dc; color: #1d5e2a;",
    "idle": "background: #eeeeee; color: #555555;",
}


class ReplyView(QWidget):
    """One reply as it streams: decision badge, reasoning (collapsible), answer, stats strip."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.question = QLabel("")
        self.question.setWordWrap(True)
        self.question.setStyleSheet("QLabel { font-weight: bold; }")
        self.badge = QLabel("")
        self.badge.setSizePolicy(QSizePolicy.Policy.Maximum, QSizePolicy.Policy.Fixed)
        self.reasoning = QPlainTextEdit(readOnly=True)
        self.reasoning.setPlaceholderText("(no reasoning)")
        self.reasoning.setStyleSheet("QPlainTextEdit { color: #555; background: #f7f7f7; }")
        self.reasoning.setMinimumHeight(80)
        self.reasoning_panel = Collapsible("Reasoning", self.reasoning, expanded=True)
        self.answer = QTextBrowser()
        self.answer.setPlaceholderText("The answer appears here.")
        self.answer.setMinimumHeight(80)
        self.stats = QLabel("")
        self.stats.setStyleSheet("QLabel { color: #444; font-size: 11px; }")
        self.stats.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        for w in (self.question, self.badge, self.reasoning_panel, self.answer, self.stats):
            lay.addWidget(w)
        lay.setStretch(2, 2)
        lay.setStretch(3, 3)
        self.clear()

    def _set_badge(self, text: str, kind: str) -> None:
        self.badge.setText(text)
        self.badge.setVisible(bool(text))
        self.badge.setStyleSheet(f"QLabel {{ {BADGE_STYLE[kind]} border-radius: 8px; padding: 2px 10px; }}")

    def clear(self, question: str = "") -> None:
        self.question.setText(question)
        self.question.setVisible(bool(question))
        self._set_badge("", "idle")
        self.reasoning.clear()
        self.answer.clear()
        self.stats.setText("")
        self.reasoning_panel.setVisible(False)

    def start(self, question: str) -> None:
        self.clear(question)
        self._set_badge("deciding…", "idle")

    def on_decision(self, d: Decision) -> None:
        self._set_badge(badge_text(d), "thinking" if d.think else "direct")
        p = "not measured" if d.p_think is None else f"{d.p_think:.3f}"
        self.badge.setToolTip(f"p_think = {p}" + (" (mode forced)" if d.forced else " (model's choice)"))
        self.reasoning_panel.setVisible(d.think)

    def add_reasoning(self, text: str) -> None:
        self.reasoning_panel.setVisible(True)
        self.reasoning.moveCursor(self.reasoning.textCursor().MoveOperation.End)
        self.reasoning.insertPlainText(text)

    def add_answer(self, text: str) -> None:
        self.answer.moveCursor(self.answer.textCursor().MoveOperation.End)
        self.answer.insertPlainText(text)

    def finish(self, result: Result) -> None:
        self.stats.setText(stats_text(result))
        if result.reasoning and self.answer.toPlainText():
            self.reasoning_panel.set_expanded(False)  # answer first; the reasoning is one click away

    def stopped(self) -> None:
        self.stats.setText("stopped — this turn is not kept in the conversation")


class LoadThread(QThread):
    """Loads a model off the UI thread."""

    loaded = Signal(object)
    failed = Signal(str)

    def __init__(self, path: Optional[str], backend: str, device: str, threads: Optional[int] = None,
                 options: Optional[dict] = None):
        """`options`: more load options (n_ctx, dtype: --n-ctx, --dtype)."""
        super().__init__()
        self.path, self.backend, self.device, self.threads = path, backend, device, threads
        self.options = dict(options or {})

    def run(self) -> None:
        import r4b_edge

        try:
            self.loaded.emit(r4b_edge.load(self.path or None, backend=self.backend, device=self.device,
                                           threads=self.threads, **self.options))
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the window
            self.failed.emit(_message(e))


class GenerateThread(QThread):
    """Streams one reply: a signal per event; `request_stop()` ends it at the next event.

    A stopped reply closes the engine's generator, so the turn is not recorded in the
    conversation (the next question reuses what the cache already holds)."""

    conversation = Signal(object)
    progress = Signal(str)  # `Progress.line()` while the image and prompt are read
    decision = Signal(object)
    reasoning = Signal(str)
    answer = Signal(str)
    done = Signal(object)
    stopped = Signal()
    failed = Signal(str)

    def __init__(self, model: Any, conv: Any, image: Any, prompt: str, options: dict):
        super().__init__()
        self.model, self.conv, self.image, self.prompt, self.options = model, conv, image, prompt, options
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        events, stopped = None, False
        try:
            if self.conv is None:
                self.conv = self.model.conversation(self.image)
                self.conversation.emit(self.conv)
            events = self.conv.stream(self.prompt, **self.options)
            for ev in events:
                if self._stop.is_set():
                    stopped = True
                    break
                if isinstance(ev, Progress):
                    self.progress.emit(ev.line())
                elif isinstance(ev, Decision):
                    self.decision.emit(ev)
                elif isinstance(ev, ReasoningDelta):
                    self.reasoning.emit(ev.text)
                elif isinstance(ev, AnswerDelta):
                    self.answer.emit(ev.text)
                elif isinstance(ev, Done):
                    self.done.emit(ev.result)
            if stopped:
                self.stopped.emit()
        except Exception as e:  # noqa: BLE001 - shown in the window, never a crash
            self.failed.emit(_message(e))
        finally:
            if events is not None:
                events.close()


def _message(e: BaseException) -> str:
    from r4b_edge.errors import R4BError

    return str(e) if isinstance(e, R4BError) else f"{type(e).__name__}: {e}"
