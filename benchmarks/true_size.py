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


# ---- PRE-MERGE SHIM (issue 28's runtime features, built on other branches) ------------------------
# Everything that tolerates the absence of `image_tokens=`, `r4b_edge.Progress` and
# `Stats.positions_evaluated` / `Stats.positions_reused` lives in this class. A missing feature is
# recorded as missing (None in the JSON, "missing" in the markdown), never estimated. Once they are
# merged, delete this class and use the features directly where `PreMerge` is called.
class PreMerge:
    def __init__(self) -> None:
        import inspect

        import r4b_edge
        from r4b_edge.api import Model

        self.progress_cls = getattr(r4b_edge, "Progress", None)
        self.conversation_budget = "image_tokens" in inspect.signature(Model.conversation).parameters
        self.missing: list[str] = []
        if self.progress_cls is None:
            self.missing.append("r4b_edge.Progress (no progress events: time to first progress not measured)")
        if not self.conversation_budget:
            self.missing.append("image_tokens= (no image-token budget: explicit budgets not run, `auto` ran "
                                "the model's full grid)")
        from r4b_edge.engine.events import Stats

        for f in ("positions_evaluated", "positions_reused"):
            if not hasattr(Stats(), f):
                self.missing.append(f"Stats.{f}")

    def conversation_kwargs(self, budget: str | int) -> dict:
        return {"image_tokens": budget} if self.conversation_budget else {}

    def is_progress(self, ev: Any) -> bool:
        return self.progress_cls is not None and isinstance(ev, self.progress_cls)

    @staticmethod
    def stat(stats: Any, name: str) -> Any:
        return getattr(stats, name, None)
# ---- end of the pre-merge shim -------------------------------------------------------------------


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
    from r4b_edge.engine.events import AnswerDelta, Decision, Done, ReasoningDelta
    from r4b_edge.engine.memory import peak_rss_mb

    from .latency import BenchSkip

    shim = PreMerge()
    budget = p["budget"]
    if budget != "auto" and not shim.conversation_budget:
        raise BenchSkip(f"image_tokens={budget}: this r4b_edge has no image-token budget yet (pre-merge)")
    t0 = time.perf_counter()
    model = r4b_edge.load(p["path"], backend="llama", device="cpu", threads=int(p["threads"]))
    load_ms = (time.perf_counter() - t0) * 1e3
    be = model.backend
    out: dict[str, Any] = {"budget": budget, "threads": int(p["threads"]), "import_ms": (t0 - t_start) * 1e3,
                           "load_ms": load_ms, "n_ctx": be.n_ctx, "kv_bytes": kv_bytes(model.config, be.n_ctx),
                           "repack": getattr(getattr(be, "repack", None), "use_extra_bufts", None),
                           "repack_reason": be.repack.line() if hasattr(be, "repack") else "", "missing": shim.missing,
                           "budget_applied": shim.conversation_budget, "turns": []}
    try:
        t0 = time.perf_counter()
        conv = model.conversation(p["image"], **shim.conversation_kwargs(budget))
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
                if shim.is_progress(ev):
                    turn["progress_events"] += 1
                    if turn["first_progress_ms"] is None:
                        turn["first_progress_ms"] = t
                    stage = str(getattr(ev, "stage", ""))
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
                    turn["positions_evaluated"] = shim.stat(st, "positions_evaluated")
                    turn["positions_reused"] = shim.stat(st, "positions_reused")
                    turn["answer_tokens"] = len(ev.result.token_ids)
            turn["wall_ms"] = (time.perf_counter() - t0) * 1e3
            turn["peak_rss_mib"] = peak_rss_mb()
            out["turns"].append(turn)
    finally:
        model.close()
    out["peak_rss_mib"] = peak_rss_mb()
    return out


# ---- llama.cpp's own tools -----------------------------------------------------------------------
def llama_bin_dir(explicit: str | None = None) -> Path | None:
    """The folder with llama-mtmd-cli and llama-server: `explicit`, else $R4B_LLAMA_CPP_BIN, else PATH."""
    for cand in (explicit, os.environ.get("R4B_LLAMA_CPP_BIN")):
        if cand and (Path(cand) / "llama-mtmd-cli").is_file() and (Path(cand) / "llama-server").is_file():
            return Path(cand).resolve()
    a, b = shutil.which("llama-mtmd-cli"), shutil.which("llama-server")
    if a and b and Path(a).parent == Path(b).parent:
        return Path(a).parent.resolve()
    return None


