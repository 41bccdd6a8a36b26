"""Who may talk to the server: Host and Origin checks, and the optional API key.

A server on 127.0.0.1 is still reachable from every web page the user opens:
a page can POST `text/plain` to it (no CORS preflight), and DNS rebinding lets a
page on `evil.example` send requests whose `Host` is `evil.example`. As Ollama
does, `AccessGuard` answers 403 to a request whose `Host` is not this machine's
name for the server, or whose `Origin` is a web page not on the allow-list; and,
with an API key, 401 to a request without `Authorization: Bearer <key>`
(as llama.cpp's `--api-key`). Allowed browser origins get CORS headers.

Host: `localhost`, `*.localhost`, loopback addresses, the bound address and
`--allowed-hosts` names (any port). Bound to all interfaces (0.0.0.0 / ::), any
IP-literal Host and this machine's host names are allowed too. `*` allows any.
Origin: none (curl, SDKs), or http(s) on localhost / a loopback address, or one
of `--allowed-origins` (`*` allows any).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
from typing import Any, Callable, Iterable, Optional
from urllib.parse import urlsplit

#: Paths that answer without the API key (load balancers and probes poll them).
PUBLIC_PATHS = ("/health",)
_ALLOW_HEADERS = b"authorization, content-type, x-requested-with, openai-organization, openai-project"


def is_loopback(host: str) -> bool:
    """localhost, *.localhost or a loopback IP literal (brackets allowed)."""
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The host part of a Host header value (`[::1]:8000` -> `::1`), lower-case."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    if v.count(":") == 1:
        v = v.split(":", 1)[0]
    return v.rstrip(".")


class AccessPolicy:
    """The Host / Origin / key rules for one server."""

    def __init__(self, bound_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = (), api_key: Optional[str] = None):
        self.any_host = "*" in allowed_hosts
        self.hosts = {split_host(h) for h in allowed_hosts if h != "*"} | {split_host(bound_host)}
        self.wildcard_bind = bound_host.strip("[]") in ("0.0.0.0", "::", "")
        if self.wildcard_bind:
            for name in (socket.gethostname(), socket.getfqdn()):
                self.hosts.add(name.lower())
        self.any_origin = "*" in allowed_origins
        self.origins = {o.rstrip("/").lower() for o in allowed_origins if o != "*"}
        if api_key is not None and not api_key:
            raise ValueError("the API key must not be empty")
        self.api_key = api_key

    def host_ok(self, host_header: Optional[str]) -> bool:
        if self.any_host:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires Host; a request without one is not a browser's
        h = split_host(host_header)
        return is_loopback(h) or h in self.hosts or (self.wildcard_bind and _is_ip(h))

    def origin_ok(self, origin: str) -> bool:
        o = origin.rstrip("/").lower()
        if self.any_origin or o in self.origins:
            return True
        u = urlsplit(o)
        return u.scheme in ("http", "https") and bool(u.hostname) and is_loopback(u.hostname or "")

    def key_ok(self, authorization: Optional[str]) -> bool:
        if self.api_key is None:
            return True
        m = re.fullmatch(r"\s*Bearer\s+(\S+)\s*", authorization or "", flags=re.IGNORECASE)
        return bool(m) and hmac.compare_digest(m.group(1).encode(), self.api_key.encode())


def _body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


class AccessGuard:
    """ASGI middleware enforcing an `AccessPolicy` (403 / 401 in the OpenAI error shape)."""

    def __init__(self, app: Callable, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        p = self.policy
        if not p.host_ok(host):
            return await _deny(send, 403, _body(
                f"Host {host!r} is not allowed: this server answers to localhost, its loopback addresses and "
                "its bound address (add names with --allowed-hosts)", "forbidden_host"))
        if origin is not None and not p.origin_ok(origin):
            return await _deny(send, 403, _body(
                f"Origin {origin!r} is not allowed: web pages may call this server only from localhost "
                "(add origins with --allowed-origins)", "forbidden_origin"))
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if origin else []
        if scope["method"] == "OPTIONS" and origin and "access-control-request-method" in headers:
            return await _deny(send, 204, b"", cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", _ALLOW_HEADERS), (b"access-control-max-age", b"600")])
        if scope["path"] not in PUBLIC_PATHS and not p.key_ok(headers.get("authorization")):
            return await _deny(send, 401, _body(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the server "
                "was started with (--api-key)", "invalid_api_key"), cors + [(b"www-authenticate", b"Bearer")])
        if not cors:
            return await self.app(scope, receive, send)

        async def send_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        return await self.app(scope, receive, send_cors)


async def _deny(send: Callable, status: int, body: bytes, extra: Any = ()) -> None:
    headers = [(b"content-length", str(len(body)).encode())] + list(extra)
    if body:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
