"""benchmarks/card/remake.py: the step list, --quick sizes, argument checks, failing loudly, --apply."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from r4b_edge.benchmarks.card import remake
from r4b_edge.errors import R4BError


def _argv(steps: list[remake.Step], name: str) -> list[str]:
    return next(s for s in steps if s.name == name).argv


def test_default_steps_in_order_with_their_outputs(tmp_path: Path) -> None:
    model = tmp_path / "m"
    steps = remake.build_steps(model, tmp_path / "out", tmp_path / "work")
    assert [s.name for s in steps] == list(remake.DEFAULT_STEPS)
    assert "deadline-sweep" not in [s.name for s in steps]  # opt-in only
    for s in steps:
        assert s.outputs and all(str(p).startswith(str(tmp_path / "out")) for p in s.outputs), s.name
        assert (s.argv is None) != (s.fn is None), s.name
        if s.argv is not None:
            assert str(model) in s.argv and s.argv[0] == sys.executable, s.name
    assert _argv(steps, "quant-gguf")[_argv(steps, "quant-gguf").index("--per-family") + 1] == "25"
    bench = _argv(steps, "bench")
    assert "--quick" not in bench and bench[bench.index("--eval-per-family") + 1] == "8"
    assert bench[bench.index("--threads") + 1] == "1"
    shot = next(s for s in steps if s.name == "screenshot")
    assert shot.env == {"QT_QPA_PLATFORM": "offscreen"} and "--screenshot" in shot.argv


def test_quick_shrinks_counts_and_subsets_keep_the_fixed_order(tmp_path: Path) -> None:
    steps = remake.build_steps(tmp_path / "m", tmp_path / "o", tmp_path / "w", quick=True,
                               names=["bench", "quant-gguf", "deadline-sweep"], threads=3)
    assert [s.name for s in steps] == ["quant-gguf", "bench", "deadline-sweep"]
    q = _argv(steps, "quant-gguf")
    assert q[q.index("--per-family") + 1] == "1"
    b = _argv(steps, "bench")
    assert "--quick" in b and b[b.index("--threads") + 1] == "3"


@pytest.mark.parametrize("kw, words", [({"names": ["quant-gguf", "nope"]}, ["nope", "quant-gguf"]),
                                       ({"threads": 0}, ["--threads", "0"])])
def test_bad_arguments_raise_with_the_values(tmp_path: Path, kw: dict, words: list[str]) -> None:
    with pytest.raises(remake.RemakeError) as e:
        remake.build_steps(tmp_path / "m", tmp_path / "o", tmp_path / "w", **kw)
    assert isinstance(e.value, R4BError) and all(w in str(e.value) for w in words)


def test_main_checks_model_out_and_apply(tmp_path: Path) -> None:
    with pytest.raises(remake.RemakeError, match="no config.json"):
        remake.main(["--model", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(remake.RemakeError, match="--out is required"):
        remake.main(["--model", str(tmp_path)])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(remake.RemakeError, match="is a file"):
        remake.main(["--model", str(tmp_path), "--out", str(tmp_path / "afile")])
    with pytest.raises(remake.RemakeError, match="--quick"):
        remake.main(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--quick", "--apply", str(tmp_path)])


def test_list_prints_every_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert remake.main(["--model", str(tmp_path), "--list", "--quick"]) == 0
    out = capsys.readouterr().out
    for name in remake.DEFAULT_STEPS:
        assert f"{name}: " in out
    assert "python -m r4b_edge.benchmarks.card.quant_eval" in out and "QT_QPA_PLATFORM=offscreen" in out


def test_run_steps_records_times_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    made = tmp_path / "made.txt"
    ok = remake.Step("ok", "writes a file", [sys.executable, "-c", f"open({str(made)!r}, 'w').write('1')"],
                     outputs=[made])
    bad = remake.Step("bad", "exits 3", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    never = remake.Step("never", "not reached", [sys.executable, "-c", "pass"])
    lines: list[str] = []
    with pytest.raises(remake.RemakeError) as e:
        remake.run_steps([ok, bad, never], tmp_path, log=lines.append)
    assert "step bad" in str(e.value) and "exit status 3" in str(e.value) and "boom" in str(e.value)
    rec = json.loads((tmp_path / "remake.json").read_text())
    assert [s["name"] for s in rec["steps"]] == ["ok", "bad"]
    assert rec["steps"][0]["rc"] == 0 and rec["steps"][0]["wall_s"] >= 0 and rec["steps"][1]["rc"] == 3
    assert (tmp_path / "logs" / "bad.log").read_text().strip() == "boom"
    assert any(line.startswith("[remake] ok: ok in") for line in lines)


def test_a_step_that_leaves_no_output_fails(tmp_path: Path) -> None:
    st = remake.Step("silent", "writes nothing", [sys.executable, "-c", "pass"], outputs=[tmp_path / "x.md"])
    with pytest.raises(remake.RemakeError, match="left no .*x.md"):
        remake.run_steps([st], tmp_path, log=lambda m: None)


def test_card_sections_join_the_three_tables(tmp_path: Path) -> None:
    with pytest.raises(remake.RemakeError, match="QUANT_GGUF.md"):
        remake.card_sections(tmp_path)
    for rel, text in (("gguf/QUANT_GGUF.md", "## GGUF quantizations\n| a |"), ("gguf/PARITY_GGUF.md", "| pair |"),
                      ("onnx/QUANT_ONNX.md", "## ONNX precisions\n| b |")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    body = remake.card_sections(tmp_path).read_text()
    assert body.index("## GGUF quantizations") < body.index("| pair |") < body.index("## ONNX precisions")


def test_apply_refuses_quick_runs_and_copies_finished_steps(tmp_path: Path) -> None:
    out, repo = tmp_path / "out", tmp_path / "repo"
    out.mkdir()
    with pytest.raises(remake.RemakeError, match="remake.json missing"):
        remake.apply(out, repo)
    (out / "remake.json").write_text(json.dumps({"quick": True, "steps": []}))
    with pytest.raises(remake.RemakeError, match="--quick"):
        remake.apply(out, repo)
    (out / "img").mkdir()
    (out / "img" / "app.png").write_bytes(b"png")
    (out / "remake.json").write_text(json.dumps({"quick": False, "steps": [
        {"name": "screenshot", "rc": 0, "missing_outputs": []}, {"name": "bench", "rc": 1}]}))
    copied = remake.apply(out, repo, log=lambda m: None)
    assert copied == [repo / "docs" / "img" / "app.png"] and copied[0].read_bytes() == b"png"


def test_screenshot_of_the_bundled_model_leaves_the_model_field_at_its_default(tmp_path: Path) -> None:
    from r4b_edge.api import BUNDLED_MODEL

    shot = remake.build_steps(BUNDLED_MODEL, tmp_path, tmp_path / "w", names=["screenshot", "examples"])
    assert "--model" not in shot[0].argv and str(BUNDLED_MODEL) in shot[1].argv
