"""Stock llama-cpp-python (no r4b-edge code in its path) on r4b-edge's GGUF pair of the bundled model.

- Token ids: for a set of message lists and all three thinking modes, the ids stock
  `MTMDChatHandler` feeds the model (captured from `Llama.eval` and the image chunk positions)
  equal the ids r4b-edge's engine renders and tokenizes (`Engine._segments`, image slots
  expanded to the backend's image token count). Text-only chats also through llama-cpp-python's
  default handler (`Jinja2ChatFormatter` on the GGUF's template).
- Answers: greedy, the README example ("What is the sum of all the digits?" on example.png, 18)
  and held-out world questions get the same answers from stock llama-cpp-python as from
  r4b-edge's llama backend on the same files.
- Reply text: stock `create_chat_completion`'s content keeps `</think>` (a plain added token, as
  in Qwen3), so it splits into r4b-edge's reasoning and answer, on the F16 and the Q4_K_M pair
  (the quantized one in a child process: tests/export/stock_chat.py).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

import r4b_edge

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from llama_cpp import Llama  # noqa: E402
from llama_cpp.llama_chat_format import MTMDChatHandler  # noqa: E402

from r4b_edge.model.template import Message, render_prompt  # noqa: E402

from .stock_chat import THINK_CLOSE, check_split, replies, replies_in_child  # noqa: E402

ASSETS = Path(r4b_edge.__file__).resolve().parent / "assets"
BUNDLED, EXAMPLE = ASSETS / "model", ASSETS / "example.png"
pytestmark = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="no bundled model")
MODES = {"auto": "auto", "long": "think", "short": "no-think"}  # template name -> r4b-edge API name
README_Q = "What is the sum of all the digits?"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    from r4b_edge.export.gguf import export_gguf

    return export_gguf(BUNDLED, tmp_path_factory.mktemp("stock-gguf") / "f16", quant="F16")


@pytest.fixture(scope="module")
def stock(pair):
    """Stock llama-cpp-python: Llama + MTMDChatHandler, and a recorder of every Llama.eval."""
    handler = MTMDChatHandler(clip_model_path=str(pair.mmproj), verbose=False)
    llm = Llama(model_path=str(pair.text), chat_handler=handler, n_ctx=1024, n_threads=1, verbose=False)
    calls: list[tuple[int, list[int]]] = []
    real_eval = llm.eval

    def recording_eval(tokens):
        calls.append((llm.n_tokens, list(tokens)))
        return real_eval(tokens)

    llm.eval = recording_eval
    yield llm, handler, calls
    llm.close()


@pytest.fixture(scope="module")
def ours(pair):
    m = r4b_edge.load(pair.out_dir, backend="llama", device="cpu")
    yield m
    close = getattr(m.backend, "close", None)
    if close:
        close()


def _uri(image) -> str:
    if isinstance(image, Path):
        data = image.read_bytes()
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def stock_run(stock, messages: list, mode: str, max_tokens: int = 1) -> tuple[list[int], list[int], dict]:
    """Greedy stock chat completion. Returns the prompt as stock fed it (text ids at their
    positions, -1 where an image chunk went), the reply ids it fed back (every sampled token
    but the last, which ends the reply) and the response."""
    llm, handler, calls = stock
    calls.clear()
    r = handler(llama=llm, messages=messages, thinking_mode=mode, max_tokens=max_tokens, temperature=0.0,
                repeat_penalty=1.0)
    n = r["usage"]["prompt_tokens"]
    fed: dict[int, int] = {}
    for start, toks in calls:
        fed.update({start + i: t for i, t in enumerate(toks)})
    prompt = [fed.get(i, -1) for i in range(n)]
    reply = [fed[i] for i in range(n, n + r["usage"]["completion_tokens"]) if i in fed]
    return prompt, reply, r


def our_prompt_ids(model, msgs: list[Message], mode: str, images: list) -> list[int]:
    prepared = [model.prepare(i) for i in images]
    segs = model.engine._segments(render_prompt(msgs, mode), prepared)
    out: list[int] = []
    for s in segs:
        out += [-1] * model.backend.image_token_count(s) if not isinstance(s, list) else s
    return out


def _image_and_text(uri: str, q: str, image_first: bool = True) -> list:
    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": q}]
    return parts if image_first else parts[::-1]


def conversations(uri: str) -> dict[str, tuple[list, list[Message], int]]:
    """name -> (OpenAI-style messages, the same conversation as r4b-edge Messages, images)."""
    return {
        "image_then_text": ([{"role": "user", "content": _image_and_text(uri, README_Q)}],
                            [Message("user", README_Q, images=1)], 1),
        "text_then_image": ([{"role": "user", "content": _image_and_text(uri, README_Q, False)}],
                            [Message("user", README_Q, images=1)], 1),
        "system_and_history": (
            [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": _image_and_text(uri, "How many digits are there?")},
             {"role": "assistant", "content": "<think>\ncounting\n</think>\n\n4"},
             {"role": "user", "content": [{"type": "text", "text": README_Q}]}],
            [Message("system", "Answer briefly."), Message("user", "How many digits are there?", images=1),
             Message("assistant", "4", reasoning="counting"), Message("user", README_Q)], 1),
        "text_only_string": ([{"role": "user", "content": "What colour is the sky?"}],
                             [Message("user", "What colour is the sky?")], 0),
    }


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", ["image_then_text", "text_then_image", "system_and_history", "text_only_string"])
def test_stock_mtmd_handler_feeds_our_ids(stock, ours, name: str, mode: str) -> None:
    messages, msgs, n_images = conversations(_uri(EXAMPLE))[name]
    got, _, _ = stock_run(stock, messages, mode)
    want = our_prompt_ids(ours, msgs, mode, [EXAMPLE] * n_images)
    assert got.count(-1) == want.count(-1) == n_images * ours.backend.image_token_count(ours.prepare(EXAMPLE))
    assert got == want


def test_default_handler_renders_our_text_prompt(pair) -> None:
    """llama-cpp-python without a chat handler uses the GGUF's template (Jinja2ChatFormatter)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=str(pair.text), n_ctx=512, n_threads=1, verbose=False)
    try:
        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                  bos_token="<|endoftext|>")
        messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "Another one?"}]
        msgs = [Message("user", "Name a colour."), Message("assistant", "red"), Message("user", "Another one?")]
        for mode in MODES:
            assert fmt(messages=messages, thinking_mode=mode).prompt == render_prompt(msgs, mode)
        r = llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)  # auto: the default
        want = llm.tokenize(render_prompt(msgs, "auto").encode(), add_bos=False, special=True)
        assert r["usage"]["prompt_tokens"] == len(want)
    finally:
        llm.close()


