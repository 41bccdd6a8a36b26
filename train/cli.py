"""`r4b-edge train <stage> ...` and `python -m r4b_edge.train <stage> ...`.

Stages: world, check-data, lm, pretrain, anneal, bpo, grpo, eval, ship, reproduce, and plan (the
memory plan of a fine-tune). Each forwards its remaining arguments to the stage's
`main(argv: list[str] | None) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

STAGES: dict[str, tuple[str, str]] = {  # name -> (module, function)
    "world": ("r4b_edge.train.world", "main"),
    "check-data": ("r4b_edge.train.data", "main"),
    "lm": ("r4b_edge.train.lm", "main"),
    "pretrain": ("r4b_edge.train.pretrain", "main"),
    "anneal": ("r4b_edge.train.anneal", "main"),
    "bpo": ("r4b_edge.train.bpo", "main"),
    "grpo": ("r4b_edge.train.bpo", "main_grpo"),
    "eval": ("r4b_edge.train.evaluate", "main"),
    "ship": ("r4b_edge.train.pipeline", "main_ship"),
    "reproduce": ("r4b_edge.train.pipeline", "main"),
    "plan": ("r4b_edge.train.plan", "main"),
}


#: the recipe presets (`Recipe.preset`): the default checkpoint's, and CI's seconds-per-stage one
PRESETS = ("shipped", "micro")


def add_run_flags(p: argparse.ArgumentParser, preset: bool = True) -> None:
    """The flags every stage, `eval`, `reproduce` and `ship` take: the run folder, and (`preset`)
    the recipe preset and `key=value` overrides."""
    p.add_argument("--run-dir", "--run", dest="run", default="runs/shipped",
                   help="training run folder (resumable; holds recipe.json)")
    if preset:
        p.add_argument("--preset", default=PRESETS[0], choices=list(PRESETS))
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")


def stage_main(name: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of a stage (imported lazily: torch loads only when needed)."""
    mod, fn = STAGES[name]
    return getattr(importlib.import_module(mod), fn)


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the `train` verb to the r4b-edge CLI."""
    p = sub.add_parser("train", help="train the small model: " + ", ".join(STAGES),
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="stage arguments (see `train STAGE -h`)")
    p.set_defaults(func=lambda a: stage_main(a.stage)(a.args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m r4b_edge.train`."""
    from r4b_edge.errors import R4BError

    ap = argparse.ArgumentParser(prog="python -m r4b_edge.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        return int(stage_main(a.stage)(a.args) or 0)
    except R4BError as e:
        print(f"r4b-edge train {a.stage}: error: {e}", file=sys.stderr)
        return 1