def _run_capture(cmd: list[str], timeout: float) -> tuple[int, str, str, float, float]:
    """Run `cmd`; returns (exit code, stdout, stderr, wall s, its peak RSS MiB from wait4)."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    bufs: dict[str, str] = {}

    def read(name: str, stream: Any) -> None:
        bufs[name] = stream.read()

    readers = [threading.Thread(target=read, args=(n, s), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for th in readers:
        th.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for th in readers:
        th.join()
    return proc.returncode, bufs.get("out", ""), bufs.get("err", ""), time.perf_counter() - t0, ru.ru_maxrss / 1024


def _lines_ms(text: str, pattern: str) -> list[float]:
    import re

    return [float(m) for m in re.findall(pattern, text)]


def parse_mtmd_log(log: str) -> dict:
    """llama-mtmd-cli's -v log: vision encode (`mtmd batch encoding done in N ms`), image embedding
    decode (`image decoded ... in N ms`), `llama_perf_context_print` prompt eval / eval."""
    import re

    d: dict[str, Any] = {}
    enc = _lines_ms(log, r"mtmd batch encoding done in (\d+) ms")
    d["vision_encode_ms"] = sum(enc) if enc else None
    dec = _lines_ms(log, r"image decoded \(batch \d+/\d+\) in (\d+) ms")
    d["image_decode_ms"] = sum(dec) if dec else None
    m = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    d["prompt_eval_ms"], d["prompt_positions"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"\n[^\n]*?\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
    d["decode_ms"], d["decode_runs"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    d["decode_tps"] = d["decode_runs"] / d["decode_ms"] * 1e3 if d["decode_ms"] else None
    m = re.search(r"load time =\s*([\d.]+) ms", log)
    d["load_ms"] = float(m.group(1)) if m else None
    # time to first token = vision encode + the prompt's evaluation (text and image positions;
    # the first sample is in neither and is negligible next to them)
    d["ttft_ms"] = (d["vision_encode_ms"] or 0.0) + d["prompt_eval_ms"] if d["prompt_eval_ms"] is not None else None
    return d


def _repack_flags(repack: bool | None) -> list[str]:
    return ["-nr"] if repack is False else []


def run_mtmd_cli(bin_dir: Path, text: str, mmproj: str, image: str, question: str, threads: int, n_ctx: int,
                 max_tokens: int, repack: bool | None, tries: int = 3) -> dict:
    """One `llama-mtmd-cli` run in no-think mode (the GGUF template with `short` as its default,
    docs/gguf.md); its timings parsed from the -v log (retried: its log thread may exit unflushed)."""
    from r4b_edge.model.template import chat_template_jinja

    cmd = [str(bin_dir / "llama-mtmd-cli"), "-m", text, "--mmproj", mmproj, "--jinja",
           "--chat-template", chat_template_jinja("short"), "--image", image, "-p", question, "--temp", "0",
           "-n", str(max_tokens), "-t", str(threads), "-c", str(n_ctx), "--perf", "-v"] + _repack_flags(repack)
    shown = (f"llama-mtmd-cli -m {text} --mmproj {mmproj} --jinja --chat-template \"$(python -c 'from "
             "r4b_edge.model.template import chat_template_jinja; print(chat_template_jinja(\"short\"))')\" "
             f"--image {image} -p {json.dumps(question)} --temp 0 -n {max_tokens} -t {threads} -c {n_ctx} --perf -v"
             + (" -nr" if repack is False else ""))
    last: dict = {}
    for _ in range(tries):
        rc, out, err, wall, peak = _run_capture(cmd, timeout=3600)
        d = parse_mtmd_log(err)
        last = d | {"command": shown, "wall_ms": wall * 1e3, "exit": rc, "peak_rss_mib": peak}
        if rc != 0:
            tail = err.strip().splitlines()[-1:] if err.strip() else []
            last["error"] = f"exit {rc}: {' | '.join(tail)}"
            return last
        if d["ttft_ms"] is not None:
            return last
    last["error"] = "no llama_perf_context_print timings in its log (tried %d times)" % tries
    return last


def _post_json(url: str, body: dict, timeout: float = 3600.0) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_llama_server(bin_dir: Path, text: str, mmproj: str, image: str, questions: list[str], threads: int,
                     n_ctx: int, max_tokens: int, repack: bool | None) -> dict:
    """`llama-server` (one slot, its prompt cache on: the default) and one request per turn, each
    resending the history + the next question as an OpenAI client does; per request its
    `timings` (prompt_n: positions evaluated, prompt_ms, cache_n: positions reused, predicted)."""
    import base64
    import urllib.error
    import urllib.request

    port = _free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", text, "--mmproj", mmproj, "--jinja", "--chat-template-kwargs",
           '{"thinking_mode":"short"}', "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-c", str(n_ctx), "-np", "1"] + _repack_flags(repack)
    shown = (f"llama-server -m {text} --mmproj {mmproj} --jinja --chat-template-kwargs "
             f"'{{\"thinking_mode\":\"short\"}}' --host 127.0.0.1 --port PORT -t {threads} -c {n_ctx} -np 1"
             + (" -nr" if repack is False else ""))
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"r4b-true-size-llama-server-{port}.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"command": shown, "requests": []}
    try:
        t0 = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                return out | {"error": f"llama-server did not start (exit {proc.poll()}): {' | '.join(tail)}"}
            time.sleep(0.5)
        out["load_ms"] = (time.perf_counter() - t0) * 1e3
        uri = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
        msgs: list[dict] = []
        for i, q in enumerate(questions):
            content: Any = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": q}] if i == 0 else q
            msgs.append({"role": "user", "content": content})
            t1 = time.perf_counter()
            r = _post_json(f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"model": "r4b", "messages": msgs, "temperature": 0, "max_tokens": max_tokens,
                            "cache_prompt": True})
            wall = (time.perf_counter() - t1) * 1e3
            answer = r["choices"][0]["message"].get("content") or ""
            msgs.append({"role": "assistant", "content": answer})
            tm = r.get("timings") or {}
            out["requests"].append({"turn": i + 1, "wall_ms": wall, "prompt_n": tm.get("prompt_n"),
                                    "prompt_ms": tm.get("prompt_ms"), "cache_n": tm.get("cache_n"),
                                    "predicted_n": tm.get("predicted_n"),
                                    "predicted_per_second": tm.get("predicted_per_second"),
                                    "prompt_tokens": (r.get("usage") or {}).get("prompt_tokens")})
        out["peak_rss_mib"] = _vm_hwm_mib(proc.pid)
    except Exception as e:  # reported in the JSON, never dropped
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
                                                        _n_ctx(doc), max_tokens, repack)
        else:
            log("true size: llama-server, one request per turn (history resent)")
            doc["llama_cpp"]["server"] = run_llama_server(bin_dir, build_rec["text"], build_rec["mmproj"],
                                                          imgs["base_view"], list(questions), threads,
                                                          _n_ctx(doc), max_tokens, repack)
    doc["llama_cpp"]["repack"] = repack
    return doc


def _n_ctx(doc: dict) -> int:
    for r in doc["runs"]:
        if r.get("n_ctx"):
            return int(r["n_ctx"])
    return 8192


def _ttft(turn: dict) -> float | None:
    st = turn.get("stats") or {}
    return st.get("ttft_ms")


def _budget_runs(doc: dict) -> list[dict]:
    return [r for r in doc["runs"] if r.get("role") == "budget"]


def _run_for(doc: dict, budget: Any) -> dict | None:
    for r in _budget_runs(doc):
        if r.get("budget") == budget and r.get("turns"):
            return r
    return None


def _target(name: str, goal: str, value: float | None, met: bool | None, note: str = "") -> dict:
    return {"name": name, "goal": goal, "value": value, "met": met, "note": note}


def ratios_and_targets(doc: dict) -> None:
    """The side-by-side ratios, the issue's five targets and the 8-core extrapolation, into `doc`."""
    ratios: list[dict] = []
    mt = doc["llama_cpp"].get("mtmd_cli") or {}
    sv = doc["llama_cpp"].get("server") or {}
    base = None
    for r in _budget_runs(doc):  # our run whose first turn evaluates what mtmd's one view does (+-2%)
        n = mt.get("prompt_positions")
        if r.get("turns") and n and abs(r["turns"][0]["stats"]["prompt_tokens"] - n) <= max(8, 0.02 * n):
            base = r if base is None else base
    if base is not None and mt.get("ttft_ms"):
        t = base["turns"][0]
        ratios.append({"what": "first turn, time to first token (vision + prefill)", "ours": _ttft(t),
                       "theirs": mt["ttft_ms"], "ratio": _ttft(t) / mt["ttft_ms"],
                       "ours_positions": t["stats"]["prompt_tokens"], "theirs_positions": mt["prompt_positions"],
                       "against": "llama-mtmd-cli", "budget": base["budget"]})
        if mt.get("vision_encode_ms") and t["stats"]["vision_encode_ms"]:
            ratios.append({"what": "first turn, vision encode", "ours": t["stats"]["vision_encode_ms"],
                           "theirs": mt["vision_encode_ms"],
                           "ratio": t["stats"]["vision_encode_ms"] / mt["vision_encode_ms"],
                           "against": "llama-mtmd-cli", "budget": base["budget"]})
        if mt.get("decode_tps") and t["stats"]["decode_tps"]:
            ratios.append({"what": "decode tok/s (ours/theirs: > 1 is faster)", "ours": t["stats"]["decode_tps"],
                           "theirs": mt["decode_tps"], "ratio": t["stats"]["decode_tps"] / mt["decode_tps"],
                           "against": "llama-mtmd-cli", "budget": base["budget"]})
    reqs = sv.get("requests") or []
    if base is not None:
        for t, q in zip(base["turns"][1:], reqs[1:]):
            if q.get("prompt_ms") and _ttft(t):
                ratios.append({"what": f"turn {t['turn']} (follow-up), time to first token vs prompt_ms",
                               "ours": _ttft(t), "theirs": q["prompt_ms"], "ratio": _ttft(t) / q["prompt_ms"],
                               "ours_positions": t.get("positions_evaluated"), "theirs_positions": q.get("prompt_n"),
                               "against": "llama-server", "budget": base["budget"]})
    doc["ratios"] = ratios

    targets = []
    auto = _run_for(doc, "auto")
    runs = [r for r in _budget_runs(doc) if r.get("turns")]
    # 1. follow-up TTFT <= 0.1x the first turn's (every budget; the worst)
    worst = None
    for r in runs:
        if len(r["turns"]) > 1 and _ttft(r["turns"][0]):
            for t in r["turns"][1:]:
                q = _ttft(t) / _ttft(r["turns"][0])
                worst = q if worst is None else max(worst, q)
    evaluated_img = [t.get("positions_evaluated") for r in runs for t in r["turns"][1:]]
    note = "worst follow-up over every budget"
    if any(v is None for v in evaluated_img):
        note += "; positions evaluated: missing (Stats.positions_evaluated not merged)"
    targets.append(_target("follow-up time to first token / first turn's", "<= 0.1", worst,
                           None if worst is None else worst <= 0.1, note))
    # 2. first token within 30 s with the default budget; progress within 1 s
    t1 = auto["turns"][0] if auto else None
    v = _ttft(t1) / 1e3 if t1 else None
    targets.append(_target("first turn's time to first token, default budget (s)", "<= 30", v,
                           None if v is None else v <= 30,
                           "" if auto is None or auto.get("budget_applied") else
                           "pre-merge: no budget, the full grid"))
    fp = [t["first_progress_ms"] for r in runs for t in r["turns"][:1]]
    v = max(fp) / 1e3 if fp and all(x is not None for x in fp) else None
    targets.append(_target("time to the first progress event (s)", "<= 1", v, None if v is None else v <= 1,
                           "first turns of every budget; worst" if v is not None else
                           "missing: no Progress events (pre-merge)"))
    # 3. <= 1.05x llama-mtmd-cli at equal image positions
    r0 = next((x for x in ratios if x["against"] == "llama-mtmd-cli" and "time to first" in x["what"]), None)
    targets.append(_target("first-turn time to first token / llama-mtmd-cli's, equal image positions", "<= 1.05",
                           r0["ratio"] if r0 else None, None if r0 is None else r0["ratio"] <= 1.05,
                           "" if r0 else ("no base-view run or no llama-mtmd-cli timings"
                                          + (f": {mt.get('error')}" if mt.get("error") else ""))))
    # 4. peak RSS <= 1.2x files + KV
    worst_rss = None
    for r in runs:
        lim = (doc["files_bytes"] + r["kv_bytes"]) / 2**20
        q = r["peak_rss_mib"] / lim
        worst_rss = q if worst_rss is None else max(worst_rss, q)
    targets.append(_target("peak RSS / (GGUF files + f16 KV cache)", "<= 1.2", worst_rss,
                           None if worst_rss is None else worst_rss <= 1.2, "worst over every budget"))
    doc["targets"] = targets
    doc["extrapolated_8_core"] = extrapolate(doc)


