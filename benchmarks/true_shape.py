"""End to end at R-4B's true vocabulary and width: r4b-edge decode vs raw llama-cpp-python,
greedy and sampled, with the sampling of the raw side done by llama.cpp's own sampler chain.

`r4b-edge bench --true-shape` builds (once, cached in `--roofline-dir`, default
`<cache>/true-shape`) a random-weights R-4B with the true text width (hidden 2560,
intermediate 9728, 32/8 heads, head_dim 128) and the true vocabulary (151,936) but only
`--true-shape-layers` decoder layers (default 2; the 36-layer model is the roofline bench's,
and takes tens of minutes and ~20 GB to build) and a one-layer vision tower, exported to
Q4_K_M GGUF. Fewer layers make each decode step cheaper, so the engine's per-token host cost
weighs *more* in the ratio than at 36 layers: the ratio is a lower bound for the full model.

One process runs, interleaved run by run (rotating the order, so load affects both alike):
- ours: `Engine.stream_prompt` on our llama backend (prompt without a mode suffix, so no
  decision forward; EOS cannot stop a random model's reply early, `max_tokens` does),
  decode tok/s from the engine's `Stats`;
- raw: `llama_cpp.Llama.eval` + `llama_sampler_sample` on a `llama_sampler_chain` (greedy, or
  top-k -> temperature -> top-p -> dist, the order of our sampler and of HF), same GGUF,
  threads, prompt tokens and n_ctx.
Per setting: decode tok/s of both, the per-run-pair ratio ours/raw (median, spread), and the
sampler alone on this model's logits: our numpy sampler vs llama.cpp's chain (ms per call).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .latency import filler_ids, open_backend, run_isolated, summarize

SETTINGS = [
    ("greedy", dict(temperature=0.0)),
    ("temp 0.7 + top-p 0.95", dict(temperature=0.7, top_p=0.95)),
    ("temp 0.6 + top-p 0.95 + top-k 20", dict(temperature=0.6, top_p=0.95, top_k=20)),
]


def world_tokenizer(tok_dir: Path) -> Path:
    """A small BPE tokenizer (512) trained on world questions and answers, for the random
    true-shape checkpoints (their vocabulary is padded to 151,936); kept if already there."""
    from r4b_edge.model.template import CHAT_TEMPLATE
    from r4b_edge.train.tokenizer import save_tokenizer, train_tokenizer
    from r4b_edge.train.world import eval_items

    if not (tok_dir / "tokenizer.json").is_file():
        texts = [f"{it['question']} {it['answer']}" for it in eval_items(per_family=20, seed=1)]
        save_tokenizer(train_tokenizer(texts, vocab_size=512), tok_dir, CHAT_TEMPLATE)
    return tok_dir


def build_worker(p: dict) -> dict:
    """Worker: the random checkpoint with `layers` text layers at the true width and vocabulary,
    then its Q4_K_M GGUF pair (both cached). Returns the text GGUF path."""
    from r4b_edge.export.gguf import export_gguf
    from r4b_edge.export.scale_check import r4b_config, write_random_bf16
    from r4b_edge.model.config import RConfig
    from r4b_edge.model.tokenizer import Tokenizer

    work, layers = Path(p["work"]), int(p["layers"])
    src = work / f"ckpt-{layers}L"
    if not (src / "config.json").is_file():
        tok_dir = world_tokenizer(work / "tokenizer")
        d = r4b_config(151936, Tokenizer.from_dir(tok_dir).image).to_dict()
        d["text_config"]["num_hidden_layers"] = layers
        d["vision_config"]["num_hidden_layers"] = 1
        write_random_bf16(src, RConfig.from_dict(d), tok_dir)
    t0 = time.perf_counter()
    res = export_gguf(src, work / f"gguf-{layers}L-Q4_K_M", quant="Q4_K_M", verify=False)
    return {"path": str(res.text), "export_s": time.perf_counter() - t0}


def _raw_chain(llama_cpp: Any, kw: dict, seed: int) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if kw.get("temperature", 0.0) <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if kw.get("top_k"):
        add(chain, llama_cpp.llama_sampler_init_top_k(int(kw["top_k"])))
    add(chain, llama_cpp.llama_sampler_init_temp(float(kw["temperature"])))
    if kw.get("top_p", 1.0) < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(float(kw["top_p"]), 1))
    add(chain, llama_cpp.llama_sampler_init_dist(int(seed)))
    return chain


def _raw_run(llama_cpp: Any, raw: Any, ids: list[int], n_gen: int, kw: dict, seed: int) -> tuple[float, list]:
    """Raw loop: `Llama.eval` + llama.cpp's sampler chain; returns decode tok/s and the tokens."""
    chain = _raw_chain(llama_cpp, kw, seed)
    try:
        raw.reset()
        raw.eval(ids)
        tok = llama_cpp.llama_sampler_sample(chain, raw.ctx, -1)
        seq = [tok]
        t1 = time.perf_counter()
        for _ in range(n_gen - 1):
            raw.eval([tok])
            tok = llama_cpp.llama_sampler_sample(chain, raw.ctx, -1)
            seq.append(tok)
        return (n_gen - 1) / (time.perf_counter() - t1), seq
    finally:
        llama_cpp.llama_sampler_free(chain)


