"""Logits of the last position only: `forward(ids)[-1]` (llama.cpp computes and copies every
row) vs `forward_last(ids)` (one row, handed over as a view), on a GGUF at R-4B's vocabulary.

    python -m r4b_edge.benchmarks.last_logits runs/true-shape/gguf-2L-Q4_K_M --threads 2

16 tokens (the size of the budget-closing batch) and 1 token (a decode step), interleaved, 9
rounds; wall ms medians, plus the CPU ms of copying one [vocab] float32 row. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def measure(path: str, threads: int, rounds: int = 9) -> dict:
    from r4b_edge.backends.llama_backend import LlamaBackend

    be = LlamaBackend(path, device="cpu", threads=threads)
    try:
        ids = be.tokenizer.encode("What is the sum of all the digits? How many shapes are there? " * 4)[:64]
        be.prefill([ids[:32]])
        n0 = be.n_past
        chunk = ids[32:48]
        res: dict[str, list] = {"all_rows_16": [], "last_only_16": [], "one_copy": [], "one_view": []}
        for r in range(rounds):
            for pair in (("all_rows_16", "last_only_16"), ("one_copy", "one_view")):
                for kind in (pair if r % 2 == 0 else pair[::-1]):
                    be.truncate(n0)
                    t = time.perf_counter()
                    if kind == "all_rows_16":
                        be.forward(chunk)[-1]
                    elif kind == "last_only_16":
                        be.forward_last(chunk)
                    elif kind == "one_copy":
                        be.forward([ids[40]])
                    else:
                        be.forward_last([ids[40]])
                    res[kind].append((time.perf_counter() - t) * 1e3)
        v = be.forward_last([ids[41]])
        ts = []
        for _ in range(200):
            c = time.thread_time()
            v[None, :].copy()
            ts.append(time.thread_time() - c)
        out = {k: {"median_ms": float(np.median(x)), "min_ms": float(np.min(x)), "max_ms": float(np.max(x))}
               for k, x in res.items()}
        return out | {"copy_one_row_cpu_ms": float(np.median(ts) * 1e3), "n_vocab": int(v.shape[0]),
                      "gguf": str(be.model_path), "threads": threads, "rounds": rounds}
    finally:
        be.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="GGUF file or folder (text model + mmproj)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.gguf, a.threads), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
