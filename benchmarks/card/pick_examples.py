"""Pick the README's example pair: one question template, two held-out images, one answered
directly and one thought through, both right, by a model in auto mode (greedy).

    python -m r4b_edge.benchmarks.card.pick_examples --model r4b_edge/assets/model \
        --out-dir r4b_edge/assets/examples

Scans the world's held-out `total` items ("Add up all the digits. What is the total?";
`r4b_edge.train.world.eval_items(families=["total"])`, in index order) through the public API
(`r4b_edge.load` + `Model.chat`, mode auto, temperature 0) and keeps the first item answered
directly and right and the first thought through and right with the world's own trace (every
reasoning line as `r4b_edge.train.world` writes it: a right answer after a wrong scan line does not
count). Writes them as `total-direct.png`
and `total-think.png`, asks each written file again (as `r4b-edge chat FILE QUESTION` would) and
fails unless the reply is the same, then prints both replies with their decision and p_think.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

FAMILY = "total"
KINDS = ("direct", "think")
FILE_NAMES = {"direct": "total-direct.png", "think": "total-think.png"}


def level_of(item: dict) -> str:
    """The `total` level of a world item from its digit count ('easy', 'hard' or 'other')."""
    from r4b_edge.train.world import TOTAL_LEVELS

    n = len(item["scene"].digits)
    return next((lv for lv, (ns, _) in TOTAL_LEVELS.items() if n in ns), "other")


def ask(model: Any, image: Any, question: str, max_tokens: int) -> Any:
    """One auto-mode greedy reply (`r4b_edge.engine.events.Result`)."""
    return model.chat(image, question, mode="auto", temperature=0.0, max_tokens=max_tokens)


def _lines(text: str) -> list[str]:
    return [x.strip() for x in text.splitlines() if x.strip()]


def _row(item: dict, r: Any) -> dict:
    return {"id": item["id"], "index": item["index"], "level": level_of(item), "digits": item["scene"].digits,
            "question": item["question"], "gold": item["answer"], "answer": r.answer, "thought": bool(r.thought),
            "p_think": r.p_think, "reasoning": r.reasoning,
            "tokens": r.stats.think_tokens + r.stats.answer_tokens}


def pick(model: Any, items: Sequence[dict], max_tokens: int = 96) -> dict[str, Any]:
    """The first item answered directly and right and the first thought through and right
    whose reasoning is the world's trace, line for line.

    Returns {"direct": row, "think": row, "scanned": n, "tally": {...}}; raises R4BError (with
    the counts) when the scan ends without both."""
    from r4b_edge.errors import R4BError
    from r4b_edge.train.world import check_answer

    found: dict[str, dict] = {}
    tally = {f"{k} {'right' if ok else 'wrong'}": 0 for k in KINDS for ok in (True, False)}
    tally["think right, other trace"] = 0
    scanned = 0
    for it in items:
        if it["family"] != FAMILY:
            raise R4BError(f"item {it['id']} is a {it['family']!r} question; the pair needs {FAMILY!r} items")
        r = ask(model, it["image"], it["question"], max_tokens)
        scanned += 1
        kind, ok = ("think" if r.thought else "direct"), check_answer(r.answer, it["answer"])
        tally[f"{kind} {'right' if ok else 'wrong'}"] += 1
        if ok and kind == "think" and _lines(r.reasoning) != _lines(it["trace"]):
            tally["think right, other trace"] += 1
            continue
        if ok and kind not in found:
            found[kind] = _row(it, r)
        if len(found) == len(KINDS):
            break
    missing = [k for k in KINDS if k not in found]
    if missing:
        counts = ", ".join(f"{v} {k}" for k, v in tally.items())
        raise R4BError(f"no {FAMILY!r} item answered right with decision {' / '.join(missing)} among the "
                       f"{scanned} scanned ({counts}): scan more with --per-family (now {len(items)})")
    return {**found, "scanned": scanned, "tally": tally}


def write_pair(model: Any, picked: dict, items: Sequence[dict], out_dir: Path, max_tokens: int = 96) -> dict[str, Path]:
    """Save the two picked images as PNG in `out_dir`, ask each saved file again and fail
    (R4BError) unless reply and decision are those of the scan."""
    from r4b_edge.errors import R4BError

    by_id = {it["id"]: it for it in items}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in KINDS:
        row = picked[kind]
        path = out_dir / FILE_NAMES[kind]
        by_id[row["id"]]["image"].save(path, format="PNG")
        again = ask(model, str(path), row["question"], max_tokens)
        if (again.answer, bool(again.thought)) != (row["answer"], row["thought"]):
            raise R4BError(f"{path} read back from disk gives answer {again.answer!r} (thought {again.thought}), "
                           f"the scan gave {row['answer']!r} (thought {row['thought']}) for item {row['id']}")
        paths[kind] = path
    return paths


def describe(kind: str, row: dict, path: Path | str) -> str:
    """Two lines for a terminal: what was asked and what the model replied."""
    p = "-" if row["p_think"] is None else f"{row['p_think']:.3f}"
    dec = "thought through" if row["thought"] else "answered directly"
    lines = [f"{path}: {row['id']} ({row['level']}, digits {row['digits']}, gold {row['gold']})",
             f"  {dec}, p_think {p}, {row['tokens']} tokens -> answer {row['answer']!r}"]
    if row["thought"]:
        lines.append("  reasoning: " + " / ".join(x for x in row["reasoning"].splitlines() if x.strip()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r4b_edge.benchmarks.card.pick_examples", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or file (default: the bundled model)")
    ap.add_argument("--backend", default="auto", help="auto (default), torch, llama, onnx")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-family", type=int, default=64, help="held-out total items to scan at most")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the two PNGs go (default: the package's assets/examples)")
    ap.add_argument("--json", type=Path, default=None, help="also write both replies here")
    a = ap.parse_args(argv)
    import r4b_edge
    from r4b_edge.api import ASSETS
    from r4b_edge.errors import R4BError
    from r4b_edge.train.world import eval_items

    if a.per_family < 1 or a.max_tokens < 1:
        raise R4BError(f"--per-family and --max-tokens must be >= 1, got {a.per_family} and {a.max_tokens}")
    out_dir = a.out_dir if a.out_dir is not None else ASSETS / "examples"
    items = eval_items(families=[FAMILY], per_family=a.per_family)
    with r4b_edge.load(a.model, backend=a.backend, device=a.device) as model:
        picked = pick(model, items, a.max_tokens)
        paths = write_pair(model, picked, items, out_dir, a.max_tokens)
        info = model.info()
    print(f"scanned {picked['scanned']} held-out {FAMILY!r} items ({info['backend']}, auto, greedy): "
          + ", ".join(f"{v} {k}" for k, v in picked["tally"].items()))
    for kind in KINDS:
        rel = os.path.relpath(paths[kind])
        print(describe(kind, picked[kind], paths[kind] if rel.startswith("..") else rel))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"model": str(a.model or "bundled"), "backend": info["backend"],
                                      **{k: picked[k] | {"file": str(paths[k])} for k in KINDS},
                                      "scanned": picked["scanned"], "tally": picked["tally"]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from r4b_edge.errors import R4BError

    try:
        sys.exit(main())
    except R4BError as e:  # one line, as the CLI prints its errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
