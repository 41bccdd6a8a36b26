"""`r4b-edge list`: the models in the store (fetched with `r4b-edge pull`)."""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("list", help="list the models in the model store (r4b-edge pull)", description=__doc__)
    p.add_argument("--json", action="store_true", help="one JSON object per line (name, format, quant, size, ...)")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from r4b_edge import store

    entries = store.list_entries()
    if args.json:
        for e in entries:
            print(json.dumps({**e.to_json(), "path": str(e.path)}))
        return 0
    if not entries:
        print(f"no stored models in {store.models_dir()} (fetch one: r4b-edge pull YannQi/R-4B)")
        return 0
    rows = [("NAME", "FORMAT", "QUANT", "SIZE", "REVISION", "COMMIT")]
    rows += [(e.name, e.format, e.quant or "-", _size(e.size), e.revision, e.commit[:12]) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"store: {store.store_root()}")
    return 0
