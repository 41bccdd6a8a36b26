"""The HTTP layer under the app: uvicorn's h11 protocol with timeouts and a connection cap.

uvicorn alone lets a connection sit forever before its first request and drip
its headers without end, and its `limit_concurrency` answers everyone with a
plain-text 503 once a handful of such sockets are open. `GuardedH11Protocol`
adds what nginx, llama.cpp's server and Ollama's Go `net/http` have:

- a request-header timeout: a connection that has not sent a whole request head
  within `header_timeout` seconds of connecting (or of its last reply) is closed;
- a connection cap that idle sockets cannot exhaust: at the cap, a new connection
  evicts the oldest connection that has no request in progress (idle keep-alive or
  still sending headers). Only when every connection is busy with a request does
  the new one get a 503 in the OpenAI error shape.

`R4BServer` is a uvicorn `Server` that calls hooks when the socket listens (the
start-up banner) and when shutdown begins (queued clients are answered at once).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .request import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT

log = logging.getLogger("r4b_edge.serve")


def error_json(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout and an evicting connection cap.
    Use `guarded_protocol(...)` to get a subclass with the limits set."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_REQUEST_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._opened = 0.0

    # -- state ----------------------------------------------------------------------------------
    def _in_request(self) -> bool:
        """A request head has arrived and its reply is not finished."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self._in_request() and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request within %.0f s", self.header_timeout)
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = self.loop.time()
        self._arm()
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                    and not c._in_request() and not c.transport.is_closing()]
            if idle:
                oldest = min(idle, key=lambda c: c._opened)
                oldest.transport.close()
            else:  # every connection is answering a request: this one gets a proper 503
                self.app = _over_capacity(self.max_connections)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._disarm()
        else:
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request head must come in time too (uvicorn's keep-alive closes idle ones)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(max_connections: int = DEFAULT_MAX_CONNECTIONS,
                     header_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` subclass with these limits (pass it as uvicorn's `http=`)."""
    if max_connections < 1 or header_timeout <= 0:
        raise ValueError(f"max_connections must be >= 1 and header_timeout > 0, got {max_connections}, "
                         f"{header_timeout}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout})


def _over_capacity(limit: int) -> Callable:
    body = error_json(f"the server has all {limit} connections busy with requests (--max-connections): "
                      "retry later", "too_many_connections", "server_error")

    async def app(scope: Any, receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


class R4BServer(uvicorn.Server):
    """uvicorn's Server with two hooks: `on_started()` once the socket listens, and
    `on_shutdown()` as soon as shutdown begins (before uvicorn waits for connections)."""

    def __init__(self, config: uvicorn.Config, on_started: Optional[Callable[[], None]] = None,
                 on_shutdown: Optional[Callable[[], None]] = None):
        super().__init__(config)
        self.on_started, self.on_shutdown = on_started, on_shutdown

    async def startup(self, sockets: Optional[list] = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
            await asyncio.sleep(0)  # let the handlers answer their clients before connections are shut
        await super().shutdown(sockets=sockets)
