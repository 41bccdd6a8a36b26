"""`r4b-edge`: one entry point, one module per verb.

Each verb module defines `register(subparsers)` (cheap: no heavy imports, no optional extra) and
does its work in the function it sets as `func`. Project errors print one line
and exit 1; no traceback reaches the user.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module that registers it
VERBS = {
    "chat": "r4b_edge.apps.chat",
    "info": "r4b_edge.apps.info",
    "serve": "r4b_edge.apps.serve",
    "app": "r4b_edge.apps.desktop",
    "export": "r4b_edge.export.cli",
    "train": "r4b_edge.train.cli",
    "eval": "r4b_edge.train.cli_eval",
    "bench": "r4b_edge.benchmarks.bench",
    "pull": "r4b_edge.export.pull",
    "list": "r4b_edge.apps.store_list",
    "rm": "r4b_edge.apps.store_rm",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r4b-edge",
        description="Run, train, export and benchmark an auto-thinking R-4B-family VLM locally.",
    )
    from r4b_edge import __version__

    parser.add_argument("--version", action="version", version=f"r4b-edge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for module in VERBS.values():
        # registering imports no optional extra (a verb imports those when it runs and names the
        # extra to install), so an import error here is a bug and is raised, never hidden
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from r4b_edge.errors import R4BError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except R4BError as e:
        print(f"r4b-edge {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
