"""llama.cpp's weight repacking on this CPU: prefill and decode speed with the extra buffer types
on and off, side by side, and what the `auto` choice costs (the probe child).

`r4b-edge bench --repack` measures, per GGUF file (the bundled model at Q4_K_M and Q8_0, and the
true-shape model of `bench --true-shape` - R-4B's width 2560 and vocabulary 151,936 with 2 text
layers - at Q4_K_M and Q8_0, both cached in `<cache>`):
- one worker process per file and setting order loads the file twice (repacking on, off) and
  runs prefill of `n_prompt` tokens + `n_gen` greedy decode steps on both, interleaved run by run
  (order rotated), so machine load affects both alike; medians and the per-run-pair ratio
  off/on. A setting whose load or decode crashes (AMX CPUs with repacking on) is reported
  with its signal, not as a number.
- the probe: wall time of `llama_repack.probe` (a fresh child: Python start, llama.cpp load,
  decode of 32 + 4 tokens) per file, the one-time cost `auto` pays per machine and kind of file.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .latency import filler_ids, open_backend, run_isolated, summarize


def _run(be: Any, ids: list[int], n_gen: int) -> tuple[float, float, list[int]]:
    """Prefill tok/s, decode tok/s and the greedy tokens of one run."""
    t0 = time.perf_counter()
    tok = int(np.argmax(be.prefill([ids])))
    t1 = time.perf_counter()
    seq = [tok]
    for _ in range(n_gen):
        tok = int(np.argmax(be.forward_last([tok])))
        seq.append(tok)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n_gen / (t2 - t1), seq


def pair_worker(p: dict) -> dict:
    """Worker: the file loaded with repacking on and off; interleaved prefill + decode runs."""
    spec, n_prompt, n_gen, repeats = p["spec"], int(p["n_prompt"]), int(p["n_gen"]), int(p["repeats"])
    bes = {}
    for setting in ("on", "off"):
        t0 = time.perf_counter()
        bes[setting] = open_backend({**spec, "kwargs": {"repack": setting}})
        bes[setting].load_s = time.perf_counter() - t0
    ids = filler_ids(bes["on"].tokenizer, n_prompt)
    res: dict[str, Any] = {s: {"pp": [], "tg": []} for s in bes}
    same = True
    try:
        for r in range(repeats + 1):  # run 0 warms both up
            seqs = {}
            for s in (("on", "off") if r % 2 else ("off", "on")):
                pp, tg, seqs[s] = _run(bes[s], ids, n_gen)
                if r:
                    res[s]["pp"].append(pp)
                    res[s]["tg"].append(tg)
            same &= seqs["on"] == seqs["off"]
        for s, be in bes.items():
            res[s]["load_s"] = be.load_s
    finally:
        for be in bes.values():
            be.close()
    res["same_tokens"] = same
    return res


def prepare_worker(p: dict) -> dict:
    """Worker: GGUF files of a checkpoint at the given quants (cached)."""
    from r4b_edge.export.gguf import export_gguf

    out = {}
    for q in p["quants"]:
        r = export_gguf(p["src"], Path(p["work"]) / f"{p['name']}-{q}", quant=q, verify=False)
        out[q] = str(r.out_dir)
    return {"paths": out}


def run_repack(work: Path, threads: int, n_prompt: int = 128, n_gen: int = 32, repeats: int = 5,
               layers: int = 2, log: Any = print) -> dict:
    from r4b_edge.api import default_model_path
    from r4b_edge.backends import llama_repack as lr

    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    b = run_isolated("r4b_edge.benchmarks.true_shape:build_worker", {"work": str(work), "layers": layers},
                     timeout=4 * 3600)
    srcs = [("bundled", str(default_model_path()))]
    if "path" in b:
        srcs.append((f"true-shape {layers}L", str(work / f"ckpt-{layers}L")))
    else:
        log(f"true-shape model not built: {b.get('skipped') or b.get('error')}")
    for name, src in srcs:
        got = run_isolated("r4b_edge.benchmarks.repack:prepare_worker",
                           {"src": src, "work": str(work), "name": name.replace(" ", "-"),
                            "quants": ["Q4_K_M", "Q8_0"]},
                           timeout=3600)
        for q, path in (got.get("paths") or {}).items():
            files[f"{name} {q}"] = path
    rows = []
    for label, path in files.items():
        log(f"repack on vs off: {label}")
        text = next(Path(path).glob("model-*.gguf"))
        probes = [lr.probe(text, True, threads=threads) for _ in range(3)]
        spec = {"backend": "llama", "precision": label.split()[-1], "path": path, "device": "cpu", "threads": threads}
        out = run_isolated("r4b_edge.benchmarks.repack:pair_worker",
                           {"spec": spec, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats},
                           timeout=3600, threads=threads)
        row: dict[str, Any] = {"file": label, "size_mb": round(text.stat().st_size / 2**20, 1),
                               "probe_s": summarize([pr.seconds for pr in probes]),
                               "probe_ok": all(pr.ok for pr in probes),
                               "probe": probes[-1].describe()}
        if "on" not in out:
            row["skipped"] = out.get("skipped") or out.get("error")
        else:
            for s in ("on", "off"):
                row[s] = {"pp_tps": summarize(out[s]["pp"]), "tg_tps": summarize(out[s]["tg"]),
                          "load_s": round(out[s]["load_s"], 2)}
            row["pp_off_over_on"] = summarize([a / b for a, b in zip(out["off"]["pp"], out["on"]["pp"])])
            row["tg_off_over_on"] = summarize([a / b for a, b in zip(out["off"]["tg"], out["on"]["tg"])])
            row["same_tokens"] = out["same_tokens"]
        rows.append(row)
    return {"rows": rows, "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats,
            "cpu": lr.cpu_report()}


def markdown(d: dict) -> str:
    c = d["cpu"]
    lines = [f"CPU: {c['cpu']} ({c['machine']}); OS AMX flags: {', '.join(c['os_amx_flags']) or 'none'}; "
             f"llama.cpp AMX kernels: {'yes' if c['llama_amx'] else 'no'}; llama-cpp-python {c['llama_cpp_python']}; "
             f"{d['threads']} thread(s), prefill {d['n_prompt']} tokens, decode {d['n_gen']}, {d['repeats']} runs "
             "per setting, interleaved; medians.", "",
             "| file | size MB | prefill tok/s on | off | off/on | decode tok/s on | off | off/on | same tokens "
             "| probe s (median of 3) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['file']} | {r['size_mb']} | {r['skipped']} | | | | | | | "
                         f"{r['probe_s']['median']:.2f} |")
            continue
        on, off = r["on"], r["off"]
        lines.append(f"| {r['file']} | {r['size_mb']} | {on['pp_tps']['median']:.1f} | {off['pp_tps']['median']:.1f} | "
                     f"{r['pp_off_over_on']['median']:.3f} | {on['tg_tps']['median']:.1f} | "
                     f"{off['tg_tps']['median']:.1f} | {r['tg_off_over_on']['median']:.3f} | "
                     f"{'yes' if r['same_tokens'] else 'no'} | {r['probe_s']['median']:.2f} |")
    return "\n".join(lines) + "\n"
