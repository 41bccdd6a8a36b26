"""`r4b-edge eval ...` = `r4b-edge train eval ...` (held-out world evaluation)."""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the `eval` verb to the r4b-edge CLI (same flags as `train eval`)."""
    p = sub.add_parser("eval", help="evaluate trained stage models on the held-out world split",
                       description="Accuracy, think-rate, mean output tokens and time-to-answer per "
                                   "model x mode x tier; writes results.json/.md and PNG plots.")
    p.add_argument("--run-dir", "--run", dest="run", default="runs/shipped", help="training run folder")
    p.add_argument("--preset", default="shipped", choices=["shipped", "micro"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--models", default="anneal,bpo,grpo", help="stage models to evaluate")

    def run(a: argparse.Namespace) -> int:
        from .evaluate import main

        argv = ["--run-dir", a.run, "--preset", a.preset, "--models", a.models]
        if a.set:
            argv += ["--set", *a.set]
        if a.out:
            argv += ["--out", a.out]
        return main(argv)

    p.set_defaults(func=run)
