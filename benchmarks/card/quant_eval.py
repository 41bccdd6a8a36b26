"""Accuracy and think-rate of the GGUF quantizations vs torch on the held-out world
(greedy, auto mode, the same engine for every backend); writes the model card's table.

    python -m r4b_edge.benchmarks.card.quant_eval r4b_edge/assets/model --work /tmp/quant \
        --per-family 25 --out r4b_edge/assets/model/QUANT_GGUF.md

Items are `r4b_edge.train.world.eval_items` (the model card's held-out split, EVAL_SEED); answers are
scored with world.check_answer, as the training eval does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

def run_items(model: Any, items: list[dict], max_tokens: int, mode: str = "auto") -> dict:
    """Accuracy / think-rate / mean tokens overall and per tier, plus the answers."""
    from r4b_edge.train.world import check_answer

    rows = []
    t0 = time.perf_counter()
    for it in items:
        r = model.chat(it["image"], it["question"], mode=mode, max_tokens=max_tokens)
        rows.append((it, check_answer(r.answer, it["answer"]), r.thought,
                     r.stats.think_tokens + r.stats.answer_tokens, r.answer))
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1)}
    for tier in ("perception", "reasoning", "graded", "overall"):
        sel = [x for x in rows if tier == "overall" or x[0]["tier"] == tier]
        if sel:
            out[tier] = {"n": len(sel), "accuracy": sum(x[1] for x in sel) / len(sel),
                         "think_rate": sum(x[2] for x in sel) / len(sel),
                         "mean_tokens": sum(x[3] for x in sel) / len(sel)}
    out["answers"] = [x[4] for x in rows]
    return out


def tiers(r: dict) -> str:
    """'perception | reasoning | graded' accuracy cells ('-' for a tier without items)."""
    return " | ".join(f"{r[t]['accuracy']:.1%}" if t in r else "-" for t in ("perception", "reasoning", "graded"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="folder for the GGUF exports")
    ap.add_argument("--per-family", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--quants", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    a = ap.parse_args(argv)
    import r4b_edge
    from r4b_edge.export.gguf import export_gguf
    from r4b_edge.train.world import eval_items

    items = eval_items(per_family=a.per_family)
    res: dict[str, Any] = {}
    with r4b_edge.load(a.checkpoint, backend="torch", device="cpu") as m:
        res["torch fp32"] = run_items(m, items, a.max_tokens)
    sizes = {}
    for q in a.quants:
        r = export_gguf(a.checkpoint, a.work / q, quant=q)
        sizes[q] = (r.text.stat().st_size + r.mmproj.stat().st_size) / 2**20
        with r4b_edge.load(r.out_dir, backend="llama", device="cpu") as m:
            res[f"GGUF {q} (mmproj {r.mmproj_quant})"] = run_items(m, items, a.max_tokens)
        print(json.dumps({q: {k: v for k, v in res[f'GGUF {q} (mmproj {r.mmproj_quant})'].items()
                              if k != 'answers'}}), flush=True)
    ref = res["torch fp32"]
    lines = [
        "## GGUF quantizations (llama.cpp) vs torch",
        "",
        f"Held-out world eval split, {len(items)} items ({a.per_family} per family), auto mode, greedy, "
        f"max {a.max_tokens} new tokens, CPU. Measured with `python -m r4b_edge.benchmarks.card.quant_eval`.",
        "",
        "| model | files (MiB) | accuracy | delta vs torch | think-rate | delta | perception acc | reasoning acc "
        "| graded acc | mean tokens | answers identical to torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        q = name.split()[1] if name.startswith("GGUF") else None
        same = sum(x == y for x, y in zip(r["answers"], ref["answers"])) / len(items)
        o = r["overall"]
        lines.append(
            f"| {name} | {sizes[q]:.2f} | {o['accuracy']:.1%} | "
            f"{(o['accuracy'] - ref['overall']['accuracy']) * 100:+.1f} pt | {o['think_rate']:.1%} | "
            f"{(o['think_rate'] - ref['overall']['think_rate']) * 100:+.1f} pt | "
            f"{tiers(r)} | {o['mean_tokens']:.1f} | {same:.1%} |" if q else
            f"| {name} | - | {o['accuracy']:.1%} | - | {o['think_rate']:.1%} | - | "
            f"{tiers(r)} | {o['mean_tokens']:.1f} | - |")
    lines += ["", "Targets: Q8_0 within 1 point and Q4_K_M within 3 points of torch (accuracy and think-rate).", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        from r4b_edge.fsutil import atomic_write

        with atomic_write(a.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
        (a.out.with_suffix(".json")).write_text(json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in res.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
