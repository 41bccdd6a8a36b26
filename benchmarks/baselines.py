"""Side-by-side baselines: raw llama-cpp-python, memory bandwidth, and the decode roofline.

- `overhead`: our llama backend vs a raw `llama_cpp.Llama` on the same text GGUF, same prompt
  tokens, same greedy tokens, same threads / n_ctx / n_batch, interleaved run by run in one
  process (so load affects both alike): ratios of decode tok/s and of time to first token.
- `bandwidth`: a numpy copy benchmark on buffers far larger than the caches, best of N,
  single-threaded and one thread per core; bytes counted as read + written (STREAM "copy").
- `roofline` (opt-in, `--roofline`): a random-weights R-4B at its true shapes (Qwen3-4B text,
  SigLIP-So400m), written shard by shard by `export.scale_check` (never whole in memory),
  exported by `export_gguf` to F16 and Q4_K_M; text-only decode tok/s is compared with
  bandwidth / bytes-read-per-token (every weight once, the token embedding one row, plus the
  f16 KV cache at the mean context).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .latency import filler_ids, open_backend, peak_rss_mb, run_isolated, summarize


# ---- memory bandwidth ----------------------------------------------------------------------------
def _copy_gbps(src: np.ndarray, dst: np.ndarray, threads: int, repeats: int) -> float:
    n = src.size
    cuts = np.linspace(0, n, threads + 1).astype(np.int64)

    def part(i: int) -> None:
        np.copyto(dst[cuts[i]:cuts[i + 1]], src[cuts[i]:cuts[i + 1]])

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if threads == 1:
            np.copyto(dst, src)
        else:
            ts = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * src.nbytes / best / 1e9


def memory_bandwidth(mib: int = 512, repeats: int = 7, threads: int | None = None) -> dict[str, Any]:
    """Copy bandwidth in GB/s (read + write bytes, best of `repeats`) with 1 thread and with
    `threads` (default: all cores); `gbps` is the larger, the roofline's ceiling."""
    threads = int(threads or os.cpu_count() or 1)
    src = np.ones(mib << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # fault the pages in
    single = _copy_gbps(src, dst, 1, repeats)
    multi = _copy_gbps(src, dst, threads, repeats) if threads > 1 else single
    return {"buffer_mib": mib, "repeats": repeats, "threads": threads, "gbps_1_thread": single,
            "gbps_all_threads": multi, "gbps": max(single, multi), "method": "numpy copyto, best of N, 2 x bytes"}


# ---- raw llama-cpp-python vs our backend ---------------------------------------------------------
def _raw_run(llama_cpp: Any, raw: Any, ids: list[int], n_gen: int) -> tuple[float, float, list[int]]:
    """Raw llama-cpp-python greedy loop: `Llama.eval` + argmax of the last logits."""
    n_vocab = raw.n_vocab()
    raw.reset()
    t0 = time.perf_counter()
    raw.eval(ids)
    tok = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(raw.ctx), shape=(n_vocab,))))
    t1 = time.perf_counter()
    seq = [tok]
    for _ in range(n_gen):
        raw.eval([tok])
        tok = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(raw.ctx), shape=(n_vocab,))))
        seq.append(tok)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000.0, n_gen / (t2 - t1), seq