def _stock_answer(stock, image, question: str, mode: str) -> str:
    """The answer: the reply's text after `</think>` (llama.cpp renders the tag in the text), where
    the ids fed back hold the `</think>` token; the whole text when the prompt closed the block."""
    llm = stock[0]
    messages = [{"role": "user", "content": _image_and_text(_uri(image), question)}]
    _, reply, r = stock_run(stock, messages, mode, max_tokens=256)
    assert r["choices"][0]["finish_reason"] == "stop"
    end_think = llm.tokenize(THINK_CLOSE.encode(), add_bos=False, special=False)  # parsed even so
    assert len(end_think) == 1
    content = r["choices"][0]["message"]["content"]
    assert (THINK_CLOSE in content) == (end_think[0] in reply), (content, reply)
    return content.split(THINK_CLOSE)[-1].strip()


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_stock_content_splits_at_think_close(quant: str, pair, tmp_path: Path) -> None:
    """Stock `create_chat_completion` (and the handler in think / no-think mode): the content is
    the reasoning, `</think>`, then the answer, each equal to r4b-edge's on the same files."""
    if quant == "F16":
        got = replies(pair.out_dir, EXAMPLE, README_Q)
    else:  # a quantized pair's stock decode runs in a child, so a native crash fails this test only
        got = replies_in_child(BUNDLED, tmp_path / quant, quant, EXAMPLE, README_Q)
    assert set(got) == set(MODES)
    for mode in MODES:
        check_split(mode, got[mode])
    assert got["auto"]["answer"] == "18" and got["auto"]["reasoning"]  # the README example thinks


def test_readme_example_same_answer(stock, ours) -> None:
    for mode, api in MODES.items():
        want = ours.chat(EXAMPLE, README_Q, mode=api, max_tokens=256).answer.strip()
        got = _stock_answer(stock, EXAMPLE, README_Q, mode)
        assert got == want, f"{mode}: stock {got!r} vs r4b-edge {want!r}"
        if mode == "auto":
            assert want == "18"


@pytest.mark.slow
def test_world_questions_same_answers(stock, ours) -> None:
    from r4b_edge.benchmarks.card.parity_report import world_prompts

    items = world_prompts(8)
    same = [(_stock_answer(stock, img, q, "auto"), ours.chat(img, q, max_tokens=256).answer.strip())
            for img, q in items]
    diff = [(q, s, o) for (img, q), (s, o) in zip(items, same) if s != o]
    assert not diff, f"{len(diff)}/{len(items)} differ: {diff}"
