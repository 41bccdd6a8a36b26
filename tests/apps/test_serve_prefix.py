"""The server's prefix cache and progress (issue 28): OpenAI clients resend the whole history
every turn; with two clients talking at once, each follow-up restores its own conversation's KV
state (`usage.prompt_tokens_details.cached_tokens`), and every reply equals the API's reply
without any cache. A stream whose prompt takes long to read starts with `: progress` comments."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import r4b_edge  # noqa: E402
from r4b_edge.apps.server.app import ServerThread, create_app  # noqa: E402
from tests.apps.test_serve import LIMITS, _png, _user  # noqa: E402

QUESTIONS = ["how many shapes?", "which colour?", "and the sum?"]


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt) as m:
        m.engine.prefix_reuse = False
        yield m


def _conversation(url: str, img: bytes, ref, out: dict, key: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    msgs: list[dict] = []
    api: list = []
    rows = []
    for i, q in enumerate(QUESTIONS):
        msgs.append(_user(q, img) if i == 0 else {"role": "user", "content": q})
        api.append(r4b_edge.Message("user", q, images=1 if i == 0 else 0))
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, reasoning_effort="none")
        answer = r.choices[0].message.content
        rows.append((answer, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens, api[:]))
        msgs.append({"role": "assistant", "content": answer})
        api.append(r4b_edge.Message("assistant", answer))
    out[key] = rows


def test_two_clients_at_once_reuse_their_own_prefixes(tiny_ckpt, ref) -> None:
    model = r4b_edge.load(tiny_ckpt)
    images = {"a": _png(21), "b": _png(22, (60, 40))}
    with ServerThread(create_app(model, "tiny", max_queue=8, limits=LIMITS)) as s:
        out: dict = {}
        threads = [threading.Thread(target=_conversation, args=(s.url, images[k], ref, out, k)) for k in images]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        pc = model.backend.prefix_cache
        assert pc is not None and pc.max_bytes > 0
    model.close()
    assert set(out) == {"a", "b"}
    for k, rows in out.items():
        for turn, (answer, prompt_tokens, cached, msgs) in enumerate(rows):
            want = ref.chat_messages(msgs, [images[k]], mode="no-think", max_tokens=6)
            assert answer == want.answer, f"client {k}, turn {turn + 1}"
            assert prompt_tokens == want.stats.prompt_tokens
            if turn:  # the image and the earlier turns come from a cache: the live one or a saved one
                assert cached > want.stats.image_tokens, (k, turn, cached)
            else:
                assert cached < prompt_tokens


def test_prefix_cache_off_reuses_only_the_live_state(tiny_ckpt) -> None:
    with r4b_edge.load(tiny_ckpt) as model:
        create_app(model, "tiny", limits=LIMITS, prefix_cache_bytes=0)
        assert model.backend.prefix_cache is None
        with pytest.raises(ValueError, match=">= 0"):
            create_app(model, "tiny", limits=LIMITS, prefix_cache_bytes=-1)


def test_a_slow_prompt_streams_progress_comments_first(tiny_ckpt) -> None:
    model = r4b_edge.load(tiny_ckpt)
    be = model.backend
    be.prefill_chunk = 4
    real = be._eval

    def slow(kind, rows, want):  # a big model's prefill: each chunk takes a while
        time.sleep(0.15)
        return real(kind, rows, want)

    be._eval = slow
    body = {"messages": [_user("tell me about this picture please", _png(30))], "max_tokens": 3, "stream": True,
            "reasoning_effort": "none"}
    with ServerThread(create_app(model, "tiny", limits=LIMITS)) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = [l for l in r.iter_lines() if l]
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(model="tiny", stream=True, max_tokens=3,
                                                     messages=[_user("and a new question here", _png(31))]))
    model.close()
    first_data = next(i for i, l in enumerate(lines) if l.startswith("data: "))
    progress = [json.loads(l[len(": progress "):]) for l in lines[:first_data]]
    assert progress and all(l.startswith(": progress ") for l in lines[:first_data])
    assert progress[-1]["stage"] == "prefill" and progress[-1]["done"] == progress[-1]["total"]
    assert lines[-1] == "data: [DONE]"
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")  # the client skips comments