def _ours_run(be: Any, ids: list[int], n_gen: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    tok = int(np.argmax(be.prefill([ids])))
    t1 = time.perf_counter()
    seq = [tok]
    for _ in range(n_gen):
        tok = int(np.argmax(be.forward([tok])[-1]))
        seq.append(tok)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000.0, n_gen / (t2 - t1), seq


def overhead_worker(p: dict) -> dict:
    """Worker: our llama backend and raw `llama_cpp.Llama` on the same GGUF, runs interleaved.
    Two raw variants: `raw` (Llama's defaults: flash attention off) and `raw_fa` (flash
    attention on, which llama.cpp's AUTO default, used by our backend, picks on CPU)."""
    import llama_cpp

    from r4b_edge.backends.llama_repack import stock_llama_params

    spec, n_prompt, n_gen = p["spec"], int(p["n_prompt"]), int(p["n_gen"])
    warmup, repeats, threads = int(p.get("warmup", 1)), int(p.get("repeats", 5)), spec.get("threads")
    ours = open_backend(spec)
    text_gguf = str(ours.model_path)
    with stock_llama_params(ours.repack.use_extra_bufts):  # the same weight layout as ours
        raws = {name: llama_cpp.Llama(model_path=text_gguf, n_ctx=ours.n_ctx, n_batch=512, n_ubatch=512,
                                      n_threads=threads, n_threads_batch=threads, flash_attn=fa, verbose=False)
                for name, fa in (("raw", False), ("raw_fa", True))}
    ids = filler_ids(ours.tokenizer, n_prompt)
    res: dict[str, list] = {f"{k}_{m}": [] for k in ("ours", *raws) for m in ("ttft", "tps")}
    same = True
    try:
        names = ["ours", *raws]
        for r in range(warmup + repeats):
            seqs = {}
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order: no position bias
                if name == "ours":
                    ttft, tps, seqs[name] = _ours_run(ours, ids, n_gen)
                else:
                    ttft, tps, seqs[name] = _raw_run(llama_cpp, raws[name], ids, n_gen)
                if r >= warmup:
                    res[f"{name}_ttft"].append(ttft)
                    res[f"{name}_tps"].append(tps)
            same = same and seqs["raw"] == seqs["ours"] == seqs["raw_fa"]
    finally:
        for raw in raws.values():
            raw.close()
        ours.close()
    return {"runs": res, "same_tokens": same, "gguf": text_gguf, "n_ctx": ours.n_ctx}


def run_overhead(spec: dict, n_prompt: int, n_gen: int, warmup: int, repeats: int,
                 timeout: float = 1800.0) -> dict:
    """Ratios ours/raw of decode tok/s and TTFT (target: decode >= 0.97x vs Llama's defaults);
    `decode_ratio_fa` compares with raw at our attention setting (the wrapper's own overhead)."""
    row: dict[str, Any] = {"backend": "llama", "precision": spec["precision"], "n_prompt": n_prompt,
                           "n_gen": n_gen, "repeats": repeats, "threads": spec.get("threads")}
    out = run_isolated("r4b_edge.benchmarks.baselines:overhead_worker",
                       {"spec": spec, "n_prompt": n_prompt, "n_gen": n_gen, "warmup": warmup,
                        "repeats": repeats}, timeout=timeout, threads=spec.get("threads"))
    if "runs" not in out:
        row["skipped"] = out.get("skipped") or out.get("error") or "unknown failure"
        return row
    r = out["runs"]

    def ratios(a: str, b: str) -> dict:  # per-run pairs: runs are interleaved, pairing removes drift
        return summarize([x / y for x, y in zip(r[a], r[b]) if y > 0])

    row.update({"gguf": out["gguf"], "same_tokens": out["same_tokens"],
                "metrics": {k: summarize(v) for k, v in r.items()},
                "decode_ratio": ratios("ours_tps", "raw_tps"), "ttft_ratio": ratios("ours_ttft", "raw_ttft"),
                "decode_ratio_fa": ratios("ours_tps", "raw_fa_tps"),
                "ttft_ratio_fa": ratios("ours_ttft", "raw_fa_ttft")})
    return row


# ---- roofline model --------------------------------------------------------------------------------
def bytes_per_token(gguf_path: str | Path, config: Any, context: int) -> dict[str, int]:
    """Bytes a decode step reads: every weight tensor once (the token embedding one row) plus
    the f16 KV cache of `context` positions."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    weights = 0
    for t in reader.tensors:
        nb = int(t.n_bytes)
        weights += nb // int(config.vocab_size) if t.name == "token_embd.weight" else nb
    tc = config.text_config
    head_dim = int(tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"])
    kv = 2 * int(tc["num_hidden_layers"]) * int(tc["num_key_value_heads"]) * head_dim * 2 * int(context)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def roofline_worker(p: dict) -> dict:
    """Worker: decode tok/s of one roofline GGUF (text only) with its bytes per token."""
    be = open_backend(p["spec"])
    n_prompt, n_gen, repeats = int(p["n_prompt"]), int(p["n_gen"]), int(p.get("repeats", 3))
    try:
        ids = filler_ids(be.tokenizer, n_prompt)
        tps, ttft = [], []
        for r in range(1 + repeats):
            t0 = time.perf_counter()
            tok = int(np.argmax(be.prefill([ids])))
            t1 = time.perf_counter()
            for _ in range(n_gen):
                tok = int(np.argmax(be.forward([tok])[-1]))
            t2 = time.perf_counter()
            if r:
                tps.append(n_gen / (t2 - t1))
                ttft.append((t1 - t0) * 1000.0)
        bpt = bytes_per_token(be.model_path, be.config, n_prompt + n_gen // 2)
    finally:
        be.close()
    return {"decode_tps": tps, "ttft_ms": ttft, "bytes_per_token": bpt, "peak_rss_mb": peak_rss_mb()}


def roofline_export_worker(p: dict) -> dict:
    """Worker: the random true-shape checkpoint (helper `export.scale_check`, written shard by
    shard in bf16) and its GGUF exports; returns the text GGUF paths or per-quant errors."""
    from r4b_edge.export.gguf import export_gguf
    from r4b_edge.export.scale_check import r4b_config, write_random_bf16
    from r4b_edge.model.tokenizer import Tokenizer

    from .true_shape import world_tokenizer

    work = Path(p["work"])
    src = work / "ckpt"
    if not (src / "config.json").is_file():
        tok_dir = world_tokenizer(work / "tokenizer")
        write_random_bf16(src, r4b_config(151936, Tokenizer.from_dir(tok_dir).image), tok_dir)
    out = {}
    for q in p["quants"]:
        t0 = time.perf_counter()
        try:
            res = export_gguf(src, work / f"gguf-{q}", quant=q, verify=False)
            out[q] = {"path": str(res.text), "export_s": time.perf_counter() - t0, "reused": res.skipped}
        except Exception as e:  # reported per quant
            out[q] = {"error": f"{type(e).__name__}: {e}"}
    return {"exports": out}


def run_roofline(work: Path, quants: Sequence[str], bandwidth_gbps: float, threads: int, n_prompt: int = 64,
                 n_gen: int = 16, repeats: int = 3, log: Any = print) -> dict:
    """Build (once, cached) the random true-shape model, export each quant, measure decode."""
    log(f"roofline: random R-4B-shape checkpoint + GGUF {', '.join(quants)} in {work} (cached; first time: "
        "~30 GB of disk and tens of minutes)")
    ex = run_isolated("r4b_edge.benchmarks.baselines:roofline_export_worker",
                      {"work": str(work), "quants": list(quants)}, timeout=4 * 3600)
    if "exports" not in ex:
        return {"skipped": ex.get("skipped") or ex.get("error"), "rows": []}
    rows = []
    for q in quants:
        e = ex["exports"][q]
        if "path" not in e:
            rows.append({"quant": q, "skipped": f"export failed: {e.get('error')}"})
            continue
        spec = {"backend": "llama", "precision": q, "path": e["path"], "device": "cpu", "threads": threads}
        out = run_isolated("r4b_edge.benchmarks.baselines:roofline_worker",
                           {"spec": spec, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats},
                           timeout=3600, threads=threads)
        if "decode_tps" not in out:
            rows.append({"quant": q, "skipped": out.get("skipped") or out.get("error")})
            continue
        bpt = out["bytes_per_token"]
        ceiling = bandwidth_gbps * 1e9 / bpt["total"]
        dec = summarize(out["decode_tps"])
        one = None
        if threads > 1:  # thread scaling: near-linear means compute-bound, flat means bandwidth-bound
            one = run_isolated("r4b_edge.benchmarks.baselines:roofline_worker",
                               {"spec": {**spec, "threads": 1}, "n_prompt": 16, "n_gen": 8, "repeats": 2},
                               timeout=3600, threads=1)
        rows.append({"quant": q, "gguf_bytes": Path(e["path"]).stat().st_size, "export_s": e["export_s"],
                     "bytes_per_token": bpt, "roofline_tps": ceiling, "decode_tps": dec,
                     "ttft_ms": summarize(out["ttft_ms"]), "fraction_of_roofline": dec["median"] / ceiling,
                     "peak_rss_mb": out["peak_rss_mb"],
                     "decode_tps_1_thread": summarize(one["decode_tps"]) if one and "decode_tps" in one else None})
    overhead = None
    q4 = ex["exports"].get("Q4_K_M", {})
    if "path" in q4:
        log("roofline: our llama backend vs raw llama-cpp-python on the 4B-shape Q4_K_M")
        spec = {"backend": "llama", "precision": "Q4_K_M", "path": q4["path"], "device": "cpu", "threads": threads}
        overhead = run_overhead(spec, n_prompt, n_gen, 1, repeats, timeout=3600) | {"model": "roofline"}
    return {"overhead": overhead,
            "model": "random-weights R-4B at its true shapes (Qwen3-4B text: hidden 2560, 36 layers, 32/8 heads, "
                     "head_dim 128, intermediate 9728, vocab 151936; SigLIP-So400m tower), text GGUF decoded",
            "work": str(work),
            "n_prompt": n_prompt, "n_gen": n_gen, "threads": threads, "bandwidth_gbps": bandwidth_gbps,
            "rows": rows}
