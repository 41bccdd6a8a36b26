"""The true-size measurement of issue 28: the real R-4B's shapes on this machine, end to end.

`r4b-edge bench --true-size` (`--true-size-build-only` stops after step 1):

1. Builds once, cached and resumable in `--true-size-dir` (default `<cache>/true-size`): a
   random-weight R-4B at full size written by the scale check's writer (`r4b_config` +
   `write_random_bf16`: Qwen3-4B 36 layers x 2560, SigLIP-So400m 27 layers at 384 px, 3x3
   pinpoints, vocab 151,936; a 512-token BPE tokenizer padded into the vocabulary), served by
   the local test hub (`benchmarks/hubserver.py`, files streamed from disk) and pulled with
   `r4b-edge pull` (HF_ENDPOINT -> that hub, R4B_EDGE_HOME -> the work folder) to GGUF Q4_K_M +
   the F16 mmproj. ONNX int8 at true size is not attempted (see `ONNX_NOTE`).
2. Measures a chat through the public API (`r4b_edge.load(path, backend="llama", threads=2)`,
   `Model.conversation(image, image_tokens=B)`, `Conversation.stream(q, mode="no-think", max_tokens=16)`) about
   a 1920x1080 photo-like image and two follow-ups, per image-token budget (`auto` and explicit
   ones), one fresh process per budget (its own peak RSS).
3. Side by side, on the same GGUF files, llama.cpp's own tools: `llama-mtmd-cli` on the
   base-view image (the photo resized to 384x384: one view, the same image positions as our
   729 budget) and `llama-server` with its prompt cache for a follow-up.
4. Writes `true_size.json` / `true_size.md` into `--out` (atomically), with the issue's targets.

`--quick` runs the same pipeline on a tiny random model (a harness check; numbers meaningless).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .llamacpp_tools import run_llama_server, run_mtmd_cli
from .true_size_report import SCHEMA, SCHEMA_VERSION, ratios_and_targets, run_n_ctx, write_results

Log = Callable[[str], None]

REPO = "r4b-edge-bench/R-4B-random"
COMMIT = hashlib.sha1(b"r4b-edge true-size bench: random R-4B, seed 0, v1").hexdigest()
QUANT = "Q4_K_M"
ONNX_NOTE = ("ONNX int8 at true size: not attempted. The torch ONNX export traces the fp32 model "
             "(4.8B parameters x 4 bytes = ~19.3 GB of weights) and holds the exported graph's initializers "
             "beside it while serializing, over this machine's 24 GB of RAM (shared). It would need a machine "
             "with roughly 48 GB of RAM (two fp32 copies plus the exporter's overhead; an estimate, not "
             "measured) and ~40 GB of disk (fp32 graphs + int8 graphs), then `r4b-edge pull REPO --format onnx "
             "--quant int8`.")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- step 1: build -----------------------------------------------------------------------------
def _steps_file(work: Path) -> Path:
    return work / "build-steps.json"


def _steps(work: Path) -> dict:
    f = _steps_file(work)
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_steps(work: Path, d: dict) -> None:
    from r4b_edge.fsutil import atomic_write

    with atomic_write(_steps_file(work)) as tmp:
        tmp.write_text(json.dumps(d, indent=1) + "\n")


def _write_checkpoint(out: Path, size: str, tok_dir: Path) -> None:
    from r4b_edge.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    if size == "full":
        from r4b_edge.export.scale_check import r4b_config, write_random_bf16

        write_random_bf16(out, r4b_config(151936, tok.image), tok_dir)
    else:  # the harness check: tests' tiny AnyRes model, the same tokenizer
        from r4b_edge.testing import tiny_config, write_random_checkpoint

        write_random_checkpoint(out, tiny_config(anyres=True, vocab_size=tok.vocab_size,
                                                 image_token_index=tok.image), tok_dir, seed=0)


def _cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from r4b_edge.apps.cli import main; sys.exit(main())"]


def _run_child(cmd: list[str], env: dict, log: Log) -> tuple[int, float, float]:
    """Run `cmd`, its output line by line to `log`; returns (exit code, wall s, peak RSS MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log("    | " + line.rstrip())
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, ru.ru_maxrss / 1024


def build(work: Path, size: str = "full", llama_repack: str | None = None, log: Log = _log) -> dict:
    """Step 1, cached and resumable: tokenizer -> random checkpoint (`work/ckpt-SIZE`, written
    into a `.partial` folder then renamed) -> local hub -> `r4b-edge pull` into `work/home-SIZE`
    (an interrupted pull resumes its download; a finished one is not redone). Returns the record
    (paths, sizes, timings) also kept in `work/build-steps.json`."""
    from r4b_edge import store

    from .hubserver import LocalHub, Repo
    from .true_shape import world_tokenizer

    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = _steps(work)
    rec = steps.setdefault(size, {})
    tok_dir = world_tokenizer(work / "tokenizer")
    ckpt = work / f"ckpt-{size}"
    if not (ckpt / "config.json").is_file():
        tmp = work / f"ckpt-{size}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"true size: writing the random {size} checkpoint into {ckpt}")
        t0 = time.perf_counter()
        _write_checkpoint(tmp, size, tok_dir)
        os.replace(tmp, ckpt)
        rec["write_s"] = round(time.perf_counter() - t0, 1)
        rec.pop("pull", None)
        _save_steps(work, steps)
    rec["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    home = work / f"home-{size}"
    name = store.entry_name(REPO, "gguf", QUANT)
    entry = store.find(name, root=home)
    if entry is None or entry.commit != COMMIT or "pull" not in rec:
        hub = LocalHub({REPO: Repo.from_folder(ckpt, COMMIT, in_memory=False)})
        env = dict(os.environ, HF_ENDPOINT=hub.url, R4B_EDGE_HOME=str(home), HF_HOME=str(work / "hf-home"),
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
        env.pop("HF_TOKEN", None)
        env.pop("HF_HUB_OFFLINE", None)
        cmd = _cli() + ["pull", REPO, "--format", "gguf", "--quant", QUANT]
        if llama_repack:
            cmd += ["--llama-repack", llama_repack]
        shown = f"HF_ENDPOINT={hub.url} R4B_EDGE_HOME={home} r4b-edge pull {REPO} --format gguf --quant {QUANT}" + \
            (f" --llama-repack {llama_repack}" if llama_repack else "")
        log(f"true size: {shown}")
        try:
            rc, wall, peak = _run_child(cmd, env, log)
        finally:
            hub.close()
        if rc != 0:
            raise RuntimeError(f"r4b-edge pull exited {rc} (see the log above)")
        rec["pull"] = {"command": shown, "wall_s": round(wall, 1), "peak_rss_mib": round(peak)}
        entry = store.find(name, root=home)
        if entry is None:
            raise RuntimeError(f"r4b-edge pull finished but {name} is not in {home}")
    text = sorted(entry.path.glob("model-*.gguf"))
    mmproj = sorted(entry.path.glob("mmproj-*.gguf"))
    if len(text) != 1 or len(mmproj) != 1:
        raise RuntimeError(f"{entry.path}: expected one model-*.gguf and one mmproj-*.gguf")
    rec.update({"size": size, "repo": REPO, "commit": COMMIT, "home": str(home), "entry": str(entry.path),
                "text": str(text[0]), "mmproj": str(mmproj[0]),
                "text_bytes": text[0].stat().st_size, "mmproj_bytes": mmproj[0].stat().st_size,
                "onnx": ONNX_NOTE if size == "full" else "not built (tiny harness check)"})
    _save_steps(work, steps)
    log(f"true size: built {text[0]} ({rec['text_bytes'] / 2**30:.2f} GiB) + {mmproj[0].name} "
        f"({rec['mmproj_bytes'] / 2**30:.2f} GiB)")
    return rec



# ---- the image -----------------------------------------------------------------------------------
PHOTO_SIZE = (1920, 1080)
BASE_VIEW_PX = 384
QUESTIONS = ("What is in this photo?", "What colour is the sky?", "How many round shapes are there?")


def photo(seed: int = 28) -> Any:
    """A deterministic 1920x1080 photo-like RGB image (PIL): a sky and ground of smooth gradients,
    soft shapes (a sun, hills, boxes), a little blur and sensor-like noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = PHOTO_SIZE
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, h)[:, None, None]
    x = np.linspace(0.0, 1.0, w)[None, :, None]
    sky = (1 - y) * np.array([70, 130, 215]) + y * np.array([200, 220, 240])
    ground = (1 - y) * np.array([90, 140, 60]) + y * np.array([45, 75, 30]) + 25 * x
    horizon = 0.58 + 0.04 * np.sin(6.0 * x)
    arr = np.where(y < horizon, sky, ground) * np.ones((h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([1450, 120, 1650, 320], fill=(250, 225, 120))
    for i in range(6):
        cx, cy, r = int(rng.integers(100, 1800)), int(rng.integers(650, 1000)), int(rng.integers(30, 90))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(60, 230, 3)))
    for i in range(4):
        x0, y0 = int(rng.integers(50, 1600)), int(rng.integers(500, 800))
        d.rectangle([x0, y0, x0 + int(rng.integers(80, 260)), y0 + int(rng.integers(60, 200))],
                    fill=tuple(int(v) for v in rng.integers(40, 200, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2.0))
    noisy = np.asarray(img).astype(np.float32) + rng.normal(0.0, 6.0, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_images(folder: Path) -> dict:
    """photo.png (1920x1080) and base-view.png (the same photo resized to 384x384: one view in stock
    mtmd) in `folder`, kept if already there; returns their paths and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    full, base = folder / "photo-1920x1080.png", folder / "photo-384x384.png"
    if not (full.is_file() and base.is_file()):
        from PIL import Image

        img = photo()
        for path, im in ((full, img), (base, img.resize((BASE_VIEW_PX, BASE_VIEW_PX), Image.BICUBIC))):
            from r4b_edge.fsutil import atomic_write

            with atomic_write(path) as tmp:
                im.save(tmp, format="PNG")
    return {"photo": str(full), "base_view": str(base), "size": list(PHOTO_SIZE),
            "kind": "synthetic photo-like image (gradients, shapes, blur, noise; seed 28)",
            "sha256": hashlib.sha256(full.read_bytes()).hexdigest()}


def kv_bytes(config: Any, n_ctx: int, bytes_per: int = 2) -> int:
    """llama.cpp's f16 KV cache: layers x 2 (K, V) x kv heads x head_dim x n_ctx x 2 bytes."""
    tc = config.text_config
    head_dim = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    return int(tc["num_hidden_layers"]) * 2 * int(tc["num_key_value_heads"]) * int(head_dim) * int(n_ctx) * bytes_per


def chat_worker(p: dict) -> dict:
    """Worker (fresh process): load the GGUF pair through the public API, a conversation about
    the photo with the image-token budget `p["budget"]`, one no-think turn per question; per turn
    the wall times of the first event / progress / decision / visible token and the engine's Stats."""
    from dataclasses import asdict

    t_start = time.perf_counter()
    import r4b_edge
    from r4b_edge.engine.events import AnswerDelta, Decision, Done, Progress, ReasoningDelta
    from r4b_edge.engine.memory import peak_rss_mb

    budget = p["budget"]
    t0 = time.perf_counter()
    model = r4b_edge.load(p["path"], backend="llama", device="cpu", threads=int(p["threads"]))
    load_ms = (time.perf_counter() - t0) * 1e3
    be = model.backend
    out: dict[str, Any] = {"budget": budget, "threads": int(p["threads"]), "import_ms": (t0 - t_start) * 1e3,
                           "load_ms": load_ms, "n_ctx": be.n_ctx, "kv_bytes": kv_bytes(model.config, be.n_ctx),
                           "repack": getattr(getattr(be, "repack", None), "use_extra_bufts", None),
                           "repack_reason": be.repack.line() if hasattr(be, "repack") else "",
                           "image_budget": model.image_budget(), "turns": []}
    try:
        t0 = time.perf_counter()
        conv = model.conversation(p["image"], image_tokens=budget)
        out["prepare_ms"] = (time.perf_counter() - t0) * 1e3
        for i, q in enumerate(p["questions"]):
            turn: dict[str, Any] = {"turn": i + 1, "question": q, "first_event_ms": None, "first_progress_ms": None,
                                    "decision_ms": None, "first_token_ms": None, "progress_events": 0,
                                    "progress_stages": [], "progress_max_gap_ms": None}
            last_progress = None
            t0 = time.perf_counter()
            for ev in conv.stream(q, mode="no-think", max_tokens=int(p["max_tokens"])):
                t = (time.perf_counter() - t0) * 1e3
                if turn["first_event_ms"] is None:
                    turn["first_event_ms"] = t
                if isinstance(ev, Progress):
                    turn["progress_events"] += 1
                    if turn["first_progress_ms"] is None:
                        turn["first_progress_ms"] = t
                    stage = ev.stage
                    if stage not in turn["progress_stages"]:
                        turn["progress_stages"].append(stage)
                    if last_progress is not None:
                        turn["progress_max_gap_ms"] = max(turn["progress_max_gap_ms"] or 0.0, t - last_progress)
                    last_progress = t
                elif isinstance(ev, Decision):
                    turn["decision_ms"] = t
                elif isinstance(ev, (AnswerDelta, ReasoningDelta)) and ev.text and turn["first_token_ms"] is None:
                    turn["first_token_ms"] = t
                elif isinstance(ev, Done):
                    st = ev.result.stats
                    turn["stats"] = asdict(st)
                    turn["positions_evaluated"] = st.positions_evaluated
                    turn["positions_reused"] = st.positions_reused
                    turn["answer_tokens"] = len(ev.result.token_ids)
            turn["wall_ms"] = (time.perf_counter() - t0) * 1e3
            turn["peak_rss_mib"] = peak_rss_mb()
            out["turns"].append(turn)
    finally:
        model.close()
    out["peak_rss_mib"] = peak_rss_mb()
    return out


# ---- step 2-4: measure and report ----------------------------------------------------------------
def parse_budgets(text: str) -> list[str | int]:
    out: list[str | int] = []
    for b in (x.strip() for x in str(text).split(",") if x.strip()):
        if b == "auto":
            out.append("auto")
        elif b.isdigit() and int(b) > 0:
            out.append(int(b))
        else:
            raise ValueError(f"an image-token budget is `auto` or a positive integer, got {b!r}")
    if not out:
        raise ValueError("no image-token budget given")
    return out


def measure(build_rec: dict, work: Path, budgets: list, threads: int = 2, max_tokens: int = 16,
            questions: tuple[str, ...] = QUESTIONS, bin_dir: Path | None = None, scaling: bool = True,
            timeout: float = 3 * 3600, log: Log = _log) -> dict:
    """Steps 2-3: every configuration in its own process, interleaved (ours per budget, then
    llama-mtmd-cli after the base-view budget, llama-server after the next); returns the document
    without the report's header fields."""
    from .latency import run_isolated

    imgs = write_images(work / "images")
    base_budget = 729 if build_rec.get("size") == "full" else None
    doc: dict[str, Any] = {"size": build_rec.get("size"), "build": build_rec, "image": imgs,
                           "settings": {"threads": threads, "budgets": budgets, "max_tokens": max_tokens,
                                        "questions": list(questions), "mode": "no-think",
                                        "llama_bin": str(bin_dir) if bin_dir else None},
                           "runs": [], "llama_cpp": {}}
    files = int(build_rec["text_bytes"]) + int(build_rec["mmproj_bytes"])
    doc["files_bytes"] = files
    payload = {"path": build_rec["entry"], "image": imgs["photo"], "threads": threads, "max_tokens": max_tokens,
               "questions": list(questions)}
    repack = None
    jobs: list[tuple[str, Any]] = [("ours", b) for b in budgets]
    if bin_dir is not None:
        # llama.cpp's tools right after our first run, so both see the same machine state
        jobs.insert(1, ("mtmd", None))
        jobs.insert(3 if len(jobs) > 2 else len(jobs), ("server", None))
    else:
        doc["llama_cpp"]["skipped"] = "no llama.cpp binaries (set R4B_LLAMA_CPP_BIN or --llama-bin)"
    if scaling:
        jobs.append(("ours-1thread", base_budget or "auto"))
    for kind, arg in jobs:
        if kind.startswith("ours"):
            n = 1 if kind == "ours-1thread" else threads
            log(f"true size: chat, image_tokens={arg}, {n} thread(s)")
            qs = list(questions[:1]) if kind == "ours-1thread" else list(questions)
            r = run_isolated("r4b_edge.benchmarks.true_size:chat_worker",
                             payload | {"budget": arg, "threads": n, "questions": qs}, timeout=timeout, threads=n)
            r.setdefault("budget", arg)
            r["threads"] = n
            r["role"] = "scaling" if kind == "ours-1thread" else "budget"
            if "turns" in r and repack is None:
                repack = r.get("repack")
            doc["runs"].append(r)
            if "turns" not in r:
                log(f"  not run: {r.get('skipped') or r.get('error')}")
        elif kind == "mtmd":
            log("true size: llama-mtmd-cli on the 384x384 image (one view)")
            doc["llama_cpp"]["mtmd_cli"] = run_mtmd_cli(bin_dir, build_rec["text"], build_rec["mmproj"],
                                                        imgs["base_view"], questions[0], threads,
                                                        run_n_ctx(doc), max_tokens, repack)
        else:
            log("true size: llama-server, one request per turn (history resent)")
            doc["llama_cpp"]["server"] = run_llama_server(bin_dir, build_rec["text"], build_rec["mmproj"],
                                                          imgs["base_view"], list(questions), threads,
                                                          run_n_ctx(doc), max_tokens, repack)
    doc["llama_cpp"]["repack"] = repack
    return doc


def run_true_size(work: Path, out: Path | None, size: str = "full", budgets: list | None = None, threads: int = 2,
                  max_tokens: int = 16, bin_dir: Path | None = None, scaling: bool = True,
                  llama_repack: str | None = None, command: str = "", log: Log = _log) -> dict:
    """Build (cached), measure, compute targets, write `out`/true_size.{json,md}; returns the document."""
    from datetime import datetime, timezone

    from .report import machine_info

    t0 = time.perf_counter()
    machine = machine_info()
    rec = build(work, size, llama_repack, log)
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": command, "machine": machine,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    doc |= measure(rec, work, budgets or ["auto", 729, 4501], threads, max_tokens, bin_dir=bin_dir,
                   scaling=scaling, log=log)
    doc["onnx"] = rec.get("onnx")
    ratios_and_targets(doc)
    try:
        doc["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    doc["duration_s"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        write_results(doc, out)
    return doc

def main(argv: list[str] | None = None) -> int:
    """`python -m r4b_edge.benchmarks.true_size build --work DIR [--size full|tiny]` (the build alone)."""
    import argparse

    ap = argparse.ArgumentParser(description="build the true-size bench's model (step 1)")
    ap.add_argument("what", choices=["build"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--llama-repack", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rec = build(a.work, a.size, a.llama_repack)
    print(json.dumps(rec | {"build_wall_s_this_run": round(time.perf_counter() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
