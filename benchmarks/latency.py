"""llama-bench-like latency on the Backend contract, one fresh process per configuration.

A configuration is a backend x precision (a `spec` dict: backend, precision, path, device,
threads). Each run prefills `n_prompt` text tokens (plus, optionally, one world image in the
middle of the prompt), samples the first token greedily, then decodes `n_gen` more tokens with
`forward()` (EOS ignored, as llama-bench does). Per run the figures go into the engine's own
`Stats` (the object the API returns); the worker reports every run, the parent summarises them
(median, quartiles, min/max). Every configuration runs in its own subprocess, so the peak RSS
is that configuration's alone.

The worker protocol is shared by `modes` and `baselines`: `run_isolated("module:function",
payload)` starts `python -m r4b_edge.benchmarks.latency module:function`, sends the payload as
JSON on stdin and reads one tagged JSON line back from stdout.
"""
from __future__ import annotations

from r4b_edge.engine.memory import peak_rss_mb  # VmHWM on Linux
from r4b_edge.errors import describe_exit

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

RESULT_TAG = "@@R4B_BENCH_RESULT "
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}
_FILLER = ("What is the sum of all the digits? How many shapes are there? What colour is the item in "
           "the top-left cell? Which row has the larger digit sum? Describe the image. ")


class BenchSkip(Exception):
    """A configuration that cannot run here; the reason goes into the JSON as `skipped`."""


