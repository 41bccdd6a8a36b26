"""`r4b-edge chat IMAGE` REPL driven through pipes: Ctrl-C (SIGINT) stops an answer and keeps
the conversation; Ctrl-C at the prompt quits, as `ollama run` does."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import r4b_edge

SLOW_CLI = str(Path(__file__).with_name("slow_cli.py"))
ROOT = str(Path(__file__).resolve().parents[2])


class _Reader:
    """Collects a pipe's text in the background; `wait_for` a pattern with a deadline."""

    def __init__(self, pipe) -> None:
        self.text, self._pipe = "", pipe
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            c = self._pipe.read(1)
            if not c:
                return
            self.text += c

    def wait_for(self, pattern: str, start: int, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern).search(self.text, start)
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} did not appear within {timeout} s; output so far:\n{self.text[start:]}")


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_keeps_the_conversation_then_quits(tiny_ckpt, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(img)
    opts = dict(mode="no-think", max_tokens=60, temperature=0.0)
    with r4b_edge.load(tiny_ckpt) as ref:  # what the kept conversation's third question must see
        conv = ref.conversation(str(img))
        conv.ask("first?", **opts)
        want_prompt = conv.ask("third?", **opts).stats.prompt_tokens
        long_answer = ref.chat(str(img), "second?", mode="no-think", max_tokens=400).stats.answer_tokens
    assert long_answer > 40, "fixture sanity: the interrupted answer would run for a while"

    env = {**os.environ, "R4B_TEST_DELAY": "0.05", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, SLOW_CLI, "chat", str(img), "--model", str(tiny_ckpt), "--mode", "no-think",
                          "--max-tokens", "60", "--verbose"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out = _Reader(p.stdout)
    try:
        pos = out.wait_for(r">>> ", 0, 60).end()
        p.stdin.write("first?\n")
        p.stdin.flush()
        pos = out.wait_for(r">>> ", out.wait_for(r"prompt \d+ tok", pos, 60).end(), 60).end()
        p.stdin.write("second?\n")
        p.stdin.flush()
        pos = out.wait_for(r"answering directly", pos, 30).end()
        time.sleep(0.5)  # some tokens are out; the whole answer would take ~3 s more
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        pos = out.wait_for(r"\[stopped\]\n>>> ", pos, 10).end()
        assert time.monotonic() - t0 < 2.0
        assert p.poll() is None, "the REPL must survive Ctrl-C during an answer"
        p.stdin.write("third?\n")
        p.stdin.flush()
        m = out.wait_for(r"prompt (\d+) tok", pos, 60)
        assert int(m.group(1)) == want_prompt  # the first turn is kept, the stopped one is not
        pos = out.wait_for(r">>> ", m.end(), 60).end()
        p.send_signal(signal.SIGINT)  # at the prompt: quit
        rc = p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def _repl(args: list[str], lines: str, monkeypatch, capsys) -> str:
    """Run the REPL in this process on `lines` as stdin (its end is Ctrl-D); returns stdout."""
    import io

    from r4b_edge.apps.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", *args]) == 0
    return capsys.readouterr().out


def _decisions(out: str) -> int:
    return len(re.findall(r"\[(forced, )?(thinking|answering directly)", out))


def test_repl_commands_are_not_questions(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """/help, /stats, /reset, /exit work; an unknown /word is refused; an empty line re-prompts;
    none of them reaches the model."""
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(img)
    base = [str(img), "--model", str(tiny_ckpt), "--max-tokens", "4", "--mode", "no-think"]
    out = _repl(base, "/help\n/stats\n/foo\n/reset now\n\nq?\n/stats\n/reset\nq?\n/stats\n/quit\nnever?\n",
                monkeypatch, capsys)
    assert _decisions(out) == 2  # the two questions, nothing else; not `never?` after /quit
    assert "/help for commands" in out and "empty line" not in out.split("\n")[0]  # the banner
    for cmd in ("/reset", "/stats", "/exit", "/quit"):
        assert cmd in out.split(">>> ")[1], f"/help does not list {cmd}"
    assert "no stats: no reply has finished yet" in out
    assert "unknown command /foo: type /help" in out
    assert "/reset takes no argument" in out
    assert out.count("[conversation reset: the next question starts a new chat about ") == 1
    stats = re.findall(r"prompt (\d+) tok .* tok/s", out)
    assert len(stats) == 2 and stats[0] == stats[1]  # /reset emptied the conversation
    # without /reset the second question sees the first turn; Ctrl-D (end of input) quits
    out = _repl(base, "q?\n/stats\nq?\n/stats\n", monkeypatch, capsys)
    stats = re.findall(r"prompt (\d+) tok .* tok/s", out)
    assert _decisions(out) == 2 and int(stats[1]) > int(stats[0])
    out = _repl(base, "/exit\nq?\n", monkeypatch, capsys)
    assert _decisions(out) == 0