def extrapolate(doc: dict) -> dict:
    """What an 8-core laptop would see (EXTRAPOLATED, not measured): vision and prefill scaled by
    the measured 1 -> 2 thread speed-up applied twice more (2 -> 4 -> 8), else by 4x (linear in
    cores); decode is memory-bound and left as measured."""
    one = next((r for r in doc["runs"] if r.get("role") == "scaling" and r.get("turns")), None)
    two = _run_for(doc, one["budget"]) if one else None
    factor, how = 4.0, "assumed 4x (vision and prefill linear in cores from 2 to 8; optimistic)"
    if one and two:
        s1, s2 = one["turns"][0]["stats"], two["turns"][0]["stats"]
        c1 = s1["vision_encode_ms"] + s1["prefill_ms"]
        c2 = s2["vision_encode_ms"] + s2["prefill_ms"]
        if c1 > 0 and c2 > 0:
            sp = c1 / c2
            factor = max(1.0, sp) ** 2
            how = (f"measured 1 -> 2 thread speed-up {sp:.2f}x on vision + prefill (image_tokens={one['budget']}), "
                   f"assumed to repeat for 2 -> 4 -> 8 threads: {factor:.2f}x")
    rows = []
    for r in _budget_runs(doc):
        if not r.get("turns"):
            continue
        t = r["turns"][0]
        st = t["stats"]
        rest = max(0.0, st["ttft_ms"] - st["vision_encode_ms"] - st["prefill_ms"])
        rows.append({"budget": r["budget"], "image_positions": st["image_tokens"],
                     "ttft_ms_measured": st["ttft_ms"],
                     "ttft_ms_extrapolated": (st["vision_encode_ms"] + st["prefill_ms"]) / factor + rest,
                     "follow_up_ttft_ms_extrapolated": [_ttft(x) / factor for x in r["turns"][1:] if _ttft(x)]})
    return {"label": "extrapolated", "factor": factor, "how": how,
            "decode": "not extrapolated: decode is memory-bandwidth bound (a laptop's bandwidth, not its cores)",
            "rows": rows}


