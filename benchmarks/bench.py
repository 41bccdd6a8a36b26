"""`r4b-edge bench`: latency, memory and accuracy-per-token for every backend, precision and
mode, with raw llama.cpp, memory bandwidth and (opt-in) the roofline side by side.

    r4b-edge bench --quick                      # CI-sized: one precision per backend, < 2 min
    r4b-edge bench -p 64,256 -n 32,128          # llama-bench-like pp/tg grid
    r4b-edge bench --roofline --out benchmarks/results

Exported artefacts (GGUF quants, ONNX precisions) are made by the exporters into a cache
folder (default runs/bench-cache/) and reused while their manifest says they are up to date.
Backends or precisions that are not installed or cannot be exported are reported as skipped,
with the reason, in the JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from r4b_edge.backends.llama_repack import ENV as REPACK_ENV
from r4b_edge.backends.llama_repack import add_cli_arg as add_repack_arg
from r4b_edge.model.template import API_MODES

from r4b_edge.apps.common import add_load_args

#: --dtype (its canonical name) -> the torch precision the bench names
TORCH_PRECISION_OF = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEFAULT_PRECISIONS = {"torch": "fp32", "llama": "F16,Q8_0,Q4_K_M", "onnx": "fp32,int8,int4"}
QUICK_PRECISIONS = {"torch": "fp32", "llama": "Q4_K_M", "onnx": "int8"}
OVERHEAD_MIN_RUNS = 7  # interleaved ours/raw run pairs behind the headline ratio, --quick too


def register(subparsers: Any) -> None:
    """Add the `bench` verb (no heavy imports here)."""
    p = subparsers.add_parser("bench", help="benchmark backends, quantizations and modes",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="R-4B checkpoint folder (default: the bundled model)")
    p.add_argument("--backends", default="torch,llama,onnx", help="comma list of torch, llama, onnx")
    p.add_argument("--torch-precisions", default=None, help="fp32, bf16, fp16, auto (default fp32; --dtype X: X alone)")
    p.add_argument("--gguf-quants", default=None, help="GGUF quants (default F16,Q8_0,Q4_K_M)")
    p.add_argument("--onnx-precisions", default=None, help="ONNX precisions (default fp32,int8,int4)")
    p.add_argument("--modes", default="auto,think,no-think", help="modes for the accuracy-per-token table")
    p.add_argument("-p", "--n-prompt", default="64,256", help="prompt lengths in tokens (comma list)")
    p.add_argument("-n", "--n-gen", default="64", help="decode lengths in tokens (comma list)")
    p.add_argument("--image", choices=["on", "off", "both"], default="both",
                   help="put one world image in the prompt (vision-encode timing)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per configuration")
    p.add_argument("--eval-per-family", type=int, default=10, help="eval items per question family")
    p.add_argument("--eval-seed", type=int, default=None, help="world seed of the eval split")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="reply bound in the modes table (--quick too: replies cut there are not scored)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: physical cores not busy by the load average; 1 with --quick)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, metal")
    add_load_args(p)
    add_repack_arg(p)
    p.add_argument("--quick", action="store_true", help="one precision per backend, small grid (< 2 min)")
    p.add_argument("--roofline", action="store_true",
                   help="also build a random 4B-shape model (F16 + Q4_K_M GGUF, ~20 GB disk) and compare "
                        "decode with the memory-bandwidth roofline")
    p.add_argument("--roofline-dir", default=None,
                   help="work folder of the roofline model (default <cache>/roofline; the layout of "
                        "`python -m r4b_edge.export.scale_check --work DIR`, whose output it reuses)")
    p.add_argument("--host-overhead", action="store_true",
                   help="only measure the engine's per-token host cost at vocab 151,936 without the model "
                        "forward (sampler, stream decoding, events): writes host_overhead.json/.md into --out")
    p.add_argument("--deadline-sweep", action="store_true",
                   help="only run the deadline sweep (torch fp32 on --model): accuracy and share of answers "
                        "within T against T, on --eval-per-family items per family; writes deadline_sweep.* "
                        "into --out")
    p.add_argument("--deadline-fresh", action="store_true",
                   help="with --deadline-sweep: every T in a fresh process (as a one-shot `chat --deadline`: "
                        "nothing served before it); writes deadline_sweep_fresh.*")
    p.add_argument("--true-shape", action="store_true",
                   help="only compare r4b-edge decode with raw llama-cpp-python (llama.cpp's sampler chain) on a "
                        "random R-4B at the true width and vocabulary, greedy and sampled: writes true_shape.* "
                        "into --out (model cached in --roofline-dir, default <cache>/true-shape)")
    p.add_argument("--repack", action="store_true",
                   help="only measure llama.cpp's weight repacking on this CPU: prefill/decode with it on and off "
                        "side by side (bundled and true-shape models, Q4_K_M and Q8_0) and the auto probe's cost: "
                        "writes repack.json/.md into --out (models cached in --cache)")
    p.add_argument("--true-size", action="store_true",
                   help="only run issue 28's true-size measurement: build (once, cached in --true-size-dir) a "
                        "random full-size R-4B, pull it from a local hub to GGUF Q4_K_M, chat about a 1920x1080 "
                        "photo with two follow-ups per image-token budget, side by side with llama-mtmd-cli and "
                        "llama-server: writes true_size.json/.md into --out (--quick: a tiny model, a harness check)")
    p.add_argument("--true-size-dir", default=None,
                   help="work folder of --true-size (checkpoint, store, images; default <cache>/true-size)")
    p.add_argument("--true-size-budgets", default="auto,729,4501",
                   help="--true-size: image-token budgets, one process each (default auto,729,4501: the default, "
                        "base view only, the photo's full 3x3 grid)")
    p.add_argument("--true-size-build-only", action="store_true", help="--true-size: build the model, measure nothing")
    p.add_argument("--no-scaling", action="store_true",
                   help="--true-size: skip the 1-thread run that measures thread scaling for the 8-core extrapolation")
    p.add_argument("--llama-bin", default=None,
                   help="--true-size: folder with llama-mtmd-cli and llama-server (default $R4B_LLAMA_CPP_BIN, "
                        "else PATH; without them the side-by-side is reported as skipped)")
    p.add_argument("--true-shape-layers", type=int, default=2,
                   help="decoder layers of the --true-shape model (default 2; R-4B has 36)")
    p.add_argument("--no-baselines", action="store_true", help="skip raw llama-cpp-python and bandwidth")
    p.add_argument("--no-modes", action="store_true", help="skip the accuracy-per-token table")
    p.add_argument("--cache", default="runs/bench-cache", help="folder for exported artefacts")
    p.add_argument("--out", default="runs/bench", help="folder for results.json / results.md / *.png")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=main)


# ---- helpers ---------------------------------------------------------------------------------------
def _ints(s: str, what: str) -> list[int]:
    from r4b_edge.errors import R4BError

    try:
        vals = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise R4BError(f"{what} must be a comma list of integers, got {s!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise R4BError(f"{what} must be a comma list of integers >= 0, got {s!r}")
    return vals


def _list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    """Resolve --quick and the defaults into one settings dict (validated)."""
    from r4b_edge.errors import R4BError

    q = a.quick
    backends = _list(a.backends)
    bad = [b for b in backends if b not in DEFAULT_PRECISIONS]
    if bad:
        raise R4BError(f"unknown backend(s) {bad}: use torch, llama, onnx")
    modes = _list(a.modes)
    if any(m not in API_MODES for m in modes):
        raise R4BError(f"--modes takes auto, think, no-think; got {a.modes!r}")
    prec = QUICK_PRECISIONS if q else DEFAULT_PRECISIONS
    if a.dtype is not None and a.torch_precisions:
        raise R4BError("--dtype and --torch-precisions both choose the torch precisions: give one of them")
    dtype = TORCH_PRECISION_OF.get(a.dtype) if a.dtype is not None else None
    s = {
        "backends": backends,
        "precisions": {"torch": _list(dtype or a.torch_precisions or prec["torch"]),
                       "llama": _list(a.gguf_quants or prec["llama"]),
                       "onnx": _list(a.onnx_precisions or prec["onnx"])},
        "modes": modes,
        "n_prompt": [32] if q and a.n_prompt == "64,256" else _ints(a.n_prompt, "-p/--n-prompt"),
        "n_gen": [16] if q and a.n_gen == "64" else _ints(a.n_gen, "-n/--n-gen"),
        "image": {"on": [True], "off": [False], "both": [False, True]}[a.image if not q or a.image != "both" else "on"],
        "repeats": min(a.repeats, 2) if q else a.repeats,
        "warmup": a.warmup,
        "eval_per_family": 1 if q and a.eval_per_family == 10 else a.eval_per_family,
        # --quick keeps the full bound: the bundled model's thinking replies take ~45 tokens, and a
        # reply cut short has no answer to score (the table leaves cut replies out of the accuracy)
        "max_tokens": a.max_tokens,
        "eval_seed": a.eval_seed,
        # under --quick one thread: on a shared 2-core runner, 2 spinning threads per op stall
        "threads": a.threads or (1 if q else auto_threads()),
        "threads_from": "--threads" if a.threads else ("--quick" if q else "auto: idle physical cores"),
        "roofline_dir": a.roofline_dir,
        "device": a.device,
        "quick": q, "roofline": a.roofline, "baselines": not a.no_baselines, "modes_table": not a.no_modes,
        "llama_repack": a.llama_repack or os.environ.get(REPACK_ENV) or "auto",
        # every configuration's image budget (resolved in its worker: "auto" depends on device and threads)
        "image_tokens": "full" if a.image_tokens is None else a.image_tokens,
        "n_ctx": a.n_ctx,
    }
    if s["repeats"] < 1 or s["warmup"] < 0 or s["eval_per_family"] < 1 or s["max_tokens"] < 1:
        raise R4BError("--repeats, --eval-per-family and --max-tokens must be >= 1, --warmup >= 0")
    return s


def auto_threads() -> int:
    """Physical cores not already busy (1-minute load average), at least 1. Decode threads that
    share a core with another busy process stall at every op's barrier: measured here, llama.cpp
    Q4_K_M 4B-shape decode fell from 10 tok/s (1 thread) to 0.6 tok/s (2 threads, one core busy)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    try:
        busy = int(round(os.getloadavg()[0]))
    except OSError:
        busy = 0
    return max(1, cores - busy)


