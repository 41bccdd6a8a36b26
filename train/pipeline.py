"""`train reproduce`: the whole chain from scratch with a fixed seed -> the shipped
checkpoint (fp16 R-4B folder), its model card and the eval outputs. `train ship`
does only the last part from a finished run."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from r4b_edge.errors import TrainingError
from r4b_edge.fsutil import atomic_write

from .card import card_inputs, model_card, write_example
from .cli import add_run_flags
from .dist import barrier, is_main, setup_dist
from .recipe import Recipe, load_recipe, set_threads

ASSETS = Path(__file__).resolve().parents[1] / "r4b_edge" / "assets"
STAGE_ORDER = ("lm", "pretrain", "anneal", "bpo", "grpo")
#: How often a running stage writes its time so far (an interrupted stage keeps it for the resume).
HEARTBEAT_S = 30.0


def stage_timing(run_dir: Path, stage: str) -> tuple[float | None, bool]:
    """Wall seconds a stage took and whether this run's own timer recorded them: `wall_seconds.json`
    written by `run_stage` (or the eval) naming this run folder. A stage copied in from another run
    or trained outside `reproduce` falls back to its metrics logs (the last timestamp of each phase,
    summed) and is not timed here; neither is one with no record (None)."""
    w = run_dir / stage / "wall_seconds.json"
    if w.exists():
        rec = json.loads(w.read_text())
        return float(rec["seconds"]), rec.get("run") == str(run_dir.resolve())
    total = None
    for m in sorted((run_dir / stage).rglob("metrics.jsonl")) if (run_dir / stage).is_dir() else []:
        rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        if rows:
            total = (total or 0.0) + float(max(x.get("time", 0.0) for x in rows))
    return total, False


def run_timing(run_dir: Path) -> dict:
    """timing.json's fields: seconds per stage and eval, and the ones this run's timers recorded."""
    got = {st: stage_timing(run_dir, st) for st in STAGE_ORDER + ("eval",)}
    return {"stages": {st: v[0] for st, v in got.items()}, "timed_here": [st for st, v in got.items() if v[1]]}


def run_stage(run_dir: Path, r: Recipe, stage: str, nproc: int) -> float:
    """Run one stage (in-process, or under torchrun when nproc > 1); returns wall seconds.
    A stage finished earlier is skipped and its recorded wall time left as it is. While it runs,
    its time so far is written every `HEARTBEAT_S` (`"partial": true`), so a stage killed midway
    and resumed later adds its new time to the old (the steps redone after the last checkpoint
    count twice: an overestimate, never an underestimate)."""
    from .stages import stage_model_dir

    if (stage_model_dir(run_dir, stage) / "config.json").exists():
        return 0.0
    w = run_dir / stage / "wall_seconds.json"
    prev = float(json.loads(w.read_text())["seconds"]) if w.exists() else 0.0
    t0 = time.time()

    def record(partial: bool) -> None:
        rec = {"seconds": prev + time.time() - t0, "run": str(run_dir.resolve())} | ({"partial": True} if partial else {})
        with atomic_write(w) as tmp:
            tmp.write_text(json.dumps(rec))

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            record(partial=True)

    beat = threading.Thread(target=heartbeat, daemon=True)
    if is_main():
        beat.start()
    try:
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m",
                   "r4b_edge.train", stage, "--run-dir", str(run_dir)]
            rc = subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(max(1, r.threads))))
            if rc:
                raise TrainingError(f"stage {stage} exited with status {rc} under torchrun ({nproc} processes)")
        else:
            from . import anneal, bpo, lm, pretrain

            fn = {"lm": lm.run, "pretrain": pretrain.run, "anneal": anneal.run,
                  "bpo": lambda d, rr: bpo.run(d, rr, "bpo"), "grpo": lambda d, rr: bpo.run(d, rr, "grpo")}[stage]
            fn(run_dir, r)
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        if is_main():
            record(partial=not (stage_model_dir(run_dir, stage) / "config.json").exists())
    barrier()
    return time.time() - t0


def ship(run_dir: Path, r: Recipe, out: Path, results: dict, timing: dict) -> Path:
    """Write the BPO model as fp16 into `out` with card, recipe and eval outputs."""
    from r4b_edge.model.checkpoint import save_checkpoint

    from .stages import load_stage_model

    model, cfg = load_stage_model(run_dir, "bpo", torch.device("cpu"))
    model = model.half()
    save_checkpoint(model, cfg, run_dir / "tokenizer", out)
    ev_src, ev_dst = run_dir / "eval", out / "eval"
    if ev_src.exists():
        if ev_dst.exists():
            shutil.rmtree(ev_dst)
        shutil.copytree(ev_src, ev_dst, ignore=shutil.ignore_patterns("items.json"))  # per-item arrays stay in the run
    (out / "recipe.json").write_text((run_dir / "recipe.json").read_text())
    example = write_example(out.parent / "example.png")
    inputs = card_inputs(run_dir, cfg, results, timing, example, model.num_parameters())
    (out / "MODEL_CARD.md").write_text(model_card(inputs))
    for p in [out, *out.rglob("*")]:  # package data: world-readable
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    """`train reproduce [--run DIR] [--nproc N] [--out DIR]`: all stages (resumable), eval, ship."""
    ap = argparse.ArgumentParser(prog="r4b-edge train reproduce", description=main.__doc__)
    add_run_flags(ap)
    ap.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun when > 1)")
    ap.add_argument("--out", default=str(ASSETS / "model"), help="where the shipped folder goes")
    ap.add_argument("--skip-eval", action="store_true")
    a = ap.parse_args(argv)
    setup_dist()
    run_dir = Path(a.run)
    r = load_recipe(run_dir, a.preset, a.set)
    set_threads(r)
    t0 = time.time()
    for st in STAGE_ORDER:
        print(f"[reproduce] {st}", flush=True)
        run_stage(run_dir, r, st, a.nproc)
    results: dict = {}
    if not is_main():
        return 0
    if not a.skip_eval:
        from .evaluate import run as run_eval

        results = run_eval(run_dir, r, run_dir / "eval")  # writes eval/wall_seconds.json
    timing = dict(run_timing(run_dir), this_invocation_seconds=time.time() - t0)
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=2))
    if results:
        ship(run_dir, r, Path(a.out), results, timing)
    print(json.dumps(timing))
    return 0


def main_ship(argv: list[str] | None = None) -> int:
    """`train ship [--run DIR] [--out DIR]`: fp16 folder + card from a run with eval/results.json."""
    ap = argparse.ArgumentParser(prog="r4b-edge train ship", description=main_ship.__doc__)
    add_run_flags(ap, preset=False)
    ap.add_argument("--out", default=str(ASSETS / "model"))
    a = ap.parse_args(argv)
    run_dir = Path(a.run)
    r = load_recipe(run_dir, None)
    res_p = run_dir / "eval" / "results.json"
    if not res_p.exists():
        raise TrainingError(f"{res_p} missing: run `train eval --run {run_dir}` first")
    tp = run_dir / "timing.json"
    timing = dict(json.loads(tp.read_text()) if tp.exists() else {}, **run_timing(run_dir))
    tp.write_text(json.dumps(timing, indent=2))
    ship(run_dir, r, Path(a.out), json.loads(res_p.read_text()), timing)
    print(a.out)
    return 0
