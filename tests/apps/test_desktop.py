"""`r4b-edge app`: the Qt window driven offscreen with the tiny model."""
from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before Qt is imported

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from tests.conftest import export_tiny
from r4b_edge.testing import slow_down  # noqa: E402
import r4b_edge  # noqa: E402
from r4b_edge.apps.desktop import main_window_class, qt_app, wait_until  # noqa: E402
from r4b_edge.apps.desktop.widgets import badge_text, save_screenshot  # noqa: E402
from r4b_edge.engine.events import Decision  # noqa: E402
from r4b_edge.engine.options import GenerationOptions  # noqa: E402
from r4b_edge.model.processing import load_image  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return qt_app()


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("desktop") / "square.png"
    arr = np.full((96, 128, 3), 240, np.uint8)
    arr[20:70, 30:90] = (200, 30, 30)
    Image.fromarray(arr).save(p)
    return p


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt) as m:
        yield m


@pytest.fixture
def window(app, tiny_ckpt):
    win = main_window_class()(str(tiny_ckpt))
    win.show()
    assert wait_until(lambda: not win.busy, 60), "model did not load"
    assert win.model is not None, win.error_label.text()
    yield win
    win.shutdown()
    win.close()


def _ask(win, question: str, timeout: float = 60) -> None:
    win.question.setText(question)
    win.ask_button.click()
    assert win.busy
    assert wait_until(lambda: not win.busy, timeout), "reply did not finish"


def test_ask_streams_and_multi_turn(window, png, ref):
    win = window
    assert win.set_image(str(png))
    assert win.preview.has_image() and "128×96" in win.image_info.text()
    win.mode_box.setCurrentText("think")
    win.max_tokens_spin.setValue(24)
    _ask(win, "What colour is the square?")
    want = ref.chat(png, "What colour is the square?", mode="think", max_tokens=24)
    assert not win.error_label.isVisible(), win.error_label.text()
    assert re.fullmatch(r"thinking \(forced\), p_think=\d\.\d\d", win.reply.badge.text())
    assert win.reply.reasoning.toPlainText() == want.reasoning
    assert win.reply.answer.toPlainText() == want.answer
    stats = win.reply.stats.text()
    assert "first token" in stats and "answer after" in stats and "tok/s" in stats
    assert f"think {want.stats.think_tokens} tok" in stats
    assert win.statusBar().currentMessage() == "done"
    # second turn on the same image, no-think: same as the API's conversation
    win.mode_box.setCurrentText("no-think")
    _ask(win, "And how many?")
    conv = ref.conversation(png)
    conv.ask("What colour is the square?", mode="think", max_tokens=24)
    want2 = conv.ask("And how many?", mode="no-think", max_tokens=24)
    assert re.fullmatch(r"direct \(forced\), p_think=\d\.\d\d", win.reply.badge.text())  # as `chat` says
    assert not win.reply.reasoning_panel.isVisible()
    assert win.reply.answer.toPlainText() == want2.answer
    assert len(win.conv.messages) == 4
    assert "What colour is the square?" in win.transcript.toPlainText() and win.transcript.isVisible()
    # a new chat forgets the conversation but keeps the image
    win.new_chat_button.click()
    assert win.conv is None and win.image_path == str(png)


def test_options_from_controls(window):
    win = window
    win.mode_box.setCurrentText("auto")
    win.threshold_check.setChecked(True)
    win.threshold_spin.setValue(0.7)
    win.budget_spin.setValue(32)
    assert win.options() == dict(mode="auto", max_tokens=GenerationOptions().max_tokens, max_think_tokens=32,
                                 think_threshold=0.7, measure_p_think=True)  # the engine's default, as `chat`
    win.mode_box.setCurrentText("think")
    win.budget_spin.setValue(-1)
    assert not win.threshold_spin.isEnabled()
    assert win.options()["think_threshold"] is None and win.options()["max_think_tokens"] is None
    assert win.budget_spin.text() == "unlimited"


