"""Stock llama-cpp-python (`Llama` + `MTMDChatHandler`, no r4b-edge code in its path) and
r4b-edge's llama backend on one GGUF pair, greedy, side by side.

`replies(folder, image, question)` runs in the calling process (F16). A quantized pair runs in a
child, `python -m tests.export.stock_chat SRC OUT QUANT IMAGE QUESTION` (export, then both
chats; one JSON line out), so a native crash of llama.cpp's quantized kernels (the repacked
weights on some CPUs) fails one test with its message instead of killing pytest.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODES = {"auto": "auto", "long": "think", "short": "no-think"}  # template name -> r4b-edge API name
THINK_CLOSE = "</think>"


def _messages(image: Path, question: str) -> list[dict]:
    uri = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": question}]}]


def replies(folder: Path, image: Path, question: str, max_tokens: int = 256) -> dict[str, dict]:
    """template mode -> {"content", "finish_reason"} of stock llama-cpp-python (auto through
    `Llama.create_chat_completion`, the template's default; long and short through the chat
    handler with `thinking_mode`), and {"reasoning", "answer"} of r4b-edge on the same files."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    import r4b_edge

    folder = Path(folder)
    text = next(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))
    mmproj = next(folder.glob("mmproj*.gguf"))
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(model_path=str(text), chat_handler=handler, n_ctx=1024, n_threads=1, verbose=False)
    out: dict[str, dict] = {}
    greedy = {"max_tokens": max_tokens, "temperature": 0.0, "repeat_penalty": 1.0}
    try:
        for mode in MODES:
            messages = _messages(image, question)
            if mode == "auto":
                r = llm.create_chat_completion(messages=messages, **greedy)
            else:
                r = handler(llama=llm, messages=messages, thinking_mode=mode, **greedy)
            c = r["choices"][0]
            out[mode] = {"content": c["message"]["content"], "finish_reason": c["finish_reason"]}
    finally:
        llm.close()
    ours = r4b_edge.load(folder, backend="llama", device="cpu")
    try:
        for mode, api in MODES.items():
            res = ours.chat(image, question, mode=api, max_tokens=max_tokens)
            out[mode].update(reasoning=res.reasoning, answer=res.answer)
    finally:
        close = getattr(ours.backend, "close", None)
        if close:
            close()
    return out


def replies_in_child(src: Path, out: Path, quant: str, image: Path, question: str,
                     timeout: float = 420) -> dict[str, dict]:
    """Export `src` to `out` at `quant` and run `replies` there, in a child process."""
    p = subprocess.run([sys.executable, "-m", "tests.export.stock_chat", str(src), str(out), quant, str(image),
                        question], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"the stock llama-cpp-python child on the {quant} pair exited with {p.returncode} "
                             f"(a negative code is a signal: a native crash):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_split(mode: str, got: dict) -> None:
    """The stock reply's text keeps `</think>` (a plain added token, as in Qwen3), so a client
    splits it: the text before is r4b-edge's reasoning and the text after its answer. A short
    (no-think) reply has the empty think block in its prompt, so only the answer."""
    content = got["content"]
    assert got["finish_reason"] == "stop", got  # `<|im_end|>` still ends the reply
    if mode == "short":
        assert THINK_CLOSE not in content and content.strip() == got["answer"], got
        return
    assert content.count(THINK_CLOSE) == 1, f"{mode}: stock content {content!r} has no single </think>"
    reasoning, answer = content.split(THINK_CLOSE)
    assert answer.strip() == got["answer"], (mode, answer, got["answer"])
    assert reasoning.strip() == got["reasoning"], (mode, reasoning, got["reasoning"])
    assert "<think>" not in content  # the opening tag is the prompt's


def main(argv: list[str]) -> int:
    from r4b_edge.export.gguf import export_gguf

    src, out, quant, image, question = argv
    pair = export_gguf(src, out, quant=quant)
    print(json.dumps(replies(pair.out_dir, Path(image), question)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
