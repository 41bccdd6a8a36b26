"""`r4b-edge rm NAME`: delete a model from the store (see `r4b-edge list`)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("rm", help="delete a model from the model store", description=__doc__)
    p.add_argument("name", help="stored name (r4b-edge list), or the repo id when one entry has it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from r4b_edge import store

    e = store.remove(args.name)
    print(f"removed {e.name} ({e.size / 2**20:.1f} MiB) from {store.models_dir()}")
    return 0
