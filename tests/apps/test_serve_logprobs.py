"""The server's `logprobs`, `top_logprobs` and `stop`: the official `openai` client against a live loopback
uvicorn, compared with the Python API's results; exact OpenAI response shape, streamed and not."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import r4b_edge  # noqa: E402
from r4b_edge.apps.server.app import ServerThread, create_app  # noqa: E402
from r4b_edge.apps.server.request import Limits  # noqa: E402
from tests.apps.test_serve import _png, _user  # noqa: E402

LIMITS = Limits(max_request_bytes=1 << 20, max_image_pixels=120 * 120, max_images=3, default_max_tokens=16)
ENTRY_KEYS = {"token", "logprob", "bytes", "top_logprobs"}


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt) as m:
        yield m


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    model = r4b_edge.load(tiny_ckpt)
    with ServerThread(create_app(model, "tiny", max_queue=4, limits=LIMITS)) as s:
        yield s
    model.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _same(entries, want, top: int) -> None:
    """openai-parsed logprob entries == the API's TokenLogprob entries."""
    assert [e.token for e in entries] == [w.token for w in want]
    assert [e.bytes for e in entries] == [list(w.bytes) for w in want]
    # float32 rounding: the server's model reuses cached prefixes (prefix reuse), the reference
    # prefills from an empty cache, so the same positions are summed in other chunks
    assert [e.logprob for e in entries] == pytest.approx([w.logprob for w in want], abs=1e-5)
    for e, w in zip(entries, want):
        assert len(e.top_logprobs) == top
        assert [(t.token, t.bytes) for t in e.top_logprobs] == [(x.token, list(x.bytes)) for x in w.top_logprobs]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx([x.logprob for x in w.top_logprobs], abs=1e-5)


def test_non_stream_logprobs_match_api(client, ref):
    img = _png(21)
    want = ref.chat(img, "what is it?", mode="no-think", max_tokens=10, logprobs=True, top_logprobs=3)
    assert want.logprobs, "fixture: the tiny model writes an answer"
    r = client.chat.completions.create(model="tiny", messages=[_user("what is it?", img)], max_tokens=10,
                                       reasoning_effort="none", logprobs=True, top_logprobs=3)
    ch = r.choices[0]
    assert ch.message.content == want.answer
    _same(ch.logprobs.content, want.logprobs, 3)
    assert ch.logprobs.refusal is None
    assert isinstance(ch.logprobs.content[0], openai.types.chat.ChatCompletionTokenLogprob)


def test_raw_json_shape_and_logprobs_off(server):
    body = {"messages": [_user("q", _png(22))], "max_tokens": 6, "reasoning_effort": "none", "logprobs": True}
    j = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    lp = j["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["content"]
    for e in lp["content"]:
        assert set(e) == ENTRY_KEYS and e["top_logprobs"] == [] and e["logprob"] <= 0
        assert all(isinstance(b, int) and 0 <= b < 256 for b in e["bytes"])
    body.pop("logprobs")
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["logprobs"] \
        is None


def test_stream_logprobs_add_up_to_the_non_stream_ones(client, ref):
    img = _png(23)
    want = ref.chat(img, "why?", mode="think", max_tokens=24, max_think_tokens=10, logprobs=True, top_logprobs=2)
    assert want.reasoning_logprobs, "fixture: the tiny model reasons in think mode"
    chunks = [c for c in client.chat.completions.create(
        model="tiny", messages=[_user("why?", img)], max_tokens=24, reasoning_effort="high", stream=True,
        logprobs=True, top_logprobs=2, extra_body={"max_thinking_tokens": 10}) if c.choices]
    content = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    reasoning = [e for c in chunks if c.choices[0].logprobs
                 for e in (c.choices[0].logprobs.model_extra or {}).get("reasoning_content") or []]
    _same(content, want.logprobs, 2)
    assert [e["token"] for e in reasoning] == [w.token for w in want.reasoning_logprobs]
    assert [e["logprob"] for e in reasoning] == pytest.approx([w.logprob for w in want.reasoning_logprobs])
    # every text chunk carries the entries of the text it shows
    for c in chunks:
        d = c.choices[0].delta
        if d.content:
            assert c.choices[0].logprobs.content


def test_non_stream_reasoning_logprobs(client, ref):
    img = _png(24)
    want = ref.chat(img, "why?", mode="think", max_tokens=16, logprobs=True)
    r = client.chat.completions.create(model="tiny", messages=[_user("why?", img)], max_tokens=16,
                                       reasoning_effort="high", logprobs=True)
    got = r.choices[0].logprobs.model_extra["reasoning_content"]
    assert [e["logprob"] for e in got] == pytest.approx([w.logprob for w in want.reasoning_logprobs])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_the_answer(client, ref, stream):
    img = _png(25)
    full = ref.chat(img, "what?", mode="no-think", max_tokens=16).answer
    assert len(full) >= 6, f"fixture: the tiny model writes a few characters ({full!r})"
    stop = full[2:5]
    want = ref.chat(img, "what?", mode="no-think", max_tokens=16, stop=["never", stop])
    assert want.stop_sequence == stop and want.answer == full[:full.find(stop)].rstrip()
    kw = dict(model="tiny", messages=[_user("what?", img)], max_tokens=16, reasoning_effort="none",
              stop=["never", stop])
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.answer
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.content == want.answer and r.choices[0].finish_reason == "stop"
        one = client.chat.completions.create(**{**kw, "stop": stop})  # a single string works too
        assert one.choices[0].message.content == want.answer


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "onnx"])
def test_every_backend_serves_logprobs_and_stop(tmp_path_factory, tiny_ckpt, backend):
    from tests.conftest import export_tiny

    path = export_tiny(tmp_path_factory, tiny_ckpt, backend)
    img = _png(26)
    with r4b_edge.load(path, backend=backend) as m:
        want = m.chat(img, "what?", mode="no-think", max_tokens=10, logprobs=True, top_logprobs=2)
        stop = want.answer[2:4] if len(want.answer) >= 4 else "never"
        cut = m.chat(img, "what?", mode="no-think", max_tokens=10, stop=stop)
    model = r4b_edge.load(path, backend=backend)
    with ServerThread(create_app(model, "tiny", max_queue=2, limits=LIMITS)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model="tiny", messages=[_user("what?", img)], max_tokens=10, reasoning_effort="none")
        r = c.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
        _same(r.choices[0].logprobs.content, want.logprobs, 2)
        chunks = [ch for ch in c.chat.completions.create(stream=True, logprobs=True, top_logprobs=2, **kw)
                  if ch.choices]
        _same([e for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content], want.logprobs, 2)
        r = c.chat.completions.create(stop=stop, **kw)
        assert r.choices[0].message.content == cut.answer
        assert r.choices[0].finish_reason == cut.stats.finish_reason
    model.close()
