"""The demo window (`MainWindow`): imported only when the app runs, so it imports Qt directly."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
    QLineEdit, QMainWindow, QPushButton, QSpinBox, QSplitter, QTextBrowser, QVBoxLayout, QWidget,
)

from r4b_edge.api import BUNDLED_MODEL, BUNDLED_MODEL_NOTE
from r4b_edge.backends import BACKENDS
from r4b_edge.backends.runtime import DEVICE_ALIASES
from r4b_edge.errors import R4BError
from r4b_edge.model.image_budget import parse_image_tokens
from r4b_edge.model.processing import load_image

from . import DEFAULT_MAX_TOKENS, MODES, image_filter
from .widgets import GenerateThread, ImagePreview, LoadThread, ReplyView, html_text, pil_to_qimage


class MainWindow(QMainWindow):
    """The demo window. Public state for tests: `model`, `conv`, `busy`, `error_label`, `reply`."""

    def __init__(self, model_path: Optional[str] = None, backend: str = "auto", device: str = "auto",
                 autoload: bool = True, threads: Optional[int] = None, load_options: Optional[dict] = None):
        super().__init__()
        self.threads = threads  # --threads: CPU threads for the backend (None: its default)
        self.load_options = dict(load_options or {})  # --n-ctx, --dtype: every model this window loads
        self.setWindowTitle("r4b-edge — auto-thinking VLM")
        self.setAcceptDrops(True)
        self.model: Any = None
        self.conv: Any = None
        self.image_path: Optional[str] = None
        self.loader: Optional[LoadThread] = None
        self.worker: Optional[GenerateThread] = None
        self.last_result: Any = None
        self._pending_turn: Optional[tuple[str, str]] = None
        self._closing = False
        self._build(model_path, backend, device)
        self._sync()
        if autoload and (model_path or (BUNDLED_MODEL / "config.json").exists()):
            self.load_model()
        elif autoload:
            self.show_error(f"no bundled model at {BUNDLED_MODEL}: choose a model folder or .gguf file "
                            "and press Load")

    # ---- layout ---------------------------------------------------------------------------
    def _build(self, model_path: Optional[str], backend: str, device: str) -> None:
        # shown while the bundled demo model is loaded: what it can and cannot read
        self.demo_label = QLabel("demo model: reads only the synthetic world's 2x2 grid scenes")
        self.demo_label.setToolTip(BUNDLED_MODEL_NOTE)
        self.demo_label.setVisible(False)
        self.statusBar().addPermanentWidget(self.demo_label)
        self.preview = ImagePreview()
        self.image_info = QLabel("")
        self.open_button = QPushButton("Open image…", clicked=self.choose_image)
        self.new_chat_button = QPushButton("New chat", clicked=self.new_chat)
        left = QVBoxLayout()
        left.addWidget(self.preview, 1)
        left.addWidget(self.image_info)
        row = QHBoxLayout()
        row.addWidget(self.open_button)
        row.addWidget(self.new_chat_button)
        left.addLayout(row)

        self.model_edit = QLineEdit(model_path or "")
        self.model_edit.setPlaceholderText(f"default: bundled model ({BUNDLED_MODEL.name}/)")
        self.folder_button = QPushButton("Folder…", clicked=self.choose_model_folder)
        self.file_button = QPushButton("File…", clicked=self.choose_model_file)
        mrow = QHBoxLayout()
        for w in (self.model_edit, self.folder_button, self.file_button):
            mrow.addWidget(w)
        self.backend_box = QComboBox()
        self.backend_box.addItems(["auto", *BACKENDS])
        self.backend_box.setCurrentText(backend)
        self.device_box = QComboBox(editable=True)
        self.device_box.addItems(list(DEVICE_ALIASES))
        self.device_box.setCurrentText(device)
        self.load_button = QPushButton("Load", clicked=self.load_model)
        brow = QHBoxLayout()
        for w in (self.backend_box, QLabel("device"), self.device_box, self.load_button):
            brow.addWidget(w)
        self.mode_box = QComboBox()
        self.mode_box.addItems(list(MODES))
        self.mode_box.currentTextChanged.connect(lambda _: self._sync())
        self.threshold_check = QCheckBox("fixed", toggled=lambda _: self._sync())
        self.threshold_spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.05, value=0.5, decimals=2)
        trow = QHBoxLayout()
        trow.addWidget(self.threshold_check)
        trow.addWidget(self.threshold_spin, 1)
        self.budget_spin = QSpinBox(minimum=-1, maximum=65536, value=-1, singleStep=64)
        self.budget_spin.setSpecialValueText("unlimited")
        self.budget_spin.setSuffix(" tokens")
        self.max_tokens_spin = QSpinBox(minimum=1, maximum=65536, value=DEFAULT_MAX_TOKENS, singleStep=64)
        self.image_tokens_box = QComboBox(editable=True)
        self.image_tokens_box.addItems(["auto", "full"])
        self.image_tokens_box.setToolTip(
            "positions an image may take (N, auto or full; --image-tokens): the AnyRes grid is the best one that "
            "fits; auto is the full grid on a GPU and a budget per CPU thread on a CPU. Applies to the next image "
            "or new chat")
        form = QFormLayout()
        form.addRow("Model", mrow)
        form.addRow("Backend", brow)
        form.addRow("Mode", self.mode_box)
        form.addRow("Think threshold", trow)
        form.addRow("Thinking budget", self.budget_spin)
        form.addRow("Max tokens", self.max_tokens_spin)
        form.addRow("Image tokens", self.image_tokens_box)
        settings = QGroupBox("Settings")
        settings.setLayout(form)
        left.addWidget(settings)

        self.transcript = QTextBrowser()
        self.transcript.setVisible(False)
        self.reply = ReplyView()
        self.error_label = QLabel("")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.setStyleSheet("QLabel { color: #a00000; background: #fdecea; padding: 6px; }")
        self.error_label.setVisible(False)
        self.question = QLineEdit(returnPressed=self.ask)
        self.ask_button = QPushButton("Ask", clicked=self.ask)
        self.stop_button = QPushButton("Stop", clicked=self.stop)
        qrow = QHBoxLayout()
        for w in (self.question, self.ask_button, self.stop_button):
            qrow.addWidget(w)
        right = QVBoxLayout()
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.transcript)
        holder = QWidget()
        hl = QVBoxLayout(holder)
        hl.setContentsMargins(0, 0, 0, 0)
        hl.addWidget(self.reply)
        split.addWidget(holder)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 4)
        split.setSizes([140, 560])  # the transcript of earlier turns stays small
        right.addWidget(split, 1)
        right.addWidget(self.error_label)
        right.addLayout(qrow)

        central = QWidget()
        outer = QHBoxLayout(central)
        lw, rw = QWidget(), QWidget()
        lw.setLayout(left)
        rw.setLayout(right)
        outer.addWidget(lw, 2)
        outer.addWidget(rw, 3)
        self.setCentralWidget(central)
        self.resize(1100, 720)

    # ---- state ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.worker is not None or self.loader is not None

    def _sync(self) -> None:
        gen = self.worker is not None
        self.ask_button.setEnabled(not self.busy and self.model is not None)
        self.stop_button.setEnabled(gen)
        for w in (self.load_button, self.backend_box, self.device_box, self.model_edit, self.folder_button,
                  self.file_button):
            w.setEnabled(not self.busy)
        self.open_button.setEnabled(not gen)
        self.new_chat_button.setEnabled(not gen)
        auto = self.mode_box.currentText() == "auto"
        self.threshold_check.setEnabled(auto)
        self.threshold_spin.setEnabled(auto and self.threshold_check.isChecked())
        self.question.setPlaceholderText("Ask about the image…" if self.image_path
                                         else "Open an image first, then ask about it…")

    def show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(bool(message))
        if message:
            self.statusBar().showMessage("error", 5000)

    def options(self) -> dict:
        """Generation options from the controls."""
        mode = self.mode_box.currentText()
        budget = self.budget_spin.value()
        # The badge shows p_think in every mode: worth the decision forward (a few ms) here.
        return dict(mode=mode, max_tokens=self.max_tokens_spin.value(), measure_p_think=True,
                    max_think_tokens=None if budget < 0 else budget,
                    think_threshold=self.threshold_spin.value()
                    if mode == "auto" and self.threshold_check.isChecked() else None)

    # ---- model ----------------------------------------------------------------------------
    def choose_model_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Model folder (R-4B checkpoint, ONNX export or GGUF)")
        if d:
            self.model_edit.setText(d)

    def choose_model_file(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Model file", "", "GGUF (*.gguf);;All files (*)")
        if f:
            self.model_edit.setText(f)

    def load_model(self) -> None:
        if self.busy:
            return
        self.show_error("")
        self.statusBar().showMessage("loading model…")
        self.loader = LoadThread(self.model_edit.text().strip() or None, self.backend_box.currentText(),
                                 self.device_box.currentText().strip() or "auto", self.threads, self.load_options)
        self.loader.loaded.connect(self._on_loaded)
        self.loader.failed.connect(self._on_load_failed)
        self.loader.finished.connect(self._on_loader_finished)
        self._sync()
        self.loader.start()

    def _on_loaded(self, model: Any) -> None:
        if self._closing:  # the window went away while the model loaded
            model.close()
            return
        if self.model is not None:
            self.model.close()
        self.model, self.conv = model, None
        info = model.info()
        self.statusBar().showMessage(f"model ready: {info['backend']}/{info['device']} — {info['model']}")
        self.demo_label.setVisible(bool(getattr(model, "is_bundled", False)))
        self._reset_transcript()

    def _on_load_failed(self, message: str) -> None:
        self.show_error(f"could not load the model: {message}")
        self.statusBar().showMessage("no model loaded" if self.model is None else "previous model kept")

    def _on_loader_finished(self) -> None:
        if self.loader is not None:
            self.loader.deleteLater()
        self.loader = None
        self._sync()

    # ---- image ----------------------------------------------------------------------------
    def choose_image(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Open image", "", image_filter())
        if f:
            self.set_image(f)

    def set_image(self, path: str) -> bool:
        """Show `path` and start a new conversation about it; a bad image leaves a message."""
        if self.worker is not None:
            self.show_error("wait for the current reply (or press Stop) before changing the image")
            return False
        try:
            img = load_image(path)
        except Exception as e:  # noqa: BLE001 - ImageError and anything odd: a message, not a crash
            self.show_error(f"cannot open the image: {e}")
            return False
        self.show_error("")
        self.image_path = str(path)
        self.preview.set_image(pil_to_qimage(img))
        self.image_info.setText(f"{Path(path).name} — {img.width}×{img.height}")
        self.new_chat()
        self._sync()
        return True

    def new_chat(self) -> None:
        """Forget the conversation; keep the image."""
        if self.worker is not None:
            return
        self.conv = None
        self._reset_transcript()

    def _reset_transcript(self) -> None:
        self.transcript.clear()
        self.transcript.setVisible(False)
        self.reply.clear()
        self._pending_turn = None

    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt name
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        files = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if files:
            event.acceptProposedAction()
            self.set_image(files[0])

    # ---- asking ---------------------------------------------------------------------------
    def ask(self) -> None:
        q = self.question.text().strip()
        if self.busy:
            return
        if self.model is None:
            self.show_error("load a model first (choose a model folder or .gguf file and press Load)")
            return
        if self.image_path is None:
            self.show_error("open an image first: Open image… or drop an image file on the window "
                            "(the app asks about an image; for a chat without one: r4b-edge chat none)")
            return
        if not q:
            self.show_error("type a question first")
            return
        try:  # the model's default budget: a new chat's image is prepared with it
            self.model.image_tokens = parse_image_tokens(self.image_tokens_box.currentText(), "image tokens")
        except R4BError as e:
            self.show_error(str(e))
            return
        self.show_error("")
        if self._pending_turn:
            prev_q, prev_a = self._pending_turn
            self.transcript.append(f"<b>You:</b> {html_text(prev_q)}<br><b>Model:</b> {html_text(prev_a)}<br>")
            self.transcript.setVisible(True)
            self._pending_turn = None
        self.reply.start(q)
        self.question.clear()
        self.worker = GenerateThread(self.model, self.conv, self.image_path, q, self.options())
        w = self.worker
        w.conversation.connect(self._on_conversation)
        w.progress.connect(lambda line: self.statusBar().showMessage(line))
        w.decision.connect(self.reply.on_decision)
        w.decision.connect(lambda _d: self.statusBar().showMessage("generating…"))
        w.reasoning.connect(self.reply.add_reasoning)
        w.answer.connect(self.reply.add_answer)
        w.done.connect(lambda r, q=q: self._on_done(q, r))
        w.stopped.connect(self._on_stopped)
        w.failed.connect(self._on_failed)
        w.finished.connect(self._on_worker_finished)
        self.statusBar().showMessage("generating…")
        self._sync()
        w.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.request_stop()
            self.statusBar().showMessage("stopping…")

    def _on_conversation(self, conv: Any) -> None:
        self.conv = conv

    def _on_done(self, question: str, result: Any) -> None:
        self.last_result = result
        self.reply.finish(result)
        self._pending_turn = (question, result.answer)
        self.statusBar().showMessage("done")

    def _on_stopped(self) -> None:
        self.reply.stopped()
        self.statusBar().showMessage("stopped")

    def _on_failed(self, message: str) -> None:
        self.reply.stats.setText("")
        self.show_error(message)
        self.statusBar().showMessage("failed")

    def _on_worker_finished(self) -> None:
        if self.worker is not None:
            self.worker.deleteLater()
        self.worker = None
        self._sync()

    # ---- closing --------------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 10_000) -> None:
        """Stop the reply, wait for the threads, free the model."""
        self._closing = True
        if self.worker is not None:
            self.worker.request_stop()
            self.worker.wait(timeout_ms)
        if self.loader is not None:
            self.loader.wait(timeout_ms)
        if self.model is not None:
            self.model.close()
            self.model = None

    def closeEvent(self, event) -> None:  # noqa: N802
        self.shutdown()
        super().closeEvent(event)