def _ours_run(engine: Any, prompt: str, n_gen: int, kw: dict, seed: int) -> tuple[float, list]:
    from r4b_edge.engine.generate import GenerationOptions

    res = engine.generate_prompt(prompt, [], GenerationOptions(max_tokens=n_gen, seed=seed, **kw))
    if res.stats.decode_tokens < 2:  # a sampled end-of-text can stop a reply early: tok/s is per token
        raise RuntimeError(f"our reply stopped after {res.stats.decode_tokens} tokens ({res.stats.finish_reason})")
    return res.stats.decode_tps, list(res.token_ids)


def _sampler_costs(llama_cpp: Any, raw: Any, kw: dict, reps: int = 30) -> dict:
    """Per call, on this model's logits: our sampler vs llama.cpp's chain (CPU ms, median)."""
    from r4b_edge.engine.sampling import Sampler, SamplingParams

    n_vocab = raw.n_vocab()
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits(raw.ctx), shape=(n_vocab,))
    ours = Sampler(SamplingParams(seed=0, **kw))
    chain = _raw_chain(llama_cpp, kw, 0)
    t_o, t_r = [], []
    try:
        for _ in range(reps):
            c = time.thread_time()
            ours(row)
            t_o.append(time.thread_time() - c)
            c = time.thread_time()
            llama_cpp.llama_sampler_sample(chain, raw.ctx, -1)
            t_r.append(time.thread_time() - c)
    finally:
        llama_cpp.llama_sampler_free(chain)
    return {"ours_ms": float(np.median(t_o) * 1e3), "llama_chain_ms": float(np.median(t_r) * 1e3)}


def compare_worker(p: dict) -> dict:
    """Worker: ours vs raw per setting, runs interleaved (order rotated)."""
    import llama_cpp

    from r4b_edge.backends.llama_repack import stock_llama_params
    from r4b_edge.engine.generate import Engine

    spec, n_prompt, n_gen, repeats = p["spec"], int(p["n_prompt"]), int(p["n_gen"]), int(p["repeats"])
    threads = spec.get("threads")
    ours = open_backend(spec)
    eng = Engine(ours)
    with stock_llama_params(ours.repack.use_extra_bufts):  # the same weight layout as ours
        raw = llama_cpp.Llama(model_path=str(ours.model_path), n_ctx=ours.n_ctx, n_batch=512, n_ubatch=512,
                              n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False,
                              n_gpu_layers=0 if ours.device == "cpu" else -1)
    ids = filler_ids(ours.tokenizer, n_prompt)
    prompt = ours.tokenizer.decode(ids)
    ids = ours.tokenizer.encode(prompt)  # the exact ids our engine will prefill
    out: dict[str, Any] = {"rows": [], "gguf": str(ours.model_path), "n_vocab": raw.n_vocab()}
    try:
        for name, kw in SETTINGS:
            res: dict[str, list] = {"ours": [], "raw": []}
            same = True
            for r in range(1 + repeats):
                order = ["ours", "raw"] if r % 2 == 0 else ["raw", "ours"]
                seqs = {}
                for who in order:
                    tps, seqs[who] = _ours_run(eng, prompt, n_gen, kw, r) if who == "ours" else \
                        _raw_run(llama_cpp, raw, ids, n_gen, kw, r)
                    if r:
                        res[who].append(tps)
                same = same and seqs["ours"] == seqs["raw"][:len(seqs["ours"])]  # ours may stop at EOS
            raw.reset()
            raw.eval(ids)
            out["rows"].append({"setting": name, "params": kw, "ours_tps": res["ours"], "raw_tps": res["raw"],
                                "same_tokens": same if kw.get("temperature", 0.0) <= 0 else None,
                                "sampler": _sampler_costs(llama_cpp, raw, kw)})
    finally:
        raw.close()
        ours.close()
    return out


