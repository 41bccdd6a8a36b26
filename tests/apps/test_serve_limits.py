"""The engine's limits through `r4b-edge serve` (#14 items 1-2): a prompt that fits never fails
part-way when the thinking budget's close runs past the context (it was a 400), and
`max_tokens` bounds `usage.completion_tokens`. Live loopback uvicorn, as test_serve.py."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import r4b_edge  # noqa: E402
from r4b_edge.apps.server.app import ServerThread, create_app  # noqa: E402
from r4b_edge.apps.server.request import Limits  # noqa: E402
from r4b_edge.model.template import Message, render_prompt  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    model = r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", threads=1)
    with ServerThread(create_app(model, "tiny", max_queue=4, limits=Limits(default_max_tokens=64))) as s:
        s.model = model
        yield s
    model.close()


def _text_filling(model, room: int) -> str:
    """A user text whose rendered prompt leaves `room` positions of the context."""
    tok, n_ctx = model.tokenizer, model.backend.n_ctx
    n = lambda k: len(tok.encode(render_prompt([Message("user", "word " * k)], "auto")))  # noqa: E731
    lo, hi = 1, n_ctx
    while lo < hi:  # the largest k whose prompt leaves at least `room`
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if n(mid) <= n_ctx - room else (lo, mid - 1)
    assert n_ctx - room - 2 <= n(lo) <= n_ctx - room
    return "word " * lo


def _body(text: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "reasoning_effort": "high",
            "max_thinking_tokens": 1, "max_tokens": 200, **kw}


def test_budget_close_past_the_context_is_length_not_400(server):
    text = _text_filling(server.model, 8)  # room to start thinking, not for the closing line (~30 tokens)
    r = httpx.post(server.url + "/v1/chat/completions", json=_body(text), timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= server.model.backend.n_ctx + 1


def test_budget_close_past_the_context_streams_a_normal_end(server):
    text = _text_filling(server.model, 8)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=_body(text, stream=True), timeout=300) as r:
        assert r.status_code == 200
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("effort", ["high", "none"])
def test_max_tokens_bounds_completion_tokens(server, effort):
    for max_tokens in (1, 3, 7):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "why?"}], "reasoning_effort": effort,
                "max_thinking_tokens": 1, "max_tokens": max_tokens}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert u["completion_tokens"] <= max_tokens, (effort, max_tokens, u)
        assert u["completion_tokens_details"]["reasoning_tokens"] <= u["completion_tokens"]
