"""Greedy parity of accelerated backends against the torch CPU oracle on held-out world items.

`python -m r4b_edge.benchmarks.card.gpu_parity --model DIR --targets torch:cuda,llama:cuda=PATH.gguf`
prints one JSON line per target: items, identical replies (reasoning + answer), accuracy of each
side, median decode tok/s. Used by benchmarks/gpu_check.sh on a GPU machine; runs on any device.

`--save-reference F` writes the oracle's replies to F; `--reference F` reads them instead of
running torch, so a target runs in a process where torch was never imported (llama.cpp's CUDA
build and torch's CUDA libraries in one process are a suspect for the segfault seen on the H200;
gpu_check.sh runs it under `python3 -X faulthandler`, so a segfault prints the Python stack)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def replies(model: Any, items: list) -> list[tuple[str, str, float]]:
    """(reasoning, answer, decode tok/s) per item, greedy, auto mode."""
    out = []
    for it in items:
        r = model.chat(it["image"], it["question"], mode="auto", max_tokens=96, temperature=0.0)
        out.append((r.reasoning, r.answer, float(r.stats.decode_tps or 0.0)))
    return out


def oracle(model: str, items: list, reference: str | None, per_family: int) -> list[tuple[str, str, float]]:
    """The torch CPU replies: run them, or read them from a --save-reference file."""
    if reference is None:
        import r4b_edge

        with r4b_edge.load(model, backend="torch", device="cpu") as m:
            return replies(m, items)
    try:
        saved = json.loads(Path(reference).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"gpu_parity: cannot read --reference {reference}: {e}; write it with --save-reference")
    if saved.get("per_family") != per_family or len(saved.get("replies", [])) != len(items):
        raise SystemExit(f"gpu_parity: {reference} holds {len(saved.get('replies', []))} replies at --per-family "
                         f"{saved.get('per_family')}, this run asks {len(items)} at {per_family}; rerun --save-reference")
    return [tuple(r) for r in saved["replies"]]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    import r4b_edge
    from r4b_edge.train.world import check_answer, eval_items

    ap = argparse.ArgumentParser(prog="gpu_parity", description=__doc__)
    ap.add_argument("--model", required=True, help="R-4B folder (the torch oracle runs it on the CPU)")
    ap.add_argument("--targets", required=True, help="backend:device[=path], comma-separated")
    ap.add_argument("--per-family", type=int, default=5)
    ref_io = ap.add_mutually_exclusive_group()
    ref_io.add_argument("--save-reference", metavar="FILE", help="write the oracle's replies here (JSON)")
    ref_io.add_argument("--reference", metavar="FILE", help="read the oracle's replies from here instead of running torch")
    a = ap.parse_args(argv)
    items = eval_items(per_family=a.per_family)
    ref = oracle(a.model, items, a.reference, a.per_family)
    if a.save_reference:
        Path(a.save_reference).write_text(json.dumps({"per_family": a.per_family, "replies": ref}))
    ok_ref = sum(check_answer(r[1], it["answer"]) for r, it in zip(ref, items))
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
        ok = sum(check_answer(g[1], it["answer"]) for g, it in zip(got, items))
        tps = sorted(g[2] for g in got)[len(got) // 2]
        print(json.dumps({"target": t, "device": info["device"], "items": len(items), "identical_to_torch_cpu": same,
                          "accuracy": round(ok / len(items), 4), "torch_cpu_accuracy": round(ok_ref / len(items), 4),
                          "median_decode_tps": round(tps, 1)}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
