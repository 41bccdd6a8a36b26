"""Every `r4b-edge ...` command line in README.md and docs/*.md parses against the real CLI
parser, and the cheap ones (info, one-shot chat, export of the bundled model, and the chats
that use those exports) run, in document order, with the bundled model.

Command lines are taken from fenced code blocks (every line that runs `r4b-edge`, after `$ `,
`.venv/bin/` or `&&`; `\\` continuations joined; `# comments` dropped) and from inline code
spans that start with `r4b-edge ` and hold no placeholder (`...`, `|`, `[`).
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

import r4b_edge
from r4b_edge.apps.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BUNDLED = Path(r4b_edge.__file__).resolve().parent / "assets" / "model"
EXAMPLE = Path(r4b_edge.__file__).resolve().parent / "assets" / "example.png"
# Verbs a test runs for real; the others (serve, app, train, eval, bench, ...) only parse.
RUN_VERBS = {"info", "chat", "export"}
# Files the doc lines name that the test provides: the example image under the names the docs use.
IMAGES = ("photo.png", "r4b_edge/assets/example.png")


def _shell_words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars="&;|")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _commands_in(line: str) -> list[list[str]]:
    """The r4b-edge invocations of one shell line (split on && ; |)."""
    out, cur = [], []
    for w in _shell_words(line) + ["&&"]:
        if w in ("&&", ";", "|", "||"):
            if cur:
                prog = cur[0].rsplit("/", 1)[-1]
                if prog == "r4b-edge":
                    out.append(cur[1:])
            cur = []
        elif not cur and w == "$":
            continue
        else:
            cur.append(w)
    return out


def extract(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after `r4b-edge`) for each command line in a markdown file.
    A bare `r4b-edge VERB` span in prose names the verb; it is kept as [VERB, "--help"]."""
    found: list[tuple[int, list[str]]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced, pending, start = False, "", 0
    for n, raw in enumerate(lines, 1):
        if raw.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if fenced:
            if "r4b-edge" not in raw and not pending:
                continue
            text = (pending + " " + raw.strip()) if pending else raw.strip()
            start = start if pending else n
            if text.endswith("\\"):
                pending = text[:-1]
                continue
            pending = ""
            found += [(start, argv) for argv in _commands_in(text)]
        else:
            for span in re.findall(r"`(r4b-edge [^`]+)`", raw):
                if not any(p in span for p in ("...", "|", "[", "STAGE")):
                    argv = shlex.split(span)[1:]
                    found.append((n, argv + ["--help"] if len(argv) == 1 and argv[0] != "info" else argv))
    return found


ALL = [(p, n, argv) for p in DOCS for n, argv in extract(p)]


def _id(item) -> str:
    p, n, argv = item
    return f"{p.name}:{n}:{' '.join(argv[:2])}"


def test_extraction_finds_the_known_lines() -> None:
    """The extractor sees the README quick start, the GGUF/ONNX docs and inline spans."""
    got = {(p.name, " ".join(a)) for p, _, a in ALL}
    assert ("README.md", 'chat r4b_edge/assets/example.png What is the sum of all the digits?') in got
    assert ("README.md", "info") in got
    assert ("README.md", "chat --help") in got  # a bare verb named in prose
    assert any(name == "onnx.md" and a.startswith("export --format onnx") for name, a in got)
    assert any(name == "README.md" and a.startswith("bench --roofline") for name, a in got)  # inline span
    assert len(ALL) >= 30


@pytest.mark.parametrize("item", ALL, ids=[_id(i) for i in ALL])
def test_every_documented_command_parses(item) -> None:
    path, n, argv = item
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports the bad flag on stderr; --help exits 0
        if e.code == 0 and argv[-1] == "--help":
            return
        pytest.fail(f"{path.name}:{n}: `r4b-edge {shlex.join(argv)}` does not parse (exit {e.code})")
    assert getattr(args, "func", None), f"{path.name}:{n}: no verb in `r4b-edge {shlex.join(argv)}`"


def test_model_paths_come_from_an_export_earlier_in_the_same_doc() -> None:
    """A `--model out/...` line (any verb) loads what an `export --out` line above it in the same
    file writes, so the doc can be followed top to bottom (the slow test below checks the file
    names by running the exports)."""
    for path in DOCS:
        outs: list[str] = []
        for n, argv in extract(path):
            if argv[:1] == ["export"] and "--out" in argv:
                outs.append(argv[argv.index("--out") + 1].rstrip("/"))
            model = _model_arg(argv)
            if model and model.startswith("out/"):
                assert any(model == o or model.startswith(o + "/") for o in outs), (
                    f"{path.name}:{n}: `--model {model}` is not under the --out of an export above it "
                    f"(exports so far: {outs or 'none'})")


def test_docs_install_from_the_clone() -> None:
    """The README installs with `pip install -e '.[extra]'` in the clone; no doc tells the reader to
    install a package named r4b-edge from an index."""
    bad = re.compile(r"pip install (-\S+ )*['\"]?r4b-edge")
    for path in DOCS:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not bad.search(line), f"{path.name}:{n}: {line.strip()}  (write pip install -e '.[...]')"


def _model_arg(argv: list[str]) -> str | None:
    return argv[argv.index("--model") + 1] if "--model" in argv[:-1] else None


def _runnable(argv: list[str]) -> bool:
    """A verb we run, on files this test provides (no placeholder paths), and not the REPL."""
    if not argv or argv[0] not in RUN_VERBS or "--help" in argv or any("path/to" in a for a in argv):
        return False
    if argv[0] == "chat":
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # test_every_documented_command_parses names it
            return False
        return args.prompt is not None  # one-shot only
    return True


def _slow(argv: list[str]) -> bool:
    return argv[0] == "export" or "--model" in argv


RUNS = {p: [(n, a) for n, a in extract(p) if _runnable(a)] for p in DOCS}
CHEAP = [(p, n, a) for p, items in RUNS.items() for n, a in items if not _slow(a)]
SLOW_DOCS = [p for p, items in RUNS.items() if any(_slow(a) for _, a in items)]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cwd holding the images the docs name; `out/` starts empty."""
    for name in IMAGES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE, tmp_path / name)
    shutil.copytree(EXAMPLE.parent / "examples", tmp_path / "r4b_edge" / "assets" / "examples")  # the pair
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("R4B_THREADS", "1")
    return tmp_path


def _run(path: Path, n: int, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    extra = ["--max-tokens", "24"] if argv[0] == "chat" and "--max-tokens" not in argv else []
    rc = main(argv + extra)
    out, err = capsys.readouterr()
    assert rc == 0, f"{path.name}:{n}: `r4b-edge {shlex.join(argv)}` exited {rc}: {err.strip()[-400:]}"
    return out


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="no bundled model")
@pytest.mark.parametrize("item", CHEAP, ids=[_id(i) for i in CHEAP])
def test_cheap_commands_run(item, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    path, n, argv = item
    out = _run(path, n, argv, capsys)
    assert out.strip(), f"{path.name}:{n}: `r4b-edge {shlex.join(argv)}` printed nothing"


@pytest.mark.slow
@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="no bundled model")
@pytest.mark.parametrize("path", SLOW_DOCS, ids=[p.name for p in SLOW_DOCS])
def test_export_and_model_commands_run_in_document_order(path: Path, workdir: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Exports write what the doc's later `--model out/...` lines load."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    for n, argv in RUNS[path]:
        if _slow(argv):
            if argv[0] == "export" and tuple(argv) in _EXPORTED:  # the same export in an earlier doc
                out = argv[argv.index("--out") + 1]
                shutil.copytree(_EXPORTED[tuple(argv)] / out, workdir / out)
                continue
            _run(path, n, argv, capsys)
            if argv[0] == "export":
                _EXPORTED[tuple(argv)] = workdir
    exported = [a[a.index("--out") + 1] for _, a in RUNS[path] if a[0] == "export" and "--out" in a]
    for d in exported:
        assert any((workdir / d).iterdir()), f"{path.name}: export to {d} wrote nothing"
    for n, argv in extract(path):  # serve / app lines too, which this test only parses
        model = _model_arg(argv)
        if model and model.startswith("out/"):
            assert (workdir / model).exists(), f"{path.name}:{n}: the exports above do not write {model}"


#: export argv -> the workdir an earlier doc's test exported it into (the same line in several docs runs once)
_EXPORTED: dict[tuple[str, ...], Path] = {}


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="no bundled model")
def test_serve_snippet_runs_and_keeps_reasoning_and_answer_apart(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """docs/serve.md's openai-client snippet, run as written against a live server on the bundled model
    (only its address changes): the streamed reasoning and answer print apart, as the API returns them."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from r4b_edge.apps.server.app import ServerThread, create_app

    doc = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- serve-snippet -->\s*```python\n(.*?)```", doc, re.S)
    assert m, "docs/serve.md has no marked openai-client snippet"
    code = m.group(1)
    assert "http://127.0.0.1:8000/v1" in code
    question = re.search(r'"text": "([^"]+)"', code).group(1)
    with r4b_edge.load() as model, ServerThread(create_app(model)) as server:
        want = model.chat("photo.png", question, mode="think", max_tokens=512)
        assert want.reasoning and want.answer, "fixture: the bundled model thinks, then answers"
        exec(compile(code.replace("http://127.0.0.1:8000/v1", server.url + "/v1"), "docs/serve.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.endswith(f"{want.reasoning}\n---\n{want.answer}\n"), out[-400:]