def run_true_shape(work: Path, layers: int, threads: int, n_prompt: int = 64, n_gen: int = 32,
                   repeats: int = 5, device: str = "cpu", log: Any = print) -> dict:
    """Build (cached) and compare; returns per-setting medians and per-run-pair ratios."""
    log(f"true shape: random R-4B, {layers} text layers at hidden 2560 / vocab 151936, Q4_K_M, in {work} (cached)")
    b = run_isolated("r4b_edge.benchmarks.true_shape:build_worker", {"work": str(work), "layers": layers},
                     timeout=4 * 3600)
    if "path" not in b:
        return {"skipped": b.get("skipped") or b.get("error")}
    spec = {"backend": "llama", "precision": "Q4_K_M", "path": b["path"], "device": device, "threads": threads}
    out = run_isolated("r4b_edge.benchmarks.true_shape:compare_worker",
                       {"spec": spec, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats},
                       timeout=3600, threads=threads)
    if "rows" not in out:
        return {"skipped": out.get("skipped") or out.get("error")}
    rows = []
    for r in out["rows"]:
        ratios = [a / b for a, b in zip(r["ours_tps"], r["raw_tps"]) if b > 0]
        rows.append({"setting": r["setting"], "params": r["params"], "same_tokens": r["same_tokens"],
                     "ours_tps": summarize(r["ours_tps"]),
                     "raw_tps": summarize(r["raw_tps"]), "ratio": summarize(ratios), "sampler": r["sampler"],
                     "met": summarize(ratios)["median"] >= 0.97})
    return {"layers": layers, "threads": threads, "device": device, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats,
            "gguf": out["gguf"], "n_vocab": out["n_vocab"], "export_s": b.get("export_s"), "rows": rows}


def markdown(d: dict) -> str:
    if "skipped" in d:
        return f"True-shape comparison skipped: {d['skipped']}\n"
    lines = [f"Random R-4B, {d['layers']} text layers at the true width (hidden 2560) and vocabulary "
             f"({d['n_vocab']:,}), Q4_K_M, {d['threads']} thread{'' if d['threads'] == 1 else 's'}, pp {d['n_prompt']} / tg {d['n_gen']}, "
             f"{d['repeats']} interleaved run pairs per setting (median, p25-p75). Raw = `Llama.eval` + "
             "llama.cpp's `llama_sampler_chain`; ours = `Engine.stream_prompt` on the llama backend with "
             "r4b-edge's numpy sampler. Sampler columns: CPU ms per call on this model's logits.", "",
             "| setting | ours tok/s | raw tok/s | ours/raw | our sampler ms | llama.cpp chain ms | >= 0.97 |",
             "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        o, w, q = r["ours_tps"], r["raw_tps"], r["ratio"]
        lines.append(f"| {r['setting']} | {o['median']:.2f} ({o['p25']:.2f}-{o['p75']:.2f}) | {w['median']:.2f} "
                     f"({w['p25']:.2f}-{w['p75']:.2f}) | {q['median']:.3f} ({q['p25']:.3f}-{q['p75']:.3f}) | "
                     f"{r['sampler']['ours_ms']:.3f} | {r['sampler']['llama_chain_ms']:.3f} | "
                     f"{'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"
