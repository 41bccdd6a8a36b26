"""`r4b-edge app`: a Qt desktop demo. Open or drop an image, ask, watch the model
decide whether to think; the reasoning streams into a collapsible panel, then
the answer and the timings. `--screenshot OUT.png` renders one reply offscreen.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from r4b_edge.engine.options import GenerationOptions
from r4b_edge.model.template import API_MODES

MODES = API_MODES
#: The reply bound the window starts with: the engine's default, as `chat` and the API use.
DEFAULT_MAX_TOKENS = GenerationOptions.max_tokens
#: The system libraries PySide6's X11 (xcb) plugin loads, as Debian/Ubuntu packages (docs/app.md
#: lists them). Missing one, Qt aborts the process with a message that may name another library.
X11_PACKAGES = (
    "libx11-xcb1", "libxcb1", "libxcb-cursor0", "libxcb-icccm4", "libxcb-image0", "libxcb-keysyms1",
    "libxcb-randr0", "libxcb-render0", "libxcb-render-util0", "libxcb-shape0", "libxcb-shm0", "libxcb-sync1",
    "libxcb-util1", "libxcb-xfixes0", "libxcb-xkb1", "libxkbcommon0", "libxkbcommon-x11-0",
    "libegl1", "libgl1", "libfontconfig1", "libdbus-1-3", "libglib2.0-0",
)


def register(sub) -> None:
    from ..common import add_model_args

    p = sub.add_parser("app", help="desktop demo app (Qt)", description=__doc__)
    add_model_args(p)
    p.add_argument("--image", default=None, help="image to open at start")
    p.add_argument("--prompt", action="append", default=None,
                   help="question to put in the box; with --screenshot each --prompt is asked in turn (multi-turn)")
    p.add_argument("--mode", default="auto", choices=list(MODES), help="initial mode")
    p.add_argument("--think-threshold", type=float, default=None, metavar="P", help="initial fixed threshold (auto mode)")
    p.add_argument("--max-think-tokens", type=int, default=None, metavar="N", help="initial thinking budget")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"initial reply bound (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="no window: load, ask --prompt about --image offscreen, save a screenshot, exit")
    p.set_defaults(func=run)


def _need_qt() -> None:
    try:
        import PySide6  # noqa: F401
    except ImportError:
        from r4b_edge.errors import BackendUnavailableError

        raise BackendUnavailableError("`r4b-edge app` needs PySide6: pip install 'r4b-edge[app]'") from None


def image_filter() -> str:
    """The Open image dialog's filter: the suffixes of the formats `load_image` decodes
    (`r4b_edge.model.processing` owns them), then all files."""
    from r4b_edge.model.processing import IMAGE_FORMATS_TEXT, image_suffixes

    patterns = " ".join(f"*{s}" for s in image_suffixes())
    return f"Images: {IMAGE_FORMATS_TEXT} ({patterns});;All files (*)"




def main_window_class():
    """The MainWindow class (imports PySide6: `window.py`)."""
    from .window import MainWindow

    return MainWindow


def qt_app():
    """The QApplication (created once)."""
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "r4b-edge"])


def wait_until(pred: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Run the Qt event loop until `pred()` or the timeout; returns pred()."""
    app = qt_app()
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.005)
    app.processEvents()
    return pred()


def _apply_args(win: Any, args: argparse.Namespace) -> None:
    win.mode_box.setCurrentText(args.mode)
    win.image_tokens_box.setCurrentText("full" if args.image_tokens is None else str(args.image_tokens))
    win.max_tokens_spin.setValue(args.max_tokens)
    if args.max_think_tokens is not None:
        win.budget_spin.setValue(args.max_think_tokens)
    if args.think_threshold is not None:
        win.threshold_check.setChecked(True)
        win.threshold_spin.setValue(args.think_threshold)


def _check_args(args: argparse.Namespace) -> None:
    from r4b_edge.errors import R4BError

    if args.max_tokens < 1:
        raise R4BError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_think_tokens is not None and args.max_think_tokens < 0:
        raise R4BError(f"--max-think-tokens must be >= 0, got {args.max_think_tokens}")
    if args.think_threshold is not None and not 0.0 <= args.think_threshold <= 1.0:
        raise R4BError(f"--think-threshold must be within [0, 1], got {args.think_threshold}")


