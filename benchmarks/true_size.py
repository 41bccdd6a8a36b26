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
   `Model.conversation(image)`, `Conversation.stream(q, mode="no-think", max_tokens=16)`) about
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
