"""Greedy parity of accelerated backends against the torch CPU oracle on held-out world items.

`python -m r4b_edge.benchmarks.gpu_parity --model DIR --targets torch:cuda,llama:cuda=PATH.gguf`
prints one JSON line per target: items, identical replies (reasoning + answer), accuracy of each
side, mean decode tok/s. Used by benchmarks/gpu_check.sh on a GPU machine; runs on any device."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def replies(model: Any, items: list) -> list[tuple[str, str, float]]:
    """(reasoning, answer, decode tok/s) per item, greedy, auto mode."""
    out = []
    for img, q in items:
        r = model.chat(img, q.question, mode="auto", max_tokens=96, temperature=0.0)
        out.append((r.reasoning, r.answer, float(r.stats.decode_tps or 0.0)))
    return out


def main(argv: list[str] | None = None) -> int:
    import r4b_edge
    from r4b_edge.train.world import FAMILIES, check_answer, make_example, render

    ap = argparse.ArgumentParser(prog="gpu_parity", description=__doc__)
    ap.add_argument("--model", required=True, help="R-4B folder (the torch oracle runs it on the CPU)")
    ap.add_argument("--targets", required=True, help="backend:device[=path], comma-separated")
    ap.add_argument("--per-family", type=int, default=5)
    a = ap.parse_args(argv)
    fams = [f for f in FAMILIES if f != "caption"]
    items = []
    for fam in fams:
        for i in range(a.per_family):
            scene, q = make_example(1334, i, fam, "eval")
            items.append((render(scene), q))
    with r4b_edge.load(a.model, backend="torch", device="cpu") as ref_model:
        ref = replies(ref_model, items)
    ok_ref = sum(check_answer(r[1], q.answer) for r, (_, q) in zip(ref, items))
    rc = 0
    for t in a.targets.split(","):
        spec, _, path = t.partition("=")
        backend, _, device = spec.partition(":")
        try:
            with r4b_edge.load(path or a.model, backend=backend, device=device) as m:
                got = replies(m, items)
                info = m.info()
        except Exception as e:  # report and go on: one missing backend must not hide the others
            print(json.dumps({"target": t, "error": f"{type(e).__name__}: {e}"}), flush=True)
            rc = 1
            continue
        same = sum(g[:2] == r[:2] for g, r in zip(got, ref))
        ok = sum(check_answer(g[1], q.answer) for g, (_, q) in zip(got, items))
        tps = sorted(g[2] for g in got)[len(got) // 2]
        print(json.dumps({"target": t, "device": info["device"], "items": len(items), "identical_to_torch_cpu": same,
                          "accuracy": round(ok / len(items), 4), "torch_cpu_accuracy": round(ok_ref / len(items), 4),
                          "median_decode_tps": round(tps, 1)}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