def screenshot(args: argparse.Namespace) -> int:
    """Offscreen: load, ask, wait for the reply, save the window."""
    from r4b_edge.errors import R4BError

    from .widgets import save_screenshot

    if not args.image or not args.prompt:
        raise R4BError("--screenshot needs --image and --prompt")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    qt_app()
    win = main_window_class()(args.model, args.backend, args.device, threads=args.threads,
                              load_options=window_load_options(args))
    try:
        _apply_args(win, args)
        win.show()
        wait_until(lambda: not win.busy, 600)
        if win.model is None:
            raise R4BError(win.error_label.text() or "the model did not load")
        if not win.set_image(args.image):
            raise R4BError(win.error_label.text())
        for prompt in args.prompt:
            win.question.setText(prompt)
            win.ask()
            wait_until(lambda: not win.busy, 600)
            if win.error_label.isVisible():
                raise R4BError(win.error_label.text())
        if win.reply.reasoning.toPlainText():
            win.reply.reasoning_panel.set_expanded(True)  # show everything in the picture
            wait_until(lambda: False, 0.2)
        out = save_screenshot(win, args.screenshot)
        print(f"saved {out}")
        return 0
    finally:
        win.shutdown()
        win.close()


def window_load_options(args: argparse.Namespace) -> dict:
    """--n-ctx and --dtype, as given, for every model the window loads (--threads goes on its own;
    --llama-repack through the environment; --image-tokens is the window's Image tokens setting)."""
    from ..common import load_options

    return {k: v for k, v in load_options(args).items() if k in ("n_ctx", "dtype")}


def _repack_env(args: argparse.Namespace) -> None:
    """--llama-repack reaches the llama backend of every model the window loads through its
    environment variable (the window may load several models, of any backend)."""
    if getattr(args, "llama_repack", None):
        from r4b_edge.backends.llama_repack import ENV

        os.environ[ENV] = args.llama_repack


def x11_problem() -> Optional[str]:
    """Why Qt's X11 plugin cannot load here, or None. Where Qt would use X11 (Linux, $DISPLAY set, no
    other platform chosen), the plugin is loaded first, so a missing system library becomes a message
    naming it and the packages to install instead of Qt's abort."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if not sys.platform.startswith("linux") or not os.environ.get("DISPLAY"):
        return None
    if platform.split(":")[0] not in ("", "xcb") or (not platform and os.environ.get("WAYLAND_DISPLAY")):
        return None  # another platform plugin (Wayland, offscreen, ...) is used
    import ctypes

    from PySide6.QtCore import QLibraryInfo

    plugin = Path(QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)) / "platforms" / "libqxcb.so"
    if not plugin.exists():
        return None
    try:
        ctypes.CDLL(str(plugin))
    except OSError as e:
        return (f"Qt cannot load its X11 plugin ({e}): install the X11 libraries docs/app.md lists "
                f"(Debian/Ubuntu: sudo apt-get install {' '.join(X11_PACKAGES)}), "
                "or render offscreen with --screenshot OUT.png")
    return None


def run(args: argparse.Namespace) -> int:
    _need_qt()
    _check_args(args)
    _repack_env(args)
    if args.screenshot:
        return screenshot(args)
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                                 or os.environ.get("QT_QPA_PLATFORM")):
        from r4b_edge.errors import R4BError

        raise R4BError("no display found (DISPLAY/WAYLAND_DISPLAY unset): run it in a desktop session, "
                       "or render offscreen with --screenshot OUT.png")
    problem = x11_problem()
    if problem:
        from r4b_edge.errors import R4BError

        raise R4BError(problem)
    app = qt_app()
    win = main_window_class()(args.model, args.backend, args.device, threads=args.threads,
                              load_options=window_load_options(args))
    _apply_args(win, args)
    if args.image:
        win.set_image(args.image)
    if args.prompt:
        win.question.setText(args.prompt[-1])
    win.show()
    return int(app.exec())
