"""`r4b-edge chat` and `r4b-edge info`: output, flags, one-line errors."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from r4b_edge.apps.cli import main


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(p)
    return p


def test_chat_one_shot_json(tiny_ckpt, png, capsys):
    rc = main(["chat", str(png), "what?", "--model", str(tiny_ckpt), "--max-tokens", "6", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) >= {"answer", "reasoning", "thought", "p_think", "stats"}
    assert r["stats"]["image_tokens"] > 0


def test_chat_stream_shows_decision_and_stats(tiny_ckpt, png, capsys):
    rc = main(["chat", str(png), "what?", "--model", str(tiny_ckpt), "--max-tokens", "6", "--mode", "think",
               "--verbose"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[forced, thinking…]" in out  # p_think is not measured in a forced mode
    assert "tok/s" in out and "peak RSS" in out


def test_threads_flag_reaches_the_backend(tiny_ckpt, png, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rc = main(["chat", str(png), "q", "--model", str(tiny_ckpt), "--max-tokens", "3", "--threads", "1", "--json"])
        assert rc == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    for verb in ("chat", "serve", "app", "bench"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--threads" in capsys.readouterr().out, verb


def test_chat_no_think(tiny_ckpt, png, capsys):
    assert main(["chat", str(png), "q", "--model", str(tiny_ckpt), "--max-tokens", "4", "--mode", "no-think"]) == 0
    assert "answering directly" in capsys.readouterr().out


def test_chat_hide_thinking_hides_the_reasoning(tiny_ckpt, png, capsys):
    args = ["chat", str(png), "q", "--model", str(tiny_ckpt), "--max-tokens", "8", "--mode", "think"]
    assert main(args + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    reasoning = r["reasoning"].strip()
    assert reasoning  # forced thinking: there is reasoning to hide
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert main(args + ["--hide-thinking"]) == 0
    hidden = capsys.readouterr().out
    assert reasoning in shown and reasoning not in hidden
    assert "[forced, thinking…" in hidden and r["answer"] in hidden


def test_repl_multi_turn(tiny_ckpt, png):
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "chat", str(png), "--model", str(tiny_ckpt),
                        "--max-tokens", "4"], input="first?\nsecond?\n", capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(">>> ") == 3  # two questions, then end of input (Ctrl-D) quits
    assert p.stdout.count("p_think=") == 2


def test_repl_fresh_answers_each_question_alone(tiny_ckpt, png):
    def session(questions: str, *flags: str) -> list[str]:
        p = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "chat", str(png), "--model", str(tiny_ckpt),
                            "--max-tokens", "6", *flags], input=questions, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.split(">>> ")[1:-1]  # one reply per question

    alone = session("second?\n")
    assert "(--fresh)" in subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "chat", str(png), "--model",
                                          str(tiny_ckpt), "--fresh"], input="", capture_output=True,
                                         text=True, timeout=120).stdout
    fresh = session("first?\nsecond?\n", "--fresh")
    assert len(fresh) == 2 and fresh[1] == alone[0]  # greedy: the same reply as a one-question session
    kept = session("first?\nsecond?\n")
    assert len(kept) == 2 and kept[0] == fresh[0] and kept[1] != alone[0]  # history changes the reply


@pytest.mark.parametrize("argv,needle", [
    (["chat", "missing.png", "q"], "missing.png"),
    (["chat", "{png}", "q", "--think-threshold", "1.5"], "within [0, 1]"),
    (["chat", "{png}", "q", "--model", "/nonexistent/model"], "does not exist"),
])
def test_errors_are_one_line_no_traceback(tiny_ckpt, png, argv, needle):
    argv = [a.replace("{png}", str(png)) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_ckpt)]
    p = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", *argv], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_unknown_mode_is_a_usage_error(png, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", str(png), "q", "--mode", "sometimes"])
    assert e.value.code == 2


def test_info(tiny_ckpt, capsys):
    assert main(["info", "--model", str(tiny_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["format"] == "torch" and info["model"]["size_mb"] > 0
    assert info["backends"]["torch"]["installed"] is True
    assert "cpu" in info["backends"]["torch"]["devices"]


def test_chat_stop_repeatable(tiny_ckpt, png, capsys):
    base = ["chat", str(png), "what?", "--model", str(tiny_ckpt), "--max-tokens", "16", "--mode", "no-think", "--json"]
    assert main(base) == 0
    full = json.loads(capsys.readouterr().out)["answer"]
    assert len(full) >= 6, f"fixture: the tiny model writes a few characters ({full!r})"
    stop = full[3:5]
    want = full[:full.find(stop)].rstrip()
    assert main(base + ["--stop", "never\\there", "--stop", stop]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["answer"] == want and r["stop_sequence"] == stop and r["stats"]["finish_reason"] == "stop"


def test_unescape_stop_text():
    from r4b_edge.apps.common import unescape

    assert unescape(r"a\nb\tc\\n\r") == "a\nb\tc\\n\r"


def test_chat_bomb_hint_names_the_flag(tiny_ckpt, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    rc = main(["chat", str(big), "what?", "--model", str(tiny_ckpt), "--max-image-pixels", "10000"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "60000 pixels" in err and "--max-image-pixels 60000" in err and "load_image" not in err
    rc = main(["chat", str(big), "what?", "--model", str(tiny_ckpt), "--max-image-pixels", "60000",
               "--max-tokens", "2"])
    assert rc == 0


def test_chat_deadline_prints_the_plan(tiny_ckpt, png, capsys):
    rc = main(["chat", str(png), "what?", "--model", str(tiny_ckpt), "--max-tokens", "6", "--deadline", "30000"])
    out = capsys.readouterr().out
    assert rc == 0 and "[deadline 30000 ms: " in out and "tok/s" in out


def test_every_verb_registers_and_a_broken_verb_import_is_raised(monkeypatch):
    from r4b_edge.apps import cli

    verbs = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert verbs == set(cli.VERBS)
    monkeypatch.setitem(cli.VERBS, "broken", "r4b_edge.apps.no_such_verb_module")
    with pytest.raises(ModuleNotFoundError, match="no_such_verb_module"):
        cli.build_parser()


def _bad_image(d, kind: str):
    if kind == "missing":
        return d / "missing.png"
    if kind == "directory":
        return d
    p = d / f"{kind}.png"
    p.write_bytes(b"" if kind == "empty" else b"just some text")
    return p


@pytest.mark.parametrize("kind,needle", [("missing", "image file not found"), ("empty", "file is empty"),
                                         ("text", "not an image in an accepted format"),
                                         ("directory", "is a directory")])
@pytest.mark.parametrize("prompt", [["what?"], []], ids=["one-shot", "repl"])
def test_chat_checks_the_image_before_the_model_loads(tmp_path, monkeypatch, capsys, kind, needle, prompt):
    """A bad image is reported at once: the model (seconds to load) is never loaded."""
    import r4b_edge

    loads = []
    monkeypatch.setattr(r4b_edge, "load", lambda *a, **k: loads.append(a) or pytest.fail("the model was loaded"))
    path = _bad_image(tmp_path, kind)
    rc = main(["chat", str(path), *prompt])
    err = capsys.readouterr().err
    assert rc == 1 and loads == []
    assert needle in err and str(path) in err and err.count("\n") == 1


def test_decision_line_says_p_think_both_ways():
    """One wording whether the model thinks or answers directly (the app's badge uses the same)."""
    import argparse
    import io

    from r4b_edge import Decision
    from r4b_edge.apps.chat import _render

    out = io.StringIO()
    _render([Decision(True, 0.934, False), Decision(False, 0.041, False), Decision(False, None, True),
             Decision(True, 0.5, True)], argparse.Namespace(hide_thinking=False, verbose=False), out)
    assert out.getvalue().splitlines() == ["[thinking… p_think=0.93]", "[answering directly… p_think=0.04]",
                                           "[forced, answering directly…]", "[forced, thinking… p_think=0.50]"]


def test_chat_help_names_every_accepted_format(capsys):
    from r4b_edge.model.processing import IMAGE_FORMATS_TEXT

    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert IMAGE_FORMATS_TEXT in " ".join(capsys.readouterr().out.split())


def test_generation_flag_defaults_are_the_engines():
    from r4b_edge.apps.cli import build_parser
    from r4b_edge.engine.options import GenerationOptions

    want = GenerationOptions()
    for argv in (["chat", "x.png"], ["app"]):
        args = build_parser().parse_args(argv)
        assert args.max_tokens == want.max_tokens, argv
    args = build_parser().parse_args(["chat", "x.png"])
    assert (args.temperature, args.top_p, args.top_k) == (want.temperature, want.top_p, want.top_k)


@pytest.mark.slow
def test_fresh_process_deadline_thinks_on_its_first_call():
    """`chat --deadline 400` in a fresh process (nothing served yet) plans from the bundled model's own
    reply lengths and this device's pace: it thinks (~45 tokens; 150-200 ms in all here) and answers
    18. Planned from 64-token priors it expected 328 ms for a direct answer, refused to think and
    answered 8 in every fresh process. Each try is a new process; a shared machine busy at that
    moment may leave no room to think, so one of three in a row must think."""
    pytest.importorskip("torch")
    from r4b_edge.api import ASSETS

    cmd = [sys.executable, "-m", "r4b_edge.apps.cli", "chat", str(ASSETS / "example.png"),
           "What is the sum of all the digits?", "--deadline", "400", "--backend", "torch"]
    seen = []
    for _ in range(3):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        if "thinking" in lines[0] and lines[-1] == "18":  # "[forced, thinking… p_think=1.00]": the plan chose
            return
        seen.append("\n".join(lines[:2] + lines[-1:]))
    pytest.fail("no fresh process thought and answered 18 at --deadline 400:\n" + "\n---\n".join(seen))


# ---- --image-tokens, --n-ctx, --dtype (issue 28) ---------------------------------------------------
@pytest.mark.parametrize("verb,argv", [("chat", ["{png}", "q"]), ("serve", ["--port", "0"])])
def test_load_flags_reach_load(monkeypatch, png, capsys, verb, argv):
    import r4b_edge
    from r4b_edge.errors import R4BError

    seen: list[dict] = []

    def fake_load(path=None, backend="auto", device="auto", **kw):
        seen.append(kw)
        raise R4BError("stopped before loading")

    monkeypatch.setattr(r4b_edge, "load", fake_load)
    argv = [verb] + [a.replace("{png}", str(png)) for a in argv]
    assert main(argv) == 1
    assert main(argv + ["--image-tokens", "2560", "--n-ctx", "4096", "--dtype", "bf16"]) == 1
    assert main(argv + ["--image-tokens", "full", "--dtype", "float16"]) == 1
    assert seen == [{"threads": None, "image_tokens": "auto"},
                    {"threads": None, "image_tokens": 2560, "n_ctx": 4096, "dtype": "bfloat16"},
                    {"threads": None, "image_tokens": None, "dtype": "float16"}]
    assert "stopped before loading" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,needle", [
    ("--image-tokens", "0", "--image-tokens must be a whole number >= 1 (a positions budget), 'auto' or 'full'"),
    ("--image-tokens", "lots", "got 'lots'"),
    ("--dtype", "int8", "dtype (--dtype) must be auto, bf16, fp16 or fp32"),
    ("--n-ctx", "many", "invalid int value"),
])
@pytest.mark.parametrize("verb", ["chat", "serve", "app", "bench"])
def test_bad_load_flags_are_usage_errors(png, capsys, verb, flag, value, needle):
    argv = [verb] + ([str(png), "q"] if verb == "chat" else [])
    with pytest.raises(SystemExit) as e:
        main(argv + [flag, value])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_n_ctx_zero_is_a_one_line_error(tiny_ckpt, png, capsys):
    assert main(["chat", str(png), "q", "--model", str(tiny_ckpt), "--n-ctx", "0"]) == 1
    assert "n_ctx (--n-ctx) must be a whole number of positions >= 1" in capsys.readouterr().err