# ---- the report ----------------------------------------------------------------------------------
SCHEMA = "r4b-edge-true-size"
SCHEMA_VERSION = 1


def _f(v: Any, fmt: str = "{:.0f}", missing: str = "missing") -> str:
    return missing if v is None else fmt.format(v)


def _s(ms: Any) -> str:
    if ms is not None and ms < 1000:
        return f"{ms:.0f} ms"
    return _f(None if ms is None else ms / 1e3, "{:.1f} s")


def _gib(b: Any) -> str:
    return _f(None if b is None else b / 2**30, "{:.2f} GiB")


def markdown(doc: dict) -> str:
    """The results page (the `true_size.md` body; the JSON holds every number)."""
    m, b = doc.get("machine", {}), doc["build"]
    what = ("A random-weight R-4B at full size (36 layers x 2560, SigLIP-So400m 27 layers at 384 px, 3x3 "
            "pinpoints, vocab 151,936)." if doc["size"] == "full" else
            "A tiny random model (`--quick`: a harness check, the numbers mean nothing).")
    L = [f"Measured {doc.get('created', '')} ({doc.get('duration_s', 0):.0f} s) on {m.get('cpu', '?')}, "
         f"{m.get('cores_physical') or '?'} physical / {m.get('cores_logical', '?')} logical cores, "
         f"{m.get('ram_gib', '?')} GiB RAM; load average at start {m.get('load_avg')}. "
         f"{what}",
         "", "Commands:", "", "```bash", doc.get("command", ""), "```", ""]
    if doc.get("missing"):
        L += ["**Not measured (features not merged into this r4b-edge yet):** " + "; ".join(doc["missing"]) + ".", ""]
    L += ["## Build", "", "| step | result |", "|---|---|",
          f"| random checkpoint ({doc['size']}) | {_gib(b.get('checkpoint_bytes'))}, written in "
          f"{_f(b.get('write_s'), '{:.0f} s')} |",
          f"| `{(b.get('pull') or {}).get('command', 'r4b-edge pull')}` | {_f((b.get('pull') or {}).get('wall_s'), '{:.0f} s')}, "
          f"peak RSS {_f((b.get('pull') or {}).get('peak_rss_mib'), '{:.0f} MiB')} |",
          f"| GGUF text ({Path(b['text']).name}) | {_gib(b['text_bytes'])} |",
          f"| mmproj ({Path(b['mmproj']).name}) | {_gib(b['mmproj_bytes'])} |",
          f"| ONNX int8 | {b.get('onnx', '')} |", ""]
    im = doc["image"]
    L += ["## r4b-edge, a chat about the photo and two follow-ups", "",
          f"`r4b_edge.load(path, backend=\"llama\", threads=N)`, `model.conversation(photo, image_tokens=B)`, "
          f"`conv.stream(q, mode=\"no-think\", max_tokens={doc['settings']['max_tokens']})`; a "
          f"{im['size'][0]}x{im['size'][1]} {im['kind']}; one fresh process per row group. Times from the "
          "call; TTFT is `Stats.ttft_ms`.", "",
          "| image_tokens | threads | turn | image pos. | prompt pos. | evaluated | reused | first event | "
          "first progress | vision | prefill | TTFT | decode tok/s | peak RSS |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        if not r.get("turns"):
            L.append(f"| {r.get('budget')} | {r.get('threads')} | not run: {r.get('skipped') or r.get('error')} "
                     "|  |  |  |  |  |  |  |  |  |  |  |")
            continue
        for t in r["turns"]:
            st = t["stats"]
            L.append(f"| {r['budget']}{'' if r.get('budget_applied') else ' (not applied)'} | {r['threads']} | "
                     f"{t['turn']} | {st['image_tokens']:,} | {st['prompt_tokens']:,} | "
                     f"{_f(t.get('positions_evaluated'), '{:,}')} | {_f(t.get('positions_reused'), '{:,}')} | "
                     f"{_s(t['first_event_ms'])} | {_s(t['first_progress_ms'])} | {_s(st['vision_encode_ms'])} | "
                     f"{_s(st['prefill_ms'])} | {_s(st['ttft_ms'])} | {st['decode_tps']:.2f} | "
                     f"{t['peak_rss_mib']:.0f} MiB |")
    L.append("")
    for r in doc["runs"]:
        if r.get("turns"):
            L.append(f"- image_tokens={r['budget']}, {r['threads']} thread(s): load {_s(r['load_ms'])}, image "
                     f"prepared in {_f(r.get('prepare_ms'), '{:.0f} ms')}, n_ctx {r['n_ctx']:,}, KV cache (f16) "
                     f"{_gib(r['kv_bytes'])}, GGUF files {_gib(doc['files_bytes'])}, peak RSS "
                     f"{r['peak_rss_mib']:.0f} MiB = {r['peak_rss_mib'] * 2**20 / (doc['files_bytes'] + r['kv_bytes']):.2f}x "
                     f"files + KV; llama.cpp {r.get('repack_reason') or ''}")
    L.append("")
    lc = doc["llama_cpp"]
    L += ["## llama.cpp's own tools on the same GGUF files", ""]
    if lc.get("skipped"):
        L += [f"Not run: {lc['skipped']}.", ""]
    mt = lc.get("mtmd_cli")
    if mt:
        L += ["llama-mtmd-cli on the photo resized to 384x384 (stock mtmd: one view):", "", "```bash",
              mt["command"], "```", ""]
        if mt.get("error"):
            L += [f"Failed: {mt['error']}", ""]
        L += ["| prompt pos. (text + image) | vision encode | prompt eval | TTFT (encode + prompt eval) | "
              "decode tok/s | peak RSS |", "|---|---|---|---|---|---|",
              f"| {_f(mt.get('prompt_positions'), '{:,}')} | {_s(mt.get('vision_encode_ms'))} | "
              f"{_s(mt.get('prompt_eval_ms'))} | {_s(mt.get('ttft_ms'))} | {_f(mt.get('decode_tps'), '{:.2f}')} | "
              f"{_f(mt.get('peak_rss_mib'), '{:.0f} MiB')} |", ""]
    sv = lc.get("server")
    if sv:
        L += ["llama-server (one slot, prompt cache on), the 384x384 image, one request per turn resending the "
              "history (`timings` of each response):", "", "```bash", sv["command"], "```", ""]
        if sv.get("error"):
            L += [f"Failed: {sv['error']}", ""]
        L += ["| request | prompt_n (evaluated) | cache_n (reused) | prompt_ms | tok/s | wall |", "|---|---|---|---|---|---|"]
        for q in sv.get("requests", []):
            L.append(f"| {q['turn']} | {_f(q.get('prompt_n'), '{:,}')} | {_f(q.get('cache_n'), '{:,}')} | "
                     f"{_s(q.get('prompt_ms'))} | {_f(q.get('predicted_per_second'), '{:.2f}')} | {_s(q.get('wall_ms'))} |")
        L.append("")
    if doc.get("ratios"):
        L += ["| ours / theirs | ours | theirs | ratio | positions (ours / theirs) |", "|---|---|---|---|---|"]
        for x in doc["ratios"]:
            unit = (lambda v: f"{v:.2f}") if "tok/s" in x["what"] else _s
            L.append(f"| {x['what']} (image_tokens={x['budget']}, vs {x['against']}) | {unit(x['ours'])} | "
                     f"{unit(x['theirs'])} | {x['ratio']:.2f} | {_f(x.get('ours_positions'), '{:,}', '-')} / "
                     f"{_f(x.get('theirs_positions'), '{:,}', '-')} |")
        L.append("")
    L += ["## Targets (issue 28)", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in doc["targets"]:
        met = {True: "pass", False: "**FAIL**", None: "not measured"}[t["met"]]
        L.append(f"| {t['name']} | {t['goal']} | {_f(t['value'], '{:.2f}')} | {met}"
                 + (f" ({t['note']})" if t["note"] else "") + " |")
    e = doc["extrapolated_8_core"]
    L += ["", "## An 8-core laptop (extrapolated, not measured)", "",
          f"Vision and prefill divided by {e['factor']:.2f}: {e['how']}. {e['decode'].capitalize()}.", ""]
    for x in e["rows"]:
        fu = ", ".join(_s(v) for v in x["follow_up_ttft_ms_extrapolated"]) or "-"
        L.append(f"- **extrapolated**, image_tokens={x['budget']} ({x['image_positions']:,} image positions): "
                 f"first token ~{_s(x['ttft_ms_extrapolated'])} (measured here {_s(x['ttft_ms_measured'])}); "
                 f"follow-ups ~{fu}")
    return "\n".join(L) + "\n"


def write_results(doc: dict, out: Path) -> tuple[Path, Path]:
    from r4b_edge.fsutil import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "true_size.json", out / "true_size.md"
    with atomic_write(j) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    with atomic_write(md) as tmp:
        tmp.write_text("# True size: a random-weight R-4B on this machine (issue 28)\n\n" + markdown(doc))
    return j, md


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
    doc["missing"] = next((r["missing"] for r in doc["runs"] if "missing" in r), [])
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
