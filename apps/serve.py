"""`r4b-edge serve`: an OpenAI-compatible local server (POST /v1/chat/completions).

Reasoning comes back in `reasoning_content`, the answer in `content`; choose the
mode with `reasoning_effort` (none / high) or `chat_template_kwargs.thinking_mode`
(auto / long / short). Images only as data URIs. One model answers one request
at a time; waiting requests sit in a bounded queue (503 when full).
"""
from __future__ import annotations

import argparse
import ipaddress
import sys

from .common import add_model_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible local server", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", default="r4b-edge", help="model id shown by /v1/models (default r4b-edge)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait while one is answered; more get 503 (default 16)")
    p.add_argument("--max-request-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body, images included (default 20)")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000, metavar="N",
                   help="largest image, width x height (default 25,000,000)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    p.add_argument("--default-max-tokens", type=int, default=1024, metavar="N",
                   help="reply bound when a request sends no max_tokens (default 1024)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from r4b_edge.errors import R4BError

    for name in ("max_queue", "max_images", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise R4BError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_request_mb <= 0 or args.max_image_pixels < 1:
        raise R4BError("--max-request-mb and --max-image-pixels must be positive")
    if not 0 <= args.port <= 65535:
        raise R4BError(f"--port must be within 0..65535, got {args.port}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        from r4b_edge.errors import BackendUnavailableError

        raise BackendUnavailableError("`r4b-edge serve` needs fastapi and uvicorn: pip install 'r4b-edge[serve]'") from None
    from .common import load_model
    from .server_app import ServerThread, create_app
    from .server_request import Limits

    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_image_pixels=args.max_image_pixels,
                    max_images=args.max_images, default_max_tokens=args.default_max_tokens)
    model = load_model(args)
    try:
        app = create_app(model, args.model_name, args.max_queue, limits)
        if not _is_loopback(args.host):
            print(f"warning: binding {args.host}: anyone who can reach this address can use the model "
                  "(there is no authentication)", file=sys.stderr)
        server = ServerThread(app, args.host, args.port, log_level=args.log_level,
                              limit_concurrency=max(64, 4 * args.max_queue))
        info = model.info()
        print(f"r4b-edge serve: {args.model_name} ({info['backend']}/{info['device']}, {info['model']}) "
              f"on {server.url}/v1  (queue {args.max_queue}; Ctrl-C to stop)", flush=True)
        try:
            server.server.run(sockets=[server.sock])  # main thread: uvicorn handles Ctrl-C
        except KeyboardInterrupt:  # uvicorn re-raises the signal after a graceful shutdown
            pass
        return 0
    finally:
        model.close()
