"""The OpenAI-compatible HTTP app (FastAPI on uvicorn).

Routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`. Every error has the OpenAI body
`{"error": {"message", "type", "param", "code"}}`. The model is used only by
the `ModelWorker` thread; handlers parse, check and decode images, queue a
`Job` (503 when the queue is full) and relay its events.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from r4b_edge.engine.events import AnswerDelta, Decision, Done, ReasoningDelta, Result
from r4b_edge.errors import ContextLengthError, GenerationOptionError, ImageError, R4BError

from .server_logprobs import choice_logprobs
from .server_request import APIError, ChatRequest, Limits, bad, check_image, parse_chat_request
from .server_worker import END, Job, ModelWorker, QueueFull, make_options

log = logging.getLogger("r4b_edge.serve")


def error_response(e: APIError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def as_api_error(e: BaseException) -> APIError:
    """Map an exception from parsing or generation to an HTTP error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), "messages", "context_length_exceeded")
    if isinstance(e, GenerationOptionError):
        return APIError(400, str(e), None, "invalid_value")
    if isinstance(e, ImageError):
        return APIError(400, f"invalid image: {e}", "messages", "invalid_image")
    if isinstance(e, R4BError):
        return APIError(500, str(e), None, None, "server_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error")


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"request body is over this server's limit of {limit} bytes "
                            "(--max-request-mb): send smaller images", None, "request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise bad("invalid Content-Length header", None, "invalid_request")
        if int(cl) > limit:
            raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


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
            "completion_tokens_details": {"reasoning_tokens": s.think_tokens}}


def _decision(d: Decision) -> dict:
    return {"p_think": round(d.p_think, 4), "decision": "thinking" if d.think else "direct", "forced": d.forced}


class ChatServer:
    """State shared by the handlers: the model's worker, limits and names."""

    def __init__(self, model: Any, model_name: str = "r4b-edge", max_queue: int = 16,
                 limits: Optional[Limits] = None):
        self.model, self.model_name = model, model_name
        self.limits = limits or Limits()
        self.worker = ModelWorker(model, max_queue)
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "r4b-edge"}

    def _prepare_images(self, req: ChatRequest) -> list:
        out = []
        for data, param in zip(req.images, req.image_params):
            pil = check_image(data, param, self.limits)
            try:
                out.append(self.model.prepare(pil))
            except ImageError as e:
                raise bad(f"invalid image: {e}", param, "invalid_image") from None
        return out

    async def chat(self, request: Request):
        raw = await _read_body(request, self.limits.max_request_bytes)
        req = parse_chat_request(_json(raw), self.limits)
        options = make_options(req.options)
        if self.worker.full():  # no need to decode images for a request that cannot wait
            raise QueueFull()
        images = await run_in_threadpool(self._prepare_images, req) if req.images else []
        job = Job(req.messages, images, options, asyncio.get_running_loop())
        self.worker.submit(job)
        try:
            first = await job.next()
        except BaseException:
            job.cancel()
            raise
        if isinstance(first, BaseException):
            job.cancel()
            raise first
        if first is END or not isinstance(first, Decision):
            raise APIError(503, "the request was dropped: the server is shutting down", None, None, "server_error")
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._sse(first, job, req, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await self._collect(first, job, meta))
        finally:
            job.cancel()

    async def _collect(self, decision: Decision, job: Job, meta: dict) -> dict:
        result: Optional[Result] = None
        while True:
            item = await job.next()
            if item is END:
                break
            if isinstance(item, BaseException):
                raise item
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

    async def _sse(self, decision: Decision, job: Job, req: ChatRequest, meta: dict) -> AsyncIterator[str]:
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
            yield chunk({"role": "assistant", "content": ""}, **_decision(decision))
            while True:
                item = await job.next()
                if item is END:
                    break
                if isinstance(item, BaseException):
                    yield f"data: {json.dumps(as_api_error(item).body())}\n\n"
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


def create_app(model: Any, model_name: str = "r4b-edge", max_queue: int = 16,
               limits: Optional[Limits] = None) -> FastAPI:
    """The FastAPI app serving `model` (an `r4b_edge.Model`); starts its worker thread."""
    srv = ChatServer(model, model_name, max_queue, limits)
    srv.worker.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        srv.worker.stop()

    app = FastAPI(title="r4b-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

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
            if err.status >= 500 and not isinstance(e, (APIError, R4BError)):
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


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, embedding):
    `with ServerThread(app) as s: ... s.url ...`. Port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limit_concurrency: Optional[int] = None, graceful_timeout: Optional[float] = 10.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", limit_concurrency=limit_concurrency,
                                timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="r4b-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
