"""The CLI's progress line (`apps/progress.py`): on a terminal after the delay, erased when the
reply starts; nothing on a pipe; and `r4b-edge chat --verbose` shows positions reused."""
from __future__ import annotations

import io
import subprocess
import sys
import time

from r4b_edge import Progress
from r4b_edge.apps.progress import CLEAR, ProgressLine


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_shows_the_latest_progress_on_a_terminal_then_is_erased() -> None:
    out = Tty()
    line = ProgressLine(out, delay=0.05, interval=0.02)
    line.update(Progress("vision", 3, 7, 10.0))
    time.sleep(0.3)
    line.update(Progress("prefill", 512, 4540, 20.0))
    time.sleep(0.2)
    line.close()
    text = out.getvalue()
    assert "encoding image: view 3/7" in text and "reading prompt: 512/4,540 positions (11%)" in text
    assert " s]" in text and text.endswith(CLEAR)
    line.close()  # twice is fine


def test_nothing_before_the_delay_and_nothing_on_a_pipe() -> None:
    quick = Tty()
    line = ProgressLine(quick, delay=5.0)
    line.update(Progress("prefill", 1, 2))
    line.close()
    assert quick.getvalue() == ""
    pipe = io.StringIO()
    line = ProgressLine(pipe, delay=0.0, interval=0.01)
    line.update(Progress("prefill", 1, 2))
    time.sleep(0.1)
    line.close()
    assert pipe.getvalue() == "" and not line.enabled


def test_repl_verbose_reports_reused_positions(tiny_ckpt, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(png)
    p = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "chat", str(png), "--model", str(tiny_ckpt),
                        "--max-tokens", "4", "--mode", "no-think", "--verbose"], input="first?\nsecond?\n",
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    reused = [int(l.split(" evaluated, ")[1].split(" reused")[0]) for l in p.stdout.splitlines() if " reused)" in l]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] > 0
    assert "\033[" not in p.stderr  # no progress line on a pipe


def test_the_cli_says_when_a_reply_stopped_while_reasoning() -> None:
    from types import SimpleNamespace

    from r4b_edge import Done, Result, Stats
    from r4b_edge.apps.chat import _show

    r = Result(answer="", reasoning="circle", thought=True, p_think=0.99, mode="auto", forced=False,
               stats=Stats(finish_reason="stop_in_reasoning"))
    out = io.StringIO()
    _show(Done(r), SimpleNamespace(verbose=False, hide_thinking=False), out, "", "", None, False)
    assert "the model stopped while reasoning" in out.getvalue()


def test_the_bundled_model_says_what_it_can_read(tiny_ckpt) -> None:
    """#27 item 7: the REPL banner of the bundled model (and only of it) carries the note."""
    from r4b_edge.api import BUNDLED_MODEL, BUNDLED_MODEL_NOTE

    if not (BUNDLED_MODEL / "config.json").exists():
        import pytest

        pytest.skip("no bundled model")
    assert "r4b-edge pull YannQi/R-4B" in BUNDLED_MODEL_NOTE and "2x2 grid" in BUNDLED_MODEL_NOTE
    shown = []
    for model in (None, str(tiny_ckpt)):
        cmd = [sys.executable, "-m", "r4b_edge.apps.cli", "chat", "none", "--max-tokens", "2"]
        p = subprocess.run(cmd + (["--model", model] if model else []), input="/exit\n", capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        shown.append(BUNDLED_MODEL_NOTE in p.stdout)
    assert shown == [True, False]
    readme = (BUNDLED_MODEL.parents[2] / "README.md").read_text(encoding="utf-8")
    assert "What the bundled model can read" in readme.split("## Quick start")[0]
