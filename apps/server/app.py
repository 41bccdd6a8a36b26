"""The OpenAI-compatible HTTP app (FastAPI on uvicorn).

Routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`. Every error has the OpenAI body
`{"error": {"message", "type", "param", "code"}}`. The model is used only by
the `ModelWorker` thread; handlers parse and check a request, take a queue
place (503 when none is free), then bound its text and decode its images in a
small pool (one at a time by default, so image memory is bounded), queue a
`Job` and relay its events. A client that disconnects cancels its job, queued
or running. `AccessGuard` (security.py) checks Host, Origin and the API key
first; `GuardedH11Protocol` (http.py) bounds connections and header time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from r4b_edge.api import check_options
from r4b_edge.backends.kvcache import PrefixCache
from r4b_edge.engine.events import AnswerDelta, Decision, Done, Progress, ReasoningDelta, Result
from r4b_edge.errors import ContextLengthError, GenerationOptionError, ImageError, R4BError

from .http import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, R4BServer, guarded_protocol
from .logprobs import choice_logprobs
from .request import (
    DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB, APIError, ChatRequest, Limits, bad, check_image, check_text_fits, parse_chat_request,
)
from .security import AccessGuard, AccessPolicy
from .worker import END, Job, ModelWorker, QueueFull, ShuttingDown, Stopped

log = logging.getLogger("r4b_edge.serve")


def _libc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator gives memory back by itself or not at all
        return None


_MALLOC_TRIM = _libc_trim()


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps a decoded image's pages otherwise)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def error_response(e: APIError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: retry later", None, "shutting_down", "server_error")


def as_api_error(e: BaseException) -> APIError:
    """Map an exception from parsing or generation to an HTTP error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ShuttingDown):
        return shutting_down()
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), "messages", "context_length_exceeded")
    if isinstance(e, GenerationOptionError):
        return APIError(400, str(e), None, "invalid_value")
    if isinstance(e, ImageError):
        return APIError(400, f"invalid image: {e}", "messages", "invalid_image")
    if isinstance(e, R4BError):
        return APIError(500, str(e), None, None, "server_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error")


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes, arriving within `timeout` seconds (408 otherwise)."""
    too_big = APIError(413, f"request body is over this server's limit of {limit} bytes "
                            "(--max-request-mb): send smaller images", None, "request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise bad("invalid Content-Length header", None, "invalid_request")
        if int(cl) > limit:
            raise too_big
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (--request-timeout)",
                       None, "request_timeout") from None
    return b"".join(chunks)


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone (call only after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json(raw: bytes) -> Any:
    if not raw.strip():
        raise bad("the request body is empty: send a JSON object", None, "invalid_json")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        raise bad("the request body is nested too deeply", None, "invalid_json") from None


def usage(result: Result) -> dict:
    s = result.stats
    completion = len(result.token_ids)
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": completion,
            "total_tokens": s.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": s.think_tokens},
            # OpenAI's name for prompt positions served from the cache (prefix reuse)
            "prompt_tokens_details": {"cached_tokens": min(s.positions_reused, s.prompt_tokens)}}


#: a streamed reply whose prompt is still being read after this long starts its response with
#: progress comments (docs/serve.md, "Progress")
PROGRESS_AFTER_S = 1.0


def progress_comment(p: Progress) -> str:
    """An SSE comment (clients skip it) saying how far the prompt has been read:
    `: progress {"stage": "prefill", "done": 512, "total": 4540, "elapsed_ms": 2210.4}`."""
    body = {"stage": p.stage, "done": p.done, "total": p.total, "elapsed_ms": round(p.elapsed_ms, 1)}
    return f": progress {json.dumps(body)}\n\n"


def _decision(d: Decision) -> dict:
    out = {"p_think": None if d.p_think is None else round(d.p_think, 4), "decision": "thinking" if d.think else "direct", "forced": d.forced}
    if d.deadline is not None:  # max_completion_time_ms: what the deadline plan chose and why
        p = d.deadline
        out["deadline"] = {"max_completion_time_ms": p.deadline_ms, "elapsed_ms": round(p.elapsed_ms, 1),
                           "tok_s": round(p.tok_s, 2), "tok_s_source": p.tok_s_source,
                           "max_thinking_tokens": p.max_think_tokens,
                           "expected_think_tokens": round(p.expected_think_tokens, 1),
                           "expected_answer_tokens": round(p.expected_answer_tokens, 1),
                           "expected_total_ms": round(p.expected_total_ms, 1),
                           "step_ms_conservative": round(p.step_ms_conservative, 2),
                           "lengths_source": p.lengths_source, "reason": p.reason}
    return out


class ChatServer:
    """State shared by the handlers: the model's worker, limits and names."""

    def __init__(self, model: Any, model_name: str = "r4b-edge", max_queue: int = DEFAULT_MAX_QUEUE,
                 limits: Optional[Limits] = None, decode_workers: int = 1):
        self.model, self.model_name = model, model_name
        self.limits = limits or Limits()
        self.worker = ModelWorker(model, max_queue)
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="r4b-decode")

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "r4b-edge"}

    def _prepare(self, req: ChatRequest) -> list:
        """In the decode pool, after admission: bound the text, then decode and prepare the images."""
        check_text_fits(self.model.tokenizer.encode, req.messages, self.model.backend.n_ctx)
        out = []
        budget = {} if req.image_tokens is None else {"image_tokens": req.image_tokens}  # else the server's
        for data, param in zip(req.images, req.image_params):
            pil = check_image(data, param, self.limits)
            try:  # a queued request keeps only the model's views, not the full-size RGB image
                out.append(replace(self.model.prepare(pil, **budget), image=None))
            except ImageError as e:
                raise bad(f"invalid image: {e}", param, "invalid_image") from None
            del pil
        req.images.clear()  # the encoded bytes are not needed any more either
        trim_heap()
        return out

    def begin_shutdown(self) -> None:
        """Answer queued requests with 503 now and end the running reply (see ModelWorker)."""
        self.worker.begin_shutdown()

    async def chat(self, request: Request):
        raw = await _read_body(request, self.limits.max_request_bytes, self.limits.request_timeout)
        req = parse_chat_request(_json(raw), self.limits)
        check_options(**req.options)  # a bad option is a 400 before the request takes a place
        self.worker.admit()  # a place first: nothing is decoded for a request that cannot wait
        gone = asyncio.ensure_future(_until_disconnect(request))
        job: Optional[Job] = None
        try:
            try:
                loop = asyncio.get_running_loop()
                images = await loop.run_in_executor(self.pool, self._prepare, req)
                job = Job(req.messages, images, req.options, loop)
                self.worker.submit(job)
            except BaseException:
                self.worker.release()
                raise
            gone.add_done_callback(lambda t: t.cancelled() or job.cancel())
            first = await self._first_event(job, req.stream)
            if isinstance(first, BaseException):
                raise first
            if first is END or not isinstance(first, (Decision, Progress)):
                raise shutting_down()
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": req.model or self.model_name}
            if req.stream:  # from here Starlette watches the connection; the stream's finally cancels
                gone.cancel()
                return StreamingResponse(self._sse(first, job, req, meta), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JSONResponse(await self._collect(first, job, meta))
        finally:
            gone.cancel()
            if job is not None and not req.stream:
                job.cancel()

    async def _first_event(self, job: Job, stream: bool) -> Any:
        """The reply's Decision (or an error, or END), skipping `Progress`; a stream whose prompt
        takes longer than `PROGRESS_AFTER_S` to read gets its latest `Progress` instead, so the
        response starts and shows progress (a quick failure stays a plain HTTP error)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + PROGRESS_AFTER_S
        item = await job.next()
        while isinstance(item, Progress):
            if not stream:
                item = await job.next()
                continue
            left = until - loop.time()
            if left <= 0:
                return item
            try:
                item = await asyncio.wait_for(job.next(), left)
            except asyncio.TimeoutError:
                return item
        return item

    async def _collect(self, decision: Decision, job: Job, meta: dict) -> dict:
        result: Optional[Result] = None
        while True:
            item = await job.next()
            if item is END:
                break
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Stopped):
                raise shutting_down()
            if isinstance(item, Done):
                result = item.result
        if result is None:
            raise APIError(500, "generation ended without a result", None, None, "server_error")
        message = {"role": "assistant", "content": result.answer,
                   "reasoning_content": result.reasoning if result.reasoning else None}
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": message,
                             "logprobs": None if result.logprobs is None
                             else choice_logprobs(result.logprobs, result.reasoning_logprobs),
                             "finish_reason": result.stats.finish_reason or "stop"}],
                "usage": usage(result), **_decision(decision), "stats": asdict(result.stats)}

    async def _sse(self, first: Decision | Progress, job: Job, req: ChatRequest, meta: dict) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: Optional[str] = None, logprobs: Optional[dict] = None, **extra: Any) -> str:
            body = {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra}
            if req.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        sent = {"answer": 0, "reasoning": 0}  # logprob entries already streamed

        def lps(answer: tuple = (), reasoning: tuple = ()) -> Optional[dict]:
            sent["answer"] += len(answer)
            sent["reasoning"] += len(reasoning)
            return choice_logprobs(answer, reasoning) if req.options.get("logprobs") else None

        try:
            while isinstance(first, Progress):  # the prompt is being read: SSE comments until the decision
                yield progress_comment(first)
                first = await job.next()
            if isinstance(first, BaseException):
                yield f"data: {json.dumps(as_api_error(first).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if not isinstance(first, Decision):  # END or Stopped: shut down while reading the prompt
                yield chunk({}, "stop", stopped="shutdown")
                yield "data: [DONE]\n\n"
                return
            yield chunk({"role": "assistant", "content": ""}, **_decision(first))
            while True:
                item = await job.next()
                if item is END:
                    break
                if isinstance(item, BaseException):
                    yield f"data: {json.dumps(as_api_error(item).body())}\n\n"
                    break
                if isinstance(item, Stopped):  # shutdown: a normal last chunk, then [DONE]
                    yield chunk({}, "stop", stopped=item.reason)
                    break
                if isinstance(item, ReasoningDelta):
                    yield chunk({"reasoning_content": item.text}, logprobs=lps(reasoning=item.logprobs))
                elif isinstance(item, AnswerDelta):
                    yield chunk({"content": item.text}, logprobs=lps(answer=item.logprobs))
                elif isinstance(item, Done):
                    r = item.result
                    tail = lps(tuple((r.logprobs or [])[sent["answer"]:]),
                               tuple((r.reasoning_logprobs or [])[sent["reasoning"]:]))
                    yield chunk({}, r.stats.finish_reason or "stop", logprobs=tail, stats=asdict(r.stats))
                    if req.include_usage:
                        body = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(r)}
                        yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # client gone or stream over: the worker stops at its next event


def create_app(model: Any, model_name: str = "r4b-edge", max_queue: int = DEFAULT_MAX_QUEUE,
               limits: Optional[Limits] = None, policy: Optional[AccessPolicy] = None,
               decode_workers: int = 1, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_MB << 20) -> FastAPI:
    """The FastAPI app serving `model` (an `r4b_edge.Model`); starts its worker thread.
    `policy`: Host / Origin / API-key rules (default: loopback names only, no key).
    `prefix_cache_bytes`: KV states kept across requests besides the live one (0: none)."""
    if prefix_cache_bytes < 0:
        raise ValueError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
    model.backend.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
    srv = ChatServer(model, model_name, max_queue, limits, decode_workers)
    srv.worker.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        srv.worker.stop()
        srv.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="r4b-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_middleware(AccessGuard, policy=policy or AccessPolicy())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    def queue_full() -> JSONResponse:
        return error_response(APIError(503, f"the server is busy: all {srv.worker.max_queue} queue places are "
                                            "taken; retry later", None, "queue_full", "server_error"),
                              headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail), None, None,
                                       "invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            return await srv.chat(request)
        except QueueFull:
            return queue_full()
        except Exception as e:  # every failure is an OpenAI-style error body, never a dropped connection
            err = as_api_error(e)
            if err.status >= 500 and not isinstance(e, (APIError, R4BError, ShuttingDown)):
                log.error("request failed: %s: %s", type(e).__name__, e)
            return error_response(err)

    @app.get("/v1/models")
    async def models():
        return srv.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != srv.model_name:
            raise APIError(404, f"model {model_id!r} not found: this server serves {srv.model_name!r}",
                           "model", "model_not_found")
        return srv.model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": srv.worker.pending(), "busy": srv.worker.busy,
                "served": srv.worker.served, "max_queue": srv.worker.max_queue}

    return app


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound TCP socket for `host:port`, or ServerBindError with one clear line
    (busy port, unknown host, address not on this machine)."""
    from r4b_edge.errors import ServerBindError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ServerBindError(f"cannot listen on {host}:{port}: unknown host ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "the port is in use (pick another with --port, or 0 for any free port)" \
            if e.errno in (98, 48, 10048) else (e.strerror or str(e))
        raise ServerBindError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, embedding):
    `with ServerThread(app) as s: ... s.url ...`. Port 0 picks a free port.
    `run()` serves in the calling thread instead (the CLI: uvicorn then handles signals)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 graceful_timeout: Optional[float] = 10.0, sock: Optional[socket.socket] = None,
                 on_started: Optional[Any] = None):
        import uvicorn

        self.sock = sock if sock is not None else bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[0], self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=5,
                                http=guarded_protocol(max_connections, request_timeout),
                                timeout_graceful_shutdown=graceful_timeout)
        srv = getattr(app.state, "server", None)
        self.server = R4BServer(config, on_started=on_started,
                                on_shutdown=srv.begin_shutdown if srv is not None else None)
        self.thread = threading.Thread(target=self.run, name="r4b-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until stopped (SIGINT / SIGTERM when called in the main thread)."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
