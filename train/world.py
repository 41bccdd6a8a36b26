"""`r4b-edge train world`: write a split of the synthetic world (r4b_edge/world.py, the
generator the eval set also comes from) to a folder: images/*.png + records.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from r4b_edge.world import FAMILIES, item_id, make_example, render


def write_world(out_dir: str | Path, seed: int, counts: dict[str, int], split: str = "train",
                start: int = 0) -> Path:
    """Render `counts[family]` examples per family into out_dir (images/*.png + records.jsonl)."""
    from .data import make_record, write_jsonl

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for family, n in counts.items():
        for i in range(start, start + n):
            scene, q = make_example(seed, i, family, split)
            name = f"images/{item_id(split, seed, family, i)}.png"
            path = out / name
            if not path.exists():
                render(scene).save(path, optimize=False)
            records.append(make_record(item_id(split, seed, family, i), name, q.question,
                                       q.answer, q.trace or None,
                                       {"tier": q.tier, "family": family, "scene": scene.key(), **q.meta}))
    return write_jsonl(out / "records.jsonl", records)


def main(argv: list[str] | None = None) -> int:
    """`train world`: write a world split to a folder."""
    import argparse

    ap = argparse.ArgumentParser(prog="r4b-edge train world", description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--split", choices=["train", "eval"], default="train")
    ap.add_argument("--per-family", type=int, default=100)
    ap.add_argument("--families", default=",".join(["caption"] + FAMILIES))
    a = ap.parse_args(argv)
    counts = {f: a.per_family for f in a.families.split(",")}
    p = write_world(a.out, a.seed, counts, a.split)
    print(json.dumps({"records": str(p), "n": sum(counts.values())}))
    return 0