# ---- statistics ------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median with its spread: quartiles (p25/p75), min, max and the count."""
    v = sorted(float(x) for x in values)
    if not v:
        return {"median": 0.0, "p25": 0.0, "p75": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    q = np.percentile(np.asarray(v), [25, 50, 75])
    return {"median": float(q[1]), "p25": float(q[0]), "p75": float(q[2]), "min": v[0], "max": v[-1],
            "n": len(v)}


def aggregate_runs(runs: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Summaries of the per-run latency figures (`Stats` dicts plus `prefill_tps`)."""
    keys = ("vision_encode_ms", "prefill_ms", "prefill_tps", "ttft_ms", "decode_tps", "decode_ms", "total_ms")
    return {k: summarize([r[k] for r in runs if k in r]) for k in keys}


# ---- subprocess isolation ----------------------------------------------------------------------
def run_isolated(target: str, payload: dict, timeout: float = 900.0, threads: int | None = None) -> dict:
    """Run `module:function(payload)` in a fresh Python process; returns its dict, or
    `{"error": ...}` when it failed, timed out or was skipped (`{"skipped": reason}`)."""
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        proc = subprocess.run([sys.executable, "-m", "r4b_edge.benchmarks.latency", target],
                              input=json.dumps(payload), capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-3:]
    why = f"worker {describe_exit(proc.returncode)}" + (f": {' | '.join(tail)}" if tail else "")
    if proc.returncode < 0 and "llama" in json.dumps(payload):  # a native crash in llama.cpp
        from r4b_edge.backends.llama_repack import crash_hint

        why += f"; {crash_hint(proc.returncode)}"
    return {"error": why}


def _worker_main(argv: Sequence[str]) -> int:
    target = argv[0]
    payload = json.loads(sys.stdin.read() or "{}")
    mod_name, fn_name = target.split(":")
    from r4b_edge.benchmarks.latency import BenchSkip as Skip  # not __main__'s copy of the class

    try:
        out = getattr(importlib.import_module(mod_name), fn_name)(payload)
    except Skip as e:
        out = {"skipped": str(e)}
    except Exception as e:  # reported in the JSON, never silently dropped
        traceback.print_exc(file=sys.stderr)
        out = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(RESULT_TAG + json.dumps(out, default=str) + "\n")
    sys.stdout.flush()
    return 0


# ---- inputs ----------------------------------------------------------------------------------
def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (when torch is already imported or needed)."""
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def open_backend(spec: dict) -> Any:
    """Load the configuration's backend with its precision and thread count."""
    from r4b_edge.backends import create_backend

    name, threads = spec["backend"], spec.get("threads")
    kw: dict[str, Any] = dict(spec.get("kwargs") or {})
    if threads:
        kw["threads"] = int(threads)  # every backend takes `threads` (torch included)
    if name == "torch":
        kw.setdefault("dtype", TORCH_DTYPES.get(spec.get("precision", "fp32"), "float32"))
    return create_backend(spec["path"], backend=name, device=spec.get("device", "cpu"), **kw)


def filler_ids(tokenizer: Any, n: int) -> list[int]:
    """`n` ordinary (non-special) token ids of world-like text, deterministic."""
    special = set(getattr(tokenizer, "special_ids", ()) or ())
    base = [t for t in tokenizer.encode(_FILLER) if t not in special]
    if not base:
        raise BenchSkip("the tokenizer encodes the filler text to special tokens only")
    return (base * (n // len(base) + 1))[:n]


def world_images(config: Any, n: int, seed: int = 7, image_tokens: int | None = None) -> list[Any]:
    """`n` distinct prepared world images (distinct, so the backend's image cache never hits),
    tiled within `image_tokens` positions (None: the full grid)."""
    from r4b_edge.model.processing import prepare_image
    from r4b_edge.train.world import make_example, render

    return [prepare_image(render(make_example(seed, i, "caption", "eval")[0]), config, image_tokens)
            for i in range(n)]


def spec_budget(spec: dict, be: Any) -> int | None:
    """The configuration's image budget (--image-tokens) resolved for its backend's device and threads."""
    from r4b_edge.model.image_budget import resolve_image_tokens

    return resolve_image_tokens(spec.get("image_tokens", "auto"), be.device, getattr(be, "threads", None))




# ---- the pp/tg worker --------------------------------------------------------------------------
def pp_tg_worker(p: dict) -> dict:
    """Worker: load one configuration, then warm-up + repeated prefill/decode runs."""
    from r4b_edge.engine.events import Stats

    n_prompt, n_gen, image = int(p["n_prompt"]), int(p["n_gen"]), bool(p.get("image"))
    warmup, repeats = int(p.get("warmup", 1)), int(p.get("repeats", 3))
    t0 = time.perf_counter()
    be = open_backend(p["spec"])
    load_ms = (time.perf_counter() - t0) * 1000.0
    rss_loaded = peak_rss_mb()
    try:
        imgs = world_images(be.config, warmup + repeats, seed=int(p.get("seed", 7)),
                            image_tokens=spec_budget(p["spec"], be)) if image else []
        n_img = be.image_token_count(imgs[0]) if imgs else 0
        need = n_prompt + n_img + n_gen + 2
        if need > be.n_ctx:
            raise BenchSkip(f"pp{n_prompt}+image {n_img}+tg{n_gen} needs {need} positions but the model's "
                            f"context is {be.n_ctx}: use smaller -p/-n")
        ids = filler_ids(be.tokenizer, n_prompt)
        runs = []
        for r in range(warmup + repeats):
            segs: list = [ids[: n_prompt // 2], imgs[r], ids[n_prompt // 2:]] if imgs else [ids]
            segs = [s for s in segs if not isinstance(s, list) or s]
            t_start = time.perf_counter()
            logits = be.prefill(segs)
            tok = int(np.argmax(logits))
            t_first = time.perf_counter()
            tm = be.timings
            n_prefilled = be.n_past
            for _ in range(n_gen):
                tok = int(np.argmax(be.forward([tok])[-1]))
            t_end = time.perf_counter()
            st = Stats(image_tokens=tm.image_tokens, prompt_tokens=n_prefilled,
                       vision_encode_ms=tm.vision_encode_ms, prefill_ms=tm.prefill_ms,
                       ttft_ms=(t_first - t_start) * 1000.0, decode_tokens=n_gen,
                       decode_ms=(t_end - t_first) * 1000.0,
                       decode_tps=n_gen / (t_end - t_first) if n_gen else 0.0,
                       total_ms=(t_end - t_start) * 1000.0, peak_rss_mb=peak_rss_mb(),
                       backend=be.name, device=be.device)
            row = asdict(st)
            row["prefill_tps"] = n_prefilled / (tm.prefill_ms / 1000.0) if tm.prefill_ms > 0 else 0.0
            if r >= warmup:
                runs.append(row)
        info = be.info()
        info_d = {"name": info.name, "device": info.device, "precision": info.precision,
                  **{k: v for k, v in (info.extra or {}).items() if isinstance(v, (int, float, str, bool))}}
    finally:
        be.close()
    return {"runs": runs, "load_ms": load_ms, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "image_tokens": n_img, "info": info_d}


def run_latency(spec: dict, n_prompt: int, n_gen: int, image: bool, warmup: int, repeats: int,
                timeout: float = 900.0) -> dict:
    """One latency configuration in a fresh process; returns the JSON row (with `skipped`
    or `error` instead of figures when it could not run)."""
    row: dict[str, Any] = {"backend": spec["backend"], "precision": spec["precision"], "n_prompt": n_prompt,
                           "n_gen": n_gen, "image": image, "repeats": repeats, "warmup": warmup,
                           "threads": spec.get("threads")}
    out = run_isolated("r4b_edge.benchmarks.latency:pp_tg_worker",
                       {"spec": spec, "n_prompt": n_prompt, "n_gen": n_gen, "image": image,
                        "warmup": warmup, "repeats": repeats}, timeout=timeout, threads=spec.get("threads"))
    if "runs" not in out:
        row["skipped"] = out.get("skipped") or out.get("error") or "unknown failure"
        return row
    row.update({"image_tokens": out["image_tokens"], "load_ms": out["load_ms"],
                "rss_after_load_mb": out["rss_after_load_mb"], "peak_rss_mb": out["peak_rss_mb"],
                "info": out["info"], "metrics": aggregate_runs(out["runs"])})
    return row


if __name__ == "__main__":  # the worker entry point
    sys.exit(_worker_main(sys.argv[1:]))
