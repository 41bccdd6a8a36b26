"""`r4b-edge serve` against hostile or careless clients: huge prompts, idle and slow sockets,
image floods, foreign Hosts and Origins, API keys, disconnects, SIGTERM, a busy port.
Every server is a real uvicorn on a loopback port; request loops are bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import r4b_edge  # noqa: E402
from r4b_edge.apps.server import app as server_app  # noqa: E402
from r4b_edge.apps.server.app import ServerThread, create_app  # noqa: E402
from r4b_edge.apps.server.request import Limits  # noqa: E402
from tests.apps.test_serve import _png, _user  # noqa: E402

SLOW_CLI = str(Path(__file__).with_name("slow_cli.py"))
ROOT = str(Path(__file__).resolve().parents[2])


def _slow(model, delay: float = 0.02):
    from r4b_edge.testing import slow_down

    slow_down(model.backend, delay)
    return model


@pytest.fixture()
def slow_model(tiny_ckpt):
    model = _slow(r4b_edge.load(tiny_ckpt))
    yield model
    model.close()


def _client(url: str, key: str = "none", timeout: float = 60) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def _wait(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


# ---- 8: a huge text prompt -----------------------------------------------------------------------
def test_huge_prompt_is_refused_fast_and_health_stays_responsive(tiny_ckpt):
    model = r4b_edge.load(tiny_ckpt)
    limits = Limits(max_request_bytes=64 << 20, max_image_pixels=120 * 120)
    text = ("lorem ipsum dolor sit amet " * 400_000)[:10_000_000] + "x" * 2_000_000  # 12 MB, a long run too
    with ServerThread(create_app(model, "tiny", limits=limits)) as s:
        worst, stop = [0.0], threading.Event()

        def poll() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = httpx.get(s.url + "/health", timeout=30).status_code == 200
                except httpx.HTTPError:
                    ok = False
                worst[0] = max(worst[0], time.monotonic() - t0 if ok else float("inf"))
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.monotonic()
        try:
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                           json={"messages": [{"role": "user", "content": text}], "max_tokens": 4})
        finally:
            elapsed = time.monotonic() - t0
            stop.set()
            poller.join(60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "context is" in r.json()["error"]["message"]
        assert elapsed < 5.0, f"the refusal took {elapsed:.1f} s"
        assert worst[0] < 1.0, f"/health took {worst[0]:.2f} s while the prompt was checked"
        # a prompt that fits still gets answered
        ok = _client(s.url).chat.completions.create(model="tiny", messages=[_user("fits")], max_tokens=3)
        assert ok.choices[0].finish_reason in ("stop", "length")
    model.close()


def test_check_text_fits_counts_like_the_tokenizer(tiny_ckpt):
    from r4b_edge.apps.server.request import APIError, check_text_fits
    from r4b_edge.model.template import Message

    with r4b_edge.load(tiny_ckpt) as m:
        enc = m.tokenizer.encode
        text = "the cat sat on the mat, then ran away.\n" * 300
        n = check_text_fits(enc, [Message("user", text)], 10**6, piece=1000)
        assert abs(n - len(enc(text))) <= len(text) // 1000 + 1  # at most a token per piece apart
        calls = []

        def counting(t):
            calls.append(len(t))
            return enc(t)

        with pytest.raises(APIError) as e:
            check_text_fits(counting, [Message("user", text * 1000)], 500, piece=1000)
        assert e.value.code == "context_length_exceeded"
        assert sum(calls) < 20_000  # stopped after a few pieces of the 12 MB text


# ---- 9: idle, half-open and slow connections -----------------------------------------------------
def _half_open(url: str, n: int) -> list[socket.socket]:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    socks = []
    for _ in range(n):
        c = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")  # headers never end
        socks.append(c)
    return socks


def test_half_open_sockets_do_not_lock_out_clients(tiny_ckpt):
    model = r4b_edge.load(tiny_ckpt)
    with ServerThread(create_app(model, "tiny", limits=Limits()), max_connections=32) as s:
        socks = _half_open(s.url, 80)  # far over the connection limit
        try:
            r = _client(s.url, timeout=20).chat.completions.create(model="tiny", messages=[_user("hi")],
                                                                   max_tokens=3)
            assert r.choices[0].message is not None
            assert _health(s.url)["status"] == "ok"
        finally:
            for c in socks:
                c.close()
    model.close()


def test_header_and_body_timeouts(tiny_ckpt):
    model = r4b_edge.load(tiny_ckpt)
    with ServerThread(create_app(model, "tiny", limits=Limits(request_timeout=1.0)), request_timeout=1.0) as s:
        idle, dripping = _half_open(s.url, 1)[0], socket.create_connection(("127.0.0.1", s.port), timeout=10)
        silent = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        dripping.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messa")
        t0 = time.monotonic()
        assert idle.recv(100) == b"" and silent.recv(100) == b""  # closed by the server, not by us
        assert time.monotonic() - t0 < 5
        reply = b""
        while not reply.endswith(b"}"):
            part = dripping.recv(4096)
            assert part, reply
            reply += part
        reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408")
        assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        for c in (idle, dripping, silent):
            c.close()
    model.close()


def test_all_connections_busy_gets_openai_503(tiny_ckpt):
    model = r4b_edge.load(tiny_ckpt)
    with ServerThread(create_app(model, "tiny", limits=Limits()), max_connections=2) as s:
        busy = []
        for _ in range(2):  # two requests in progress (their bodies still coming): nothing idle to close
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            busy.append(c)
        time.sleep(0.2)
        try:
            with pytest.raises(openai.APIStatusError) as e:
                _client(s.url, timeout=20).chat.completions.create(model="tiny", messages=[_user("q")],
                                                                   max_tokens=2)
            assert e.value.status_code == 503
            assert e.value.body["code"] == "too_many_connections" and "--max-connections" in e.value.body["message"]
        finally:
            for c in busy:
                c.close()
        assert _wait(lambda: httpx.get(s.url + "/health", timeout=10).status_code == 200, 5)
    model.close()


# ---- 10: image decoding after admission, one at a time ----------------------------------------
def test_images_decoded_after_admission_in_a_bounded_pool(tiny_ckpt, monkeypatch):
    model = r4b_edge.load(tiny_ckpt)
    decode = server_app.check_image
    active, peak, lock = [0], [0], threading.Lock()

    def counting(*a, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.1)
            return decode(*a, **kw)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(server_app, "check_image", counting)
    codes = []
    with ServerThread(create_app(model, "tiny", max_queue=4, limits=Limits())) as s:
        def one() -> None:
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                           json={"messages": [_user("q", _png(3, (200, 200)))], "max_tokens": 2})
            codes.append((r.status_code, r.json().get("error", {}).get("code")))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    model.close()
    assert peak[0] == 1, f"{peak[0]} images were decoded at once"
    assert codes.count((200, None)) >= 4 and set(codes) <= {(200, None), (503, "queue_full")}
    # 8 requests, 4 places (+ the one answered): the refused ones were never decoded
    assert codes.count((503, "queue_full")) == 8 - codes.count((200, None))


# ---- 12: Host, Origin and API key ---------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tiny_ckpt):
    from r4b_edge.apps.server.security import AccessPolicy

    model = r4b_edge.load(tiny_ckpt)
    policy = AccessPolicy("127.0.0.1", allowed_hosts=["r4b.lan"], allowed_origins=["https://app.example.com"])
    with ServerThread(create_app(model, "tiny", limits=Limits(), policy=policy)) as s:
        yield s
    model.close()


@pytest.mark.parametrize("host, ok", [("evil.example", False), ("evil.example:8000", False),
                                      ("127.0.0.1.nip.io", False), ("localhost", True), ("127.0.0.1:1", True),
                                      ("[::1]:8000", True), ("app.localhost", True), ("r4b.lan:80", True)])
def test_host_header(guarded, host, ok):
    r = httpx.get(guarded.url + "/v1/models", headers={"Host": host}, timeout=10)
    if ok:
        assert r.status_code == 200
    else:
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"


def test_cross_site_post_is_refused_before_the_model_runs(guarded):
    served = _health(guarded.url)["served"]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = httpx.post(guarded.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(guarded.url + "/v1/chat/completions", timeout=10,
                        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://app.example.com"):
        r = httpx.post(guarded.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"Content-Type": "application/json", "Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        pre = httpx.options(guarded.url + "/v1/chat/completions", timeout=10,
                            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                     "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
    assert _health(guarded.url)["served"] == served + 3


def test_api_key(tiny_ckpt):
    from r4b_edge.apps.server.security import AccessPolicy

    model = r4b_edge.load(tiny_ckpt)
    with ServerThread(create_app(model, "tiny", limits=Limits(), policy=AccessPolicy(api_key="s3cret"))) as s:
        for key in ("none", "s3cret-not"):
            with pytest.raises(openai.AuthenticationError) as e:
                _client(s.url, key).chat.completions.create(model="tiny", messages=[_user("q")], max_tokens=2)
            assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(s.url, key="wrong").models.list()
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        r = _client(s.url, "s3cret").chat.completions.create(model="tiny", messages=[_user("q")], max_tokens=2)
        assert r.choices[0].message is not None
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # probes need no key
    model.close()


def test_exposure_warning():
    from r4b_edge.apps.serve import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    w = exposure_warning("0.0.0.0", None)
    assert w and "--api-key" in w and "anyone" in w


# ---- 13: disconnects free the worker ------------------------------------------------------------
def test_disconnected_non_stream_and_queued_requests_free_the_worker(slow_model):
    with ServerThread(create_app(slow_model, "tiny", limits=Limits())) as s:
        served = _health(s.url)["served"]
        body = {"messages": [_user("q")], "max_tokens": 400, "reasoning_effort": "none"}

        def leave(delay: float) -> None:  # the client gives up after `delay` seconds
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=delay))

        first = threading.Thread(target=leave, args=(1.0,))
        first.start()
        assert _wait(lambda: _health(s.url)["busy"], 10)
        second = threading.Thread(target=leave, args=(0.5,))  # waits in the queue, then leaves
        second.start()
        first.join(30)
        second.join(30)
        t0 = time.monotonic()
        assert _wait(lambda: not _health(s.url)["busy"] and _health(s.url)["queued"] == 0, 3.0), _health(s.url)
        assert time.monotonic() - t0 < 3.0  # 400 tokens at 20 ms would hold the worker 8 s each
        assert _health(s.url)["served"] == served + 1  # the queued request never ran


# ---- 16: smaller items ------------------------------------------------------------------------
def test_model_is_echoed(guarded):
    r = _client(guarded.url).chat.completions.create(model="my-alias", messages=[_user("q")], max_tokens=2)
    assert r.model == "my-alias"
    chunks = list(_client(guarded.url).chat.completions.create(model="other", messages=[_user("q")],
                                                               max_tokens=2, stream=True))
    assert {c.model for c in chunks} == {"other"}
    r = httpx.post(guarded.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [_user("q")], "max_tokens": 2}).json()
    assert r["model"] == "tiny"  # no model sent: the served name


def test_neutral_sampling_defaults_accepted(guarded):
    r = _client(guarded.url).chat.completions.create(model="tiny", messages=[_user("q")], max_tokens=2,
                                                     frequency_penalty=0, presence_penalty=0, logit_bias={})
    assert r.choices[0].message is not None


# ---- 14 and 15: the command --------------------------------------------------------------------
def _spawn(args: list[str], delay: float = 0.02, **kw) -> subprocess.Popen:
    env = {**os.environ, "R4B_TEST_DELAY": str(delay), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, SLOW_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, **kw)


def _banner_url(p: subprocess.Popen) -> str:
    line = p.stdout.readline()
    assert "r4b-edge serve:" in line, (line, p.stderr.read() if p.poll() is not None else "")
    return line.split(" on ")[1].split()[0][: -len("/v1")]


@pytest.mark.slow
def test_sigterm_drains_queue_and_ends_the_stream(tiny_ckpt):
    p = _spawn(["serve", "--model", str(tiny_ckpt), "--port", "0", "--log-level", "warning"], delay=0.03)
    try:
        url = _banner_url(p)
        # the banner comes once the socket listens: no retry loop needed
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        chunks: list[dict] = []
        lines: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                              json={"messages": [_user("q")], "max_tokens": 1000, "stream": True,
                                    "reasoning_effort": "none"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        if line != "data: [DONE]":
                            chunks.append(json.loads(line[6:]))

        queued: list = []

        def wait_in_queue() -> None:
            try:
                _client(url).chat.completions.create(model="r4b-edge", messages=[_user("q")], max_tokens=5)
                queued.append("answered")
            except openai.APIStatusError as e:
                queued.append((e.status_code, e.body.get("code")))

        st = threading.Thread(target=stream)
        st.start()
        assert _wait(lambda: len(chunks) >= 3, 20)
        waiters = [threading.Thread(target=wait_in_queue) for _ in range(2)]
        for w in waiters:
            w.start()
        assert _wait(lambda: _health(url)["queued"] == 2, 10)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        st.join(15)
        for w in waiters:
            w.join(15)
        assert time.monotonic() - t0 < 10
        assert queued == [(503, "shutting_down")] * 2
        assert lines[-1] == "data: [DONE]"
        last = chunks[-1]
        assert last["choices"][0]["finish_reason"] == "stop" and last["stopped"] == "shutdown"
        rc = p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err and "CancelledError" not in err, err


def test_busy_port_and_bad_host_fail_before_loading(tiny_ckpt, capsys, monkeypatch):
    from r4b_edge.apps.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the address is unusable")

    monkeypatch.setattr(r4b_edge, "load", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_ckpt), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err
    assert main(["serve", "--model", str(tiny_ckpt), "--host", "no-such-host.invalid"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on no-such-host.invalid" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_banner_limits_and_half_open_flood(tiny_ckpt):
    """The command's defaults: a pixel limit fitted to the model, and 100 half-open sockets
    (uvicorn's limit_concurrency of 64 answered everyone else with plain-text 503s)."""
    p = _spawn(["serve", "--model", str(tiny_ckpt), "--port", "0", "--log-level", "warning"], delay=0.0)
    try:
        line = p.stdout.readline()
        assert "images up to 12,582,912 pixels" in line, line  # 64-px model: the 12.6 MP floor
        url = line.split(" on ")[1].split()[0][: -len("/v1")]
        socks = _half_open(url, 100)
        try:
            r = _client(url, timeout=20).chat.completions.create(model="r4b-edge", messages=[_user("q")],
                                                                 max_tokens=2)
            assert r.choices[0].message is not None
        finally:
            for c in socks:
                c.close()
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(30)
    err = p.stderr.read()
    assert rc == 0 and "Traceback" not in err, err
