"""`r4b-edge serve`: an OpenAI-compatible local server (POST /v1/chat/completions).

Reasoning comes back in `reasoning_content`, the answer in `content`; choose the
mode with `reasoning_effort` (none / high) or `chat_template_kwargs.thinking_mode`
(auto / long / short). Images only as data URIs. One model answers one request
at a time; waiting requests sit in a bounded queue (503 when full).

Security (docs/serve.md): loopback only by default; requests whose Host is not
this server's name or whose Origin is a foreign web page get 403; --api-key
requires a Bearer key; slow clients are cut off after --request-timeout.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from .common import add_model_args
from .server.request import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB, DEFAULT_REQUEST_TIMEOUT, Limits

#: Environment variable read for --api-key (keeps the key out of `ps`).
API_KEY_ENV = "R4B_EDGE_API_KEY"


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible local server", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", default="r4b-edge", help="model id shown by /v1/models (default r4b-edge)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, "
                        "else no key)")
    p.add_argument("--allowed-hosts", default="", metavar="H1,H2",
                   help="Host header names accepted besides localhost, loopback addresses and --host ('*': any)")
    p.add_argument("--allowed-origins", default="", metavar="O1,O2",
                   help="browser Origins accepted besides http(s)://localhost|127.0.0.1|[::1] "
                        "(e.g. https://app.example.com; '*': any)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests that may wait while one is answered; more get 503 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections; at the limit idle ones are closed first "
                        f"(default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="S",
                   help="seconds a client has to send a request's headers, and again its body "
                        f"(default {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--max-request-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body, images included (default 20)")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="largest image, width x height (default: 4 x the model's largest tile grid, "
                        "at least 12.6 MP)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    p.add_argument("--default-max-tokens", type=int, default=Limits.default_max_tokens, metavar="N",
                   help=f"reply bound when a request sends no max_tokens (default {Limits.default_max_tokens})")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                   help="KV cache states kept across requests, besides the live one, so that a client that "
                        "resends a conversation (OpenAI clients do) evaluates only its new positions "
                        f"(default {DEFAULT_PREFIX_CACHE_MB:g} MiB, least recently used dropped first; 0: off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from r4b_edge.errors import R4BError

    for name in ("max_queue", "max_images", "default_max_tokens", "max_connections"):
        if getattr(args, name) < 1:
            raise R4BError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_request_mb <= 0 or (args.max_image_pixels is not None and args.max_image_pixels < 1):
        raise R4BError("--max-request-mb and --max-image-pixels must be positive")
    if not args.request_timeout > 0:
        raise R4BError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.prefix_cache_mb >= 0:
        raise R4BError(f"--prefix-cache-mb must be >= 0 MiB (0 turns the cache off), got {args.prefix_cache_mb}")
    if not 0 <= args.port <= 65535:
        raise R4BError(f"--port must be within 0..65535, got {args.port}")
    if args.api_key is not None and (not args.api_key.strip() or any(c.isspace() for c in args.api_key)):
        raise R4BError("--api-key must be a non-empty word without spaces")


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning printed when the bind address reaches beyond this machine without a key."""
    from .server.security import is_loopback

    if is_loopback(host) or api_key:
        return None
    return (f"warning: binding {host} without --api-key: anyone who can reach this address can run the "
            "model (use this machine's CPU/GPU and memory) and read its answers; pass --api-key KEY "
            f"(or set ${API_KEY_ENV}) or bind 127.0.0.1")


class _Terminated(Exception):
    """SIGTERM, re-raised by uvicorn once its graceful shutdown is over."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        from r4b_edge.errors import BackendUnavailableError

        raise BackendUnavailableError("`r4b-edge serve` needs fastapi and uvicorn: pip install 'r4b-edge[serve]'") from None
    from .common import load_model
    from .server.app import ServerThread, bind_socket, create_app
    from .server.security import AccessPolicy

    sock = bind_socket(args.host, args.port)  # a busy port or a bad --host fails before the model loads
    try:
        model = load_model(args)
    except BaseException:
        sock.close()
        raise
    try:
        from r4b_edge.model.processing import default_max_pixels

        pixels = args.max_image_pixels or default_max_pixels(model.config)
        limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_image_pixels=pixels,
                        max_images=args.max_images, default_max_tokens=args.default_max_tokens,
                        request_timeout=args.request_timeout)
        policy = AccessPolicy(args.host, _names(args.allowed_hosts), _names(args.allowed_origins), args.api_key)
        app = create_app(model, args.model_name, args.max_queue, limits, policy,
                         prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
        warning = exposure_warning(args.host, args.api_key)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        info = model.info()
        budget = ("each image's full grid" if info["image_budget"] is None
                  else f"{info['image_budget']} positions per image")

        def banner() -> None:  # once the socket listens: a script may connect as soon as it reads this
            print(f"r4b-edge serve: {args.model_name} ({info['backend']}/{info['device']}, {info['model']}) "
                  f"on {server.url}/v1  (queue {args.max_queue}, images up to {pixels:,} pixels, {budget}"
                  f"{', API key required' if args.api_key else ''}; Ctrl-C to stop)", flush=True)

        server = ServerThread(app, log_level=args.log_level, max_connections=args.max_connections,
                              request_timeout=args.request_timeout, sock=sock, on_started=banner)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            server.run()  # main thread: uvicorn handles Ctrl-C and SIGTERM, then re-raises the signal
        except (KeyboardInterrupt, _Terminated):
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0
    finally:
        sock.close()
        model.close()