def test_stop_mid_stream_then_ask_again(window, png, ref):
    win = window
    win.set_image(str(png))
    undo = slow_down(win.model.backend, 0.02)
    win.mode_box.setCurrentText("think")
    win.max_tokens_spin.setValue(2000)
    win.question.setText("Think for a long time")
    win.ask_button.click()
    assert wait_until(lambda: win.reply.reasoning.toPlainText() != "", 30)
    assert win.stop_button.isEnabled() and not win.ask_button.isEnabled()
    from PySide6.QtCore import QTimer

    ticks = []
    timer = QTimer(interval=10, timeout=lambda: ticks.append(1))
    timer.start()
    wait_until(lambda: False, 0.3)  # the UI thread keeps serving events while the reply streams
    timer.stop()
    assert len(ticks) >= 5 and win.busy
    t0 = time.monotonic()
    win.stop_button.click()
    assert wait_until(lambda: not win.busy, 10)
    assert time.monotonic() - t0 < 5
    assert win.statusBar().currentMessage() == "stopped"
    assert "stopped" in win.reply.stats.text()
    assert win.conv is not None and win.conv.messages == []  # the stopped turn is not kept
    # the model is consistent: the next question gets exactly the API's reply
    undo()
    win.max_tokens_spin.setValue(20)
    _ask(win, "What colour is the square?")
    want = ref.chat(png, "What colour is the square?", mode="think", max_tokens=20)
    assert win.reply.answer.toPlainText() == want.answer
    assert win.reply.reasoning.toPlainText() == want.reasoning
    assert len(win.conv.messages) == 2


def test_bad_image_and_drop(window, png, tmp_path, app):
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    win = window
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    assert not win.set_image(str(bad))
    assert win.error_label.isVisible() and "not an image" in win.error_label.text()
    assert not win.set_image(str(tmp_path / "missing.png"))
    assert "not found" in win.error_label.text()
    assert win.image_path is None
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(png))])
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    Qt.KeyboardModifier.NoModifier)
    win.dropEvent(ev)
    assert win.image_path == str(png) and not win.error_label.isVisible()


def test_errors_in_the_window(app, tmp_path, png):
    win = main_window_class()(str(tmp_path / "no-model"))
    win.show()
    try:
        assert wait_until(lambda: not win.busy, 30)
        assert win.model is None
        assert "could not load the model" in win.error_label.text() and "does not exist" in win.error_label.text()
        assert not win.ask_button.isEnabled()
        win.question.setText("q")
        win.ask()
        assert "load a model first" in win.error_label.text()
    finally:
        win.shutdown()
        win.close()


def test_generation_error_is_shown(window, png):
    win = window
    win.set_image(str(png))
    win.mode_box.setCurrentText("auto")
    win.max_tokens_spin.setValue(4)
    _ask(win, "café 東京 ñ € " * 1200)  # longer than the tiny model's context
    assert win.error_label.isVisible() and "context" in win.error_label.text()
    assert win.ask_button.isEnabled()


def test_screenshot(window, png, tmp_path):
    win = window
    win.set_image(str(png))
    win.max_tokens_spin.setValue(16)
    _ask(win, "What colour is the square?")
    out = save_screenshot(win, tmp_path / "shots" / "app.png")
    img = Image.open(out)
    assert img.size[0] >= 600 and img.size[1] >= 400
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # something was drawn


@pytest.mark.slow
def test_cli_screenshot(tiny_ckpt, png, tmp_path):
    out = tmp_path / "cli.png"
    p = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "app", "--model", str(tiny_ckpt), "--image",
                        str(png), "--prompt", "What colour?", "--max-tokens", "8", "--screenshot", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert Image.open(out).size[0] >= 600