def test_verbose_prints_the_settings_and_the_grid(tiny_ckpt, png, capsys):
    rc = main(["chat", str(png), "q", "--model", str(tiny_ckpt), "--max-tokens", "3", "--verbose",
               "--image-tokens", "20", "--n-ctx", "1000", "--dtype", "fp32", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[model: torch/cpu, fp32 (asked), n_ctx 1000, 1 thread(s)]" in out
    assert "[image tokens: 20 -> budget 20 positions]" in out
    assert re.search(r"\[image 40x20 -> (grid \dx\d \+ base view|base view only), \d+ positions \(budget 20\)\]", out)
    rc = main(["chat", str(png), "q", "--model", str(tiny_ckpt), "--max-tokens", "3", "--verbose", "--threads", "1"])
    out = capsys.readouterr().out
    assert "[image tokens: auto -> budget 640 positions]" in out and "(budget 640)]" in out


def test_info_shows_the_auto_budget_and_dtype(tiny_ckpt, capsys):
    assert main(["info", "--model", str(tiny_ckpt), "--json", "--threads", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    it = info["image_tokens"]
    assert it["threads"] == 2 and it["cpu_budget"] == 1280 and "640 positions per thread" in it["rule"]
    assert it["photo_full"]["views"] == 5 and it["photo_cpu"]["positions"] <= 1280  # the tiny model's 2x2 grid
    td = info["torch_dtype"]
    assert td["device"] == "cpu" and td["auto"] in ("fp32", "bf16")
    assert "CPU bf16 matmul at hidden 64, 2 thread(s)" in td["why"]
    assert main(["info", "--model", str(tiny_ckpt), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "on a CPU 640 positions per thread; here on the CPU with 1 thread(s): 640 positions" in out
    assert "a 1920x1080 photo: grid 2x2 + base view, 5 view(s)" in out and "torch --dtype auto here:" in out