def _model_summary(path: Path) -> dict[str, Any]:
    from r4b_edge.model.config import RConfig

    cfg = RConfig.from_file(path)
    tc = cfg.text_config
    return {"path": str(path), "summary": f"text {tc['num_hidden_layers']} layers x {tc['hidden_size']}, "
            f"vocab {cfg.vocab_size}, vision {cfg.image_size}px/{cfg.patch_size}, "
            f"{'AnyRes' if cfg.anyres else 'base view'}"}


def export_worker(p: dict) -> dict:
    """Worker: run every export job {backend, precision, out} from one checkpoint (one process,
    so torch is imported once and llama.cpp's log stays out of the bench's output)."""
    out = {}
    for job in p["jobs"]:
        key = f"{job['backend']}:{job['precision']}"
        try:
            if job["backend"] == "llama":
                from r4b_edge.export.gguf import export_gguf

                out[key] = {"path": str(export_gguf(p["model"], job["out"], quant=job["precision"]).text)}
            else:
                from r4b_edge.export.onnx import export_onnx

                out[key] = {"path": str(export_onnx(p["model"], job["out"], job["precision"]))}
        except Exception as e:  # reported in the JSON, never silently dropped
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    return {"exports": out}


def prepare_configs(model: Path, s: dict, cache: Path, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """One spec per backend x precision, exporting GGUF/ONNX artefacts into `cache` (reused when
    their manifest says up to date). Returns (specs, skipped)."""
    from r4b_edge.backends import BACKENDS, is_installed

    from .latency import run_isolated

    model = model.resolve()
    root = (cache / f"{model.name}-{hashlib.sha1(str(model).encode()).hexdigest()[:8]}").resolve()
    specs, skipped, jobs = [], [], []

    def skip(backend: str, precision: str, reason: str) -> None:
        skipped.append({"what": f"{backend} {precision}", "backend": backend, "precision": precision,
                        "reason": reason})

    for b in s["backends"]:
        for prec in s["precisions"][b]:
            base = {"backend": b, "precision": prec, "device": s["device"], "threads": s["threads"],
                    "image_tokens": s.get("image_tokens", "auto")}
            if s.get("n_ctx") is not None:
                base["kwargs"] = {"n_ctx": s["n_ctx"]}
            if not is_installed(b):
                skip(b, prec, f"backend not installed: pip install '{BACKENDS[b][1]}'")
            elif b == "torch":
                if prec in ("fp32", "bf16", "fp16", "auto"):
                    specs.append({**base, "path": str(model)})
                else:
                    skip(b, prec, f"unknown torch precision {prec!r}: use fp32, bf16, fp16 or auto")
            else:
                jobs.append({**base, "out": str(root / f"{'gguf' if b == 'llama' else 'onnx'}-{prec}")})
    if jobs:
        log(f"exporting {len(jobs)} artefact(s) into {root} (reused when up to date)")
        res = run_isolated("r4b_edge.benchmarks.bench:export_worker",
                           {"model": str(model), "jobs": [{k: j[k] for k in ("backend", "precision", "out")}
                                                          for j in jobs]}, timeout=4 * 3600)
        for j in jobs:
            e = (res.get("exports") or {}).get(f"{j['backend']}:{j['precision']}") or \
                {"error": res.get("error") or res.get("skipped") or "export did not run"}
            if "path" in e:
                specs.append({k: v for k, v in j.items() if k != "out"} | {"path": e["path"]})
            else:
                skip(j["backend"], j["precision"], f"export failed: {e['error']}")
    order = {(b, p): i for i, (b, p) in enumerate((b, p) for b in s["backends"] for p in s["precisions"][b])}
    specs.sort(key=lambda sp: order[(sp["backend"], sp["precision"])])
    return specs, skipped


# ---- the run ---------------------------------------------------------------------------------------
def run_bench(model: Path, s: dict, cache: Path, out: Path | None, make_plots: bool = True,
              command: str = "", log: Callable[[str], None] | None = None) -> dict:
    """Run everything `s` asks for and return the results document (written to `out`)."""
    from tqdm import tqdm

    from . import baselines, latency, modes, report

    log = log or (lambda m: tqdm.write(m, file=sys.stderr))
    t_start = time.perf_counter()
    machine = report.machine_info()
    specs, skipped = prepare_configs(model, s, cache, log)
    from r4b_edge.train.world import EVAL_SEED

    seed = s.get("eval_seed")
    if seed is None:
        seed = EVAL_SEED  # the model card's held-out split: the modes table asks what `r4b-edge eval` scores
    jobs: list[tuple[str, Any]] = []
    for sp in specs:
        for pp in s["n_prompt"]:
            for tg in s["n_gen"]:
                for img in s["image"]:
                    jobs.append(("latency", (sp, pp, tg, img)))
    if s["modes_table"]:
        jobs += [("modes", sp) for sp in specs]
    if s["baselines"]:
        jobs.append(("bandwidth", None))
        jobs += [("overhead", sp) for sp in specs if sp["backend"] == "llama"]
    if s["roofline"]:
        jobs.append(("roofline", None))
    doc: dict[str, Any] = {
        "schema": report.SCHEMA_NAME, "schema_version": report.SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": s["quick"],
        "command": command, "machine": machine, "model": _model_summary(model),
        "settings": {k: v for k, v in s.items()} | {"eval_seed": seed},
        "configurations": [{"backend": sp["backend"], "precision": sp["precision"], "path": sp["path"],
                            "status": "ok"} for sp in specs]
        + [{"backend": k["backend"], "precision": k["precision"], "status": "skipped", "skipped": k["reason"]}
           for k in skipped],
        "latency": [], "modes": [], "baselines": {"overhead": [], "bandwidth": {}, "roofline": {}},
        "targets": [], "skipped": list(skipped), "duration_s": 0.0,
    }
    bw = None
    bar = tqdm(jobs, desc="bench", unit="config", file=sys.stderr, dynamic_ncols=True)
    for kind, arg in bar:
        if kind == "latency":
            sp, pp, tg, img = arg
            bar.set_postfix_str(f"{sp['backend']} {sp['precision']} pp{pp} tg{tg}{' +img' if img else ''}")
            row = latency.run_latency(sp, pp, tg, img, s["warmup"], s["repeats"])
            doc["latency"].append(row)
        elif kind == "modes":
            bar.set_postfix_str(f"modes {arg['backend']} {arg['precision']}")
            row = modes.run_modes(arg, s["eval_per_family"], seed, s["modes"], s["max_tokens"])
            doc["modes"].append(row)
        elif kind == "bandwidth":
            bar.set_postfix_str("memory bandwidth")
            bw = baselines.memory_bandwidth(mib=256 if s["quick"] else 1024, repeats=3 if s["quick"] else 7,
                                            threads=s["threads"])
            doc["baselines"]["bandwidth"] = bw
            row = None
        elif kind == "overhead":
            bar.set_postfix_str(f"raw llama.cpp {arg['precision']}")
            row = baselines.run_overhead(arg, max(s["n_prompt"]), max(s["n_gen"]), s["warmup"],
                                         max(s["repeats"], OVERHEAD_MIN_RUNS))
            doc["baselines"]["overhead"].append(row)
        else:
            bar.set_postfix_str("roofline")
            if bw is None:
                bw = baselines.memory_bandwidth(threads=s["threads"])
                doc["baselines"]["bandwidth"] = bw
            work = Path(s["roofline_dir"] or cache / "roofline").resolve()
            roof = baselines.run_roofline(work, ["F16", "Q4_K_M"], bw["gbps"], s["threads"], log=log)
            row = roof.pop("overhead", None)
            if row is not None:
                doc["baselines"]["overhead"].append(row)
                kind = "overhead (4B-shape)"
            doc["baselines"]["roofline"] = roof
            for what, why in ([("roofline", roof["skipped"])] if roof.get("skipped") else []) + \
                    [(f"roofline {r['quant']}", r["skipped"]) for r in roof.get("rows", []) if "skipped" in r]:
                doc["skipped"].append({"what": what, "reason": why})
        if row is not None and "skipped" in row:
            what = f"{kind} {row['backend']} {row['precision']}"
            doc["skipped"].append({"what": what, "reason": row["skipped"]})
            log(f"skipped {what}: {row['skipped']}")
    bar.close()
    if not s["baselines"]:
        doc["baselines"]["bandwidth"] = {"skipped": "--no-baselines"}
    if not s["roofline"]:
        doc["baselines"]["roofline"] = {"skipped": "not run (opt-in: --roofline)"}
    doc["targets"] = report.compute_targets(doc)
    try:
        doc["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    doc["duration_s"] = round(time.perf_counter() - t_start, 1)
    if out is not None:
        report.write_outputs(doc, out, make_plots)
    else:
        report.validate(doc)
    return doc


def _command(args: argparse.Namespace) -> str:
    """The bench command line as run (flags that differ from the defaults)."""
    parts = ["r4b-edge bench"]
    for k, v in sorted(vars(args).items()):
        if k in ("func", "verb") or v in (None, False):
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def _host_overhead_main(args: argparse.Namespace) -> int:
    """`r4b-edge bench --host-overhead`: the per-token host cost table (in this process)."""
    import json

    from . import host_overhead, report

    repeats = min(args.repeats, 2) if args.quick else args.repeats
    machine = report.machine_info()  # its load average: at the start
    doc = host_overhead.host_overhead_worker({"model": args.model, "repeats": repeats,
                                              "n_gen": 64 if args.quick else 256})
    doc |= {"command": _command(args), "machine": machine, "load_avg_end": list(os.getloadavg()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    doc["targets"] = host_overhead.targets(doc)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = host_overhead.markdown(doc)
    (out / "host_overhead.md").write_text(f"# Host overhead per token\n\nMeasured {doc['created']} with "
                                          f"`{doc['command']}`; load average at start "
                                          f"{doc['machine'].get('load_avg')}, at the end "
                                          f"{[round(v, 2) for v in doc['load_avg_end']]}.\n\n{md}")
    print(md)
    print(f"results: {out / 'host_overhead.json'}")
    return 0


def _deadline_sweep_main(args: argparse.Namespace) -> int:
    """`r4b-edge bench --deadline-sweep`: the deadline table and plot (in this process)."""
    import json

    from r4b_edge.api import default_model_path

    from . import deadline_sweep, report
    from .latency import set_threads

    model = Path(args.model).expanduser() if args.model else default_model_path()
    threads = args.threads or 1
    spec = {"backend": "torch", "precision": "fp32", "path": str(model), "device": args.device, "threads": threads}
    set_threads(threads)
    from r4b_edge.train.world import EVAL_SEED

    seed = args.eval_seed if args.eval_seed is not None else EVAL_SEED
    t0 = time.perf_counter()
    s = deadline_sweep.run_sweep(spec, 1 if args.quick else args.eval_per_family, seed,
                                 n_deadlines=3 if args.quick else 8, fresh=args.deadline_fresh)
    name = "deadline_sweep_fresh" if args.deadline_fresh else "deadline_sweep"
    s |= {"command": _command(args), "machine": report.machine_info(), "seed": seed, "threads": threads,
          "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "duration_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    md = deadline_sweep.markdown(s, s["command"])
    (out / f"{name}.md").write_text(
        f"# Deadline sweep{', a fresh process per T' if args.deadline_fresh else ''}\n\nMeasured {s['created']} ({s['duration_s']:.0f} s), torch fp32, "
        f"{report.count(threads, 'thread')}; "
        f"load average at start {s['machine'].get('load_avg')}.\n\n{md}\n![deadline sweep]({name}.png)\n")
    if not args.no_plots:
        deadline_sweep.plot(s, out / f"{name}.png")
    print(md)
    print(f"results: {out / f'{name}.json'}")
    return 0


def _timed_report(args: argparse.Namespace, stem: str, title: str, run: Callable[[], dict],
                  markdown: Callable[[dict], str]) -> dict:
    """Run one stand-alone measurement; write `--out`/STEM.json and STEM.md (title, when, how long,
    the load average at the start, then `markdown(d)`); print the table."""
    import json

    from . import report

    machine = report.machine_info()  # before the run: its load average is the one at the start
    t0 = time.perf_counter()
    d = run()
    d |= {"command": _command(args), "machine": machine,
          "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "duration_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(d, indent=1, default=str) + "\n")
    md = markdown(d)
    (out / f"{stem}.md").write_text(f"# {title}\n\nMeasured {d['created']} ({d['duration_s']:.0f} s); load average "
                                   f"at start {machine.get('load_avg')}.\n\n{md}")
    print(md)
    return d


def _true_shape_main(args: argparse.Namespace) -> int:
    """`r4b-edge bench --true-shape`: ours vs raw llama-cpp-python at R-4B's true width/vocab."""
    from r4b_edge.errors import R4BError

    from . import true_shape

    if args.true_shape_layers < 1:
        raise R4BError(f"--true-shape-layers must be >= 1, got {args.true_shape_layers}")
    threads = args.threads or 2
    work = Path(args.roofline_dir or Path(args.cache) / "true-shape").expanduser().resolve()
    title = "True-shape decode: r4b-edge vs raw llama-cpp-python"
    d = _timed_report(args, "true_shape", title, lambda: true_shape.run_true_shape(
        work, args.true_shape_layers, threads, device=args.device,
        repeats=max(3, min(args.repeats, 2) if args.quick else args.repeats),
        n_gen=16 if args.quick else 32, log=lambda m: print(m, file=sys.stderr)), true_shape.markdown)
    return 0 if "rows" in d else 1


def _repack_main(args: argparse.Namespace) -> int:
    """`r4b-edge bench --repack`: llama.cpp's extra buffer types on vs off, and the probe's cost."""
    from . import repack

    d = _timed_report(args, "repack", "llama.cpp weight repacking on vs off", lambda: repack.run_repack(
        Path(args.cache).expanduser().resolve() / "repack", args.threads or 1, repeats=max(3, args.repeats),
        layers=args.true_shape_layers, log=lambda m: print(m, file=sys.stderr)), repack.markdown)
    return 0 if d["rows"] else 1


def _true_size_main(args: argparse.Namespace) -> int:
    """`r4b-edge bench --true-size`: issue 28's measurement at R-4B's true size (--quick: tiny model)."""
    from r4b_edge.errors import R4BError

    from . import llamacpp_tools, true_size, true_size_report

    size = "tiny" if args.quick else "full"
    work = Path(args.true_size_dir or Path(args.cache) / "true-size").expanduser().resolve()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.true_size_build_only:
        rec = true_size.build(work, size, args.llama_repack, log=log)
        print(f"built: {rec['text']} ({rec['text_bytes'] / 2**30:.2f} GiB) + {rec['mmproj']} "
              f"({rec['mmproj_bytes'] / 2**30:.2f} GiB)")
        return 0
    try:
        budgets = true_size.parse_budgets(args.true_size_budgets)
    except ValueError as e:
        raise R4BError(f"--true-size-budgets: {e}") from None
    bin_dir = llamacpp_tools.llama_bin_dir(args.llama_bin)
    out = Path(args.out).expanduser()
    doc = true_size.run_true_size(work, out, size, budgets, threads=args.threads or 2, bin_dir=bin_dir,
                                  scaling=not args.no_scaling, llama_repack=args.llama_repack,
                                  command=_command(args), log=log)
    print(true_size_report.markdown(doc))
    print(f"results: {out / 'true_size.json'}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of `r4b-edge bench`."""
    from r4b_edge.api import default_model_path
    from r4b_edge.errors import ModelNotFoundError, R4BError

    from . import report

    if args.llama_repack:  # every worker (a child process) and the stock-Llama baselines follow it
        os.environ[REPACK_ENV] = args.llama_repack
    if args.host_overhead:
        return _host_overhead_main(args)
    if args.deadline_sweep:
        return _deadline_sweep_main(args)
    if args.true_shape:
        return _true_shape_main(args)
    if args.repack:
        return _repack_main(args)
    if args.true_size:
        return _true_size_main(args)
    s = _settings(args)
    model = Path(args.model).expanduser() if args.model else default_model_path()
    if not (model / "config.json").is_file():
        raise ModelNotFoundError(f"{model} is not an R-4B checkpoint folder (no config.json): pass --model "
                                 "with the folder training wrote; the bench exports GGUF/ONNX from it")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise R4BError(f"--out {out} is a file: pass a folder")
    doc = run_bench(model, s, Path(args.cache).expanduser(), out, make_plots=not args.no_plots,
                    command=_command(args))
    print(f"results: {out / 'results.json'} ({doc['duration_s']:.0f} s)")
    for t in doc["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        val = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['name']}: {val} (goal {t['goal']}) {met}" + (f"; {t['note']}" if t["note"] else ""))
    cut = report.cut_replies(doc)
    if cut:
        print(f"  {cut} modes-table replies hit --max-tokens {s['max_tokens']} before their answer ended: "
              "left out of the accuracy (raise --max-tokens to score them)")
    if doc["skipped"]:
        print(f"  skipped: {len(doc['skipped'])} (see results.md)")
    return 0