def test_cli_errors(tiny_ckpt, png, tmp_path, capsys):
    from r4b_edge.apps.cli import main

    assert main(["app", "--model", str(tiny_ckpt), "--screenshot", str(tmp_path / "x.png")]) == 1
    assert "--screenshot needs --image and --prompt" in capsys.readouterr().err
    assert main(["app", "--model", str(tmp_path / "none"), "--image", str(png), "--prompt", "q",
                 "--screenshot", str(tmp_path / "x.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_no_display_is_a_message(tiny_ckpt):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    p = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "app", "--model", str(tiny_ckpt)],
                       capture_output=True, text=True, timeout=60, env=env)
    if sys.platform.startswith("linux"):
        assert p.returncode == 1 and "no display found" in p.stderr and "Traceback" not in p.stderr


def test_register_imports_no_qt():
    code = ("import sys, argparse; import r4b_edge.apps.desktop as d; p = argparse.ArgumentParser(); "
            "d.register(p.add_subparsers()); print([m for m in ('PySide6', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_image_while_loading_and_close_while_generating(app, tiny_ckpt, png):
    win = main_window_class()(str(tiny_ckpt))
    win.show()
    assert win.set_image(str(png))  # allowed while the model loads
    assert wait_until(lambda: not win.busy, 60) and win.model is not None
    model = win.model
    slow_down(model.backend, 0.02)
    win.max_tokens_spin.setValue(2000)
    win.question.setText("q")
    win.ask()
    worker = win.worker
    assert wait_until(lambda: win.reply.badge.text() not in ("", "deciding…"), 30)
    win.close()  # stops the reply, waits for the thread, frees the model
    assert worker.isFinished() and win.model is None


def _exported(tmp_path_factory, tiny_ckpt, backend: str):
    return export_tiny(tmp_path_factory, tiny_ckpt, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "onnx"])
def test_every_backend(app, tmp_path_factory, tiny_ckpt, png, backend):
    path = _exported(tmp_path_factory, tiny_ckpt, backend)
    with r4b_edge.load(path, backend=backend) as m:
        want = m.chat(png, "What colour?", mode="think", max_tokens=16)
    win = main_window_class()(str(path), backend=backend)
    win.show()
    try:
        assert wait_until(lambda: not win.busy, 60) and win.model is not None, win.error_label.text()
        assert win.model.info()["backend"] == backend
        win.set_image(str(png))
        win.mode_box.setCurrentText("think")
        win.max_tokens_spin.setValue(16)
        _ask(win, "What colour?")
        assert win.reply.reasoning.toPlainText() == want.reasoning
        assert win.reply.answer.toPlainText() == want.answer
        assert f"{backend}/" in win.reply.stats.text()
    finally:
        win.shutdown()
        win.close()


def test_badge_shows_p_think_whether_or_not_it_thinks():
    assert badge_text(Decision(True, 0.934, False)) == "thinking, p_think=0.93"
    assert badge_text(Decision(False, 0.041, False)) == "direct, p_think=0.04"
    assert badge_text(Decision(False, None, True)) == "direct (forced)"  # not measured: nothing to show
    assert badge_text(Decision(True, 0.2, True)) == "thinking (forced), p_think=0.20"


def test_open_dialog_offers_only_what_load_image_reads(window, tmp_path, monkeypatch):
    """Every suffix the Open image dialog offers is a file `load_image` decodes (TIFF was offered, then refused)."""
    from PySide6.QtWidgets import QFileDialog

    asked = []
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a: asked.append(a) or ("", ""))
    window.choose_image()
    images = asked[0][3].split(";;")[0]
    patterns = re.search(r"\((.*)\)", images).group(1).split()
    assert {"*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.bmp"} <= set(patterns)
    pixels = Image.fromarray(np.random.default_rng(2).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    for pattern in patterns:
        path = tmp_path / f"x{pattern[1:]}"
        pixels.save(path)  # Pillow picks the format from the suffix
        assert load_image(path).size == (16, 12), pattern  # raises ImageError for a format it refuses


def test_question_before_an_image_gets_a_hint(window, png):
    win = window
    assert win.image_path is None
    win.question.setText("What colour is the square?")
    win.ask_button.click()
    assert not win.busy and win.worker is None  # nothing was sent to the model
    assert win.error_label.isVisible() and "open an image first" in win.error_label.text()
    assert "Open an image first" in win.question.placeholderText()
    assert win.question.text() == "What colour is the square?"  # kept for after the image is open
    assert win.set_image(str(png)) and "Ask about the image" in win.question.placeholderText()
    win.max_tokens_spin.setValue(8)
    _ask(win, win.question.text())
    assert not win.error_label.isVisible() and "first token" in win.reply.stats.text()


def test_missing_x11_library_is_a_message(monkeypatch):
    """Where Qt would load its X11 plugin, a library it lacks is named, with the packages to install
    (Qt itself aborts the process, naming another library); docs/app.md lists the same packages."""
    import ctypes
    from pathlib import Path

    from r4b_edge.apps import desktop

    def cannot_load(path, *a, **k):
        raise OSError("libxcb-icccm.so.4: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", cannot_load)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM")
    if sys.platform.startswith("linux"):
        problem = desktop.x11_problem()
        assert problem and "libxcb-icccm.so.4" in problem and "apt-get install" in problem
        assert "libxcb-icccm4" in problem and "libxcb-keysyms1" in problem and "--screenshot" in problem
    for env in (dict(QT_QPA_PLATFORM="offscreen"), dict(WAYLAND_DISPLAY="wayland-0")):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert desktop.x11_problem() is None, env  # X11 is not used: nothing to check
    doc = " ".join((Path(__file__).resolve().parents[2] / "docs" / "app.md").read_text().split())
    missing = [p for p in desktop.X11_PACKAGES if f" {p} " not in doc]
    assert not missing, f"docs/app.md does not list {missing}"


def test_the_demo_note_shows_for_the_bundled_model_only(app, window) -> None:
    """#27 item 7: the status bar says what the bundled model can read, only while it is loaded."""
    from r4b_edge.api import BUNDLED_MODEL, BUNDLED_MODEL_NOTE

    assert window.demo_label.isHidden() and window.demo_label.toolTip() == BUNDLED_MODEL_NOTE  # tiny model
    if not (BUNDLED_MODEL / "config.json").exists():
        pytest.skip("no bundled model")
    win = main_window_class()()
    win.show()
    try:
        assert wait_until(lambda: not win.busy, 60) and win.model is not None
        assert not win.demo_label.isHidden() and "2x2 grid" in win.demo_label.text()
    finally:
        win.shutdown()


def test_image_tokens_setting_and_load_options(app, tiny_ckpt, tmp_path):
    """--n-ctx/--dtype reach the model the window loads; the Image tokens setting budgets the next chat's
    image (issue 28); a bad value is a message, not a traceback."""
    import argparse

    from r4b_edge.apps.desktop import _apply_args, window_load_options

    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(wide)
    args = argparse.Namespace(mode="no-think", max_tokens=2, max_think_tokens=None, think_threshold=None,
                              image_tokens=20, n_ctx=300, dtype="float32", threads=1, llama_repack=None)
    assert window_load_options(args) == {"n_ctx": 300, "dtype": "float32"}
    win = main_window_class()(str(tiny_ckpt), threads=1, load_options=window_load_options(args))
    try:
        _apply_args(win, args)
        assert win.image_tokens_box.currentText() == "20"
        assert wait_until(lambda: not win.busy, 60) and win.model is not None, win.error_label.text()
        assert win.model.backend.n_ctx == 300 and win.model.info()["precision"] == "float32"
        assert win.set_image(str(wide))
        _ask(win, "q")
        assert win.last_result.stats.image_tokens == 16  # the base view alone under 20 positions
        win.new_chat_button.click()
        win.image_tokens_box.setCurrentText("full")
        _ask(win, "q")
        assert win.last_result.stats.image_tokens == 70
        win.new_chat_button.click()
        win.image_tokens_box.setCurrentText("lots")
        win.question.setText("q")
        win.ask_button.click()
        assert not win.busy and "image tokens must be a whole number >= 1" in win.error_label.text()
    finally:
        win.shutdown()
        win.close()
