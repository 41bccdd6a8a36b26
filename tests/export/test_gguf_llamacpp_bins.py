"""The `llama-mtmd-cli` and `llama-server` command lines of docs/gguf.md, run verbatim (binary
path aside) on the bundled model's Q4_K_M pair, answer as r4b-edge's llama backend does on the
same files (llama-server: the same reasoning and answer, split at `</think>` or into
`reasoning_content`); llama-server is driven with the official openai client, `thinking_mode`
passed per request through `chat_template_kwargs`.

Needs llama.cpp binaries: R4B_LLAMA_CPP_BIN=<folder with llama-mtmd-cli and llama-server>, or
both on PATH. Skipped without them (llama-cpp-python ships neither).
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import r4b_edge

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(r4b_edge.__file__).resolve().parent / "assets"
BIN = os.environ.get("R4B_LLAMA_CPP_BIN")


def _bin(name: str) -> str | None:
    if BIN and (Path(BIN) / name).is_file():
        return str(Path(BIN) / name)
    return shutil.which(name)


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (_bin("llama-mtmd-cli") and _bin("llama-server")),
                                 reason="no llama.cpp binaries (set R4B_LLAMA_CPP_BIN)"),
              pytest.mark.skipif(not (ASSETS / "model" / "config.json").exists(), reason="no bundled model")]
QUESTION = "What is the sum of all the digits?"


def doc_lines(program: str) -> list[str]:
    """The `program ...` command lines of docs/gguf.md's bash blocks, continuations joined."""
    text = (ROOT / "docs" / "gguf.md").read_text(encoding="utf-8").replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith(program + " ")]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cwd for the doc lines: out/gguf-q4 (the README's export) and photo.png (the example)."""
    from r4b_edge.export.gguf import export_gguf

    d = tmp_path_factory.mktemp("llamacpp-bins")
    export_gguf(ASSETS / "model", d / "out" / "gguf-q4", quant="Q4_K_M")
    shutil.copy(ASSETS / "example.png", d / "photo.png")
    return d


@pytest.fixture(scope="module")
def ours(work: Path):
    return r4b_edge.load(work / "out" / "gguf-q4", backend="llama", device="cpu")


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent)] + ([BIN] if BIN else []) + [env["PATH"]])
    return env


def _answer(text: str) -> str:
    return text.split("</think>")[-1].strip()


def test_mtmd_cli_lines(work: Path, ours) -> None:
    lines = doc_lines("llama-mtmd-cli")
    # auto, the short-default template, and auto with repacking off (docs/gguf.md's AMX section)
    assert len(lines) == 3 and " -nr " in lines[2]
    for line, mode in zip(lines, ["auto", "no-think", "auto"]):
        for _ in range(3):  # llama-mtmd-cli prints through its log thread; a run may exit before the flush
            p = subprocess.run(["bash", "-c", line.replace("llama-mtmd-cli", _bin("llama-mtmd-cli"), 1) + " -n 256"],
                               cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr[-2000:]
            if p.stdout.strip():
                break
        want = ours.chat(work / "photo.png", QUESTION, mode=mode, max_tokens=256).answer.strip()
        assert _answer(p.stdout) == want, (mode, p.stdout[-500:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llama_server_line_with_openai_client(work: Path, ours) -> None:
    openai = pytest.importorskip("openai")
    line, no_repack = doc_lines("llama-server")  # the second: the AMX section's, repacking off
    assert " -nr " in no_repack
    port = _free_port()
    cmd = line.replace("llama-server", _bin("llama-server"), 1).replace("--port 8080", f"--port {port}")
    proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=work, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        uri = "data:image/png;base64," + base64.b64encode((work / "photo.png").read_bytes()).decode()
        for tmode, mode in [("auto", "auto"), ("long", "think"), ("short", "no-think")]:
            r = client.chat.completions.create(
                model="r4b", temperature=0, max_tokens=256,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                       {"type": "text", "text": QUESTION}]}],
                extra_body={"chat_template_kwargs": {"thinking_mode": tmode}})
            # `</think>` is a plain added token (as in Qwen3), so the reply splits into reasoning and
            # answer: in `reasoning_content` / `content` where llama-server's reasoning parser
            # separates them, else at the `</think>` it keeps in `content`.
            msg = r.choices[0].message
            content = msg.content or ""
            reasoning = getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")
            ours_r = ours.chat(work / "photo.png", QUESTION, mode=mode, max_tokens=256)
            if reasoning:
                assert "</think>" not in content, (tmode, msg)
            elif tmode != "short":
                assert content.count("</think>") == 1, (tmode, msg)
                reasoning, content = content.split("</think>")
            assert (reasoning or "").strip() == ours_r.reasoning and content.strip() == ours_r.answer, (tmode, msg)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
