"""`r4b-edge eval ...` = `r4b-edge train eval ...` (held-out world evaluation)."""
from __future__ import annotations

import argparse

from .cli import add_run_flags


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """`eval`'s flags (`r4b-edge eval` and `r4b-edge train eval`): the run flags, --out, --models."""
    add_run_flags(p)
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--models", default="anneal,bpo,grpo", help="stage models to evaluate")


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the `eval` verb to the r4b-edge CLI (same flags as `train eval`)."""
    p = sub.add_parser("eval", help="evaluate trained stage models on the held-out world split",
                       description="Accuracy, think-rate, mean output tokens and time-to-answer per "
                                   "model x mode x tier; writes results.json/.md and PNG plots.")
    add_eval_flags(p)

    def run(a: argparse.Namespace) -> int:
        from .evaluate import main

        argv = ["--run-dir", a.run, "--preset", a.preset, "--models", a.models]
        if a.set:
            argv += ["--set", *a.set]
        if a.out:
            argv += ["--out", a.out]
        return main(argv)

    p.set_defaults(func=run)
