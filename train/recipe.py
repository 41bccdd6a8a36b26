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
import time
from pathlib import Path
from typing import Any

import torch

from r4b_edge.errors import TrainingError

from .common import Recipe, barrier, is_main, load_recipe, set_threads, setup_dist

ASSETS = Path(__file__).resolve().parents[1] / "r4b_edge" / "assets"
STAGE_ORDER = ("lm", "pretrain", "anneal", "bpo", "grpo")
#: The README quick-start image and the question it is meant for.
EXAMPLE = {"seed": 4242, "index": 7, "family": "sum"}


def stage_seconds(run_dir: Path, stage: str) -> float | None:
    """Wall seconds a stage took (wall_seconds.json, else the last metrics timestamp)."""
    w = run_dir / stage / "wall_seconds.json"
    if w.exists():
        return float(json.loads(w.read_text())["seconds"])
    m = run_dir / stage / "metrics.jsonl"
    if m.exists():
        rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        return float(max(x.get("time", 0.0) for x in rows)) if rows else None
    return None


def run_stage(run_dir: Path, r: Recipe, stage: str, nproc: int) -> float:
    """Run one stage (in-process, or under torchrun when nproc > 1); returns wall seconds.
    A stage finished earlier is skipped and its recorded wall time left as it is."""
    from .pretrain import stage_model_dir

    if (stage_model_dir(run_dir, stage) / "config.json").exists():
        return 0.0
    t0 = time.time()
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
    dt = time.time() - t0
    w = run_dir / stage / "wall_seconds.json"
    if is_main():
        prev = json.loads(w.read_text())["seconds"] if w.exists() else 0.0
        w.parent.mkdir(parents=True, exist_ok=True)
        w.write_text(json.dumps({"seconds": prev + dt}))
    barrier()
    return dt


def write_example(out: Path) -> dict:
    """Render the quick-start image; returns its question and answer."""
    from r4b_edge.world import make_example, render

    scene, q = make_example(EXAMPLE["seed"], EXAMPLE["index"], EXAMPLE["family"], "eval")
    render(scene).save(out)
    return {"image": out.name, "question": q.question, "answer": q.answer, "trace": q.trace}


def colour_count_note(bpo: dict, r: Recipe) -> str:
    """The card's colour-count paragraph: how it was learned, and what is still weak (measured)."""
    from r4b_edge.world import PERCEPTION

    fams = [f for f in bpo["no-think"]["families"] if f in PERCEPTION]
    low = {(m, f): bpo[m]["families"][f] for m in ("auto", "think", "no-think") for f in fams
           if bpo[m]["families"][f] < 0.97}
    cc = {m: f"{100 * bpo[m]['families']['colour-count']:.0f}%" for m in ("auto", "think", "no-think")}
    text = f"""- Colour-count ("How many red items are there?") needs the asked colour matched against four
  cells. The plain mix never taught it (previous recipe: 53-60%, about "always 1"; its stage-0
  decoder answered it from a *text* scan at 26/40; an 8-layer decoder at 25/40; stage-0 traces
  and an answer carried from the colour word did not help). What did: per-cell match-bit targets
  on the question's slots and a stage-1 focus phase ({r.pt_focus_steps} steps, colour-count at
  {100 * r.pt_focus_share:.0f}% of the batch; docs/training.md). Now {cc['no-think']} no-think, {cc['auto']} auto,
  {cc['think']} think."""
    if low:
        worst = ", ".join(f"{f} {m} {100 * v:.0f}%" for (m, f), v in sorted(low.items(), key=lambda kv: kv[1]))
        text += f"\n  Still under 97%: {worst}."
    if any(m == "think" for m, _ in low):
        text += f"""
  In think mode the scan is right and the weak step is the selection line after it, which
  copies from the wrong line (`bottom-right -> 8` after `bottom-right red 4`) or misses a
  matching cell (`blue: none -> 0` after `bottom-left blue triangle`). Only the annealing
  traces teach it ({100 * r.an_perception_trace_frac:.0f}% of the direct side, forced-think; 10% left count at 33/40 and
  colour-count at 35/40 think); next levers: more traced steps, or selections written as
  per-cell running counts."""
    return text


def rl_note(results: dict, r: Recipe) -> str:
    """The card's RL paragraph, from the measured anneal/BPO/GRPO rows and the GRPO curve."""
    m = results["models"]

    def pct(model: str, mode: str, tier: str, key: str) -> str:
        return f"{100 * m[model][mode][tier][key]:.1f}%"

    text = f"""- RL is short ({r.rl_steps} steps x {r.rl_prompts} prompts x {2 * r.rl_group} rollouts at lr {r.rl_lr:g}). BPO moves
  auto accuracy {pct('anneal', 'auto', 'overall', 'accuracy')} -> {pct('bpo', 'auto', 'overall', 'accuracy')}, through the decision (auto think-rate on reasoning
  {pct('anneal', 'auto', 'reasoning', 'think_rate')} -> {pct('bpo', 'auto', 'reasoning', 'think_rate')}, on perception {pct('anneal', 'auto', 'perception', 'think_rate')} -> {pct('bpo', 'auto', 'perception', 'think_rate')})."""
    c = results.get("grpo_curve") or {}
    p = [x for x in c.get("perception", []) if x is not None]
    if p:
        k = max(1, len(p) // 5)
        first, last = sum(p[:k]) / k, sum(p[-k:]) / k
        text += f"""
  Plain GRPO's rollout think-rate on perception goes {100 * first:.1f}% -> {100 * last:.1f}% (first/last {k} steps)"""
        if last > first:
            text += """: the
  drift toward thinking of the paper's Fig. 10, small over this short run."""
        else:
            text += f""": no
  drift toward thinking here (the paper's Fig. 10 shows one). Free rollouts start from an
  annealed decision that almost never thinks on perception, and thinking is the less accurate
  mode there (GRPO model: perception {pct('grpo', 'think', 'perception', 'accuracy')} think vs {pct('grpo', 'no-think', 'perception', 'accuracy')} no-think), so
  GRPO has nothing to reinforce. The previous recipe, whose annealed decision started at a
  think probability of ~0.1-0.3 on perception, did drift (11.1% -> 12.1% over the same 80 steps).
  Nor with reasoning-only RL prompts (the paper's math-only setting, measured on this model's
  annealed stage): mean think probability on 200 held-out perception prompts 0.002 -> 0.001
  (docs/training.md)."""
    return text + """
  An earlier run with rl_lr 1e-4 drifted (KL ~0.3/token) and lowered auto accuracy."""


def model_card(run_dir: Path, r: Recipe, cfg: Any, results: dict, timing: dict, example: dict) -> str:
    """MODEL_CARD.md text: what it is, how it was made, the measured eval table."""
    from .evaluate import markdown

    tc, vc = cfg.text_config, cfg.vision_config
    bpo = results["models"]["bpo"]
    ratio = bpo["auto"]["overall"]["mean_tokens"] / bpo["think"]["overall"]["mean_tokens"]

    def tok(mode: str, tier: str) -> str:
        return f"{bpo[mode][tier]['mean_tokens']:.1f}"

    n_params = timing.get("n_params")
    total = sum(v for v in timing["stages"].values() if v)
    stage_rows = "\n".join(f"| {k} | {v / 60:.1f} min |" if v else f"| {k} | - |" for k, v in timing["stages"].items())
    return f"""# r4b-edge default model (world-R-tiny)

A {n_params / 1e6:.1f} M-parameter model in the R-4B layout (SigLIP vision tower + LayerNorm/MLP
projector + Qwen3 decoder, `RForConditionalGeneration`, base view only) trained from scratch
with `r4b-edge train reproduce` on the procedural visual-reasoning world (docs/world.md), following
R-4B's recipe: text pre-training of the decoder (standing in for the pre-trained Qwen3 that R-4B
starts from) -> alignment with non-thinking loss masking -> bi-mode annealing (curated by the N=8
no-think rule) -> BPO. It auto-thinks: it answers perception questions directly and writes a step
trace before answering reasoning questions. It knows nothing outside the world.

- text: Qwen3, hidden {tc['hidden_size']}, {tc['num_hidden_layers']} layers, {tc['num_attention_heads']} heads
  ({tc['num_key_value_heads']} KV, head_dim {tc['head_dim']}), MLP {tc['intermediate_size']}, vocab {tc['vocab_size']}
- vision: SigLIP, {vc['image_size']} px, patch {vc['patch_size']} -> {cfg.tokens_per_view} image tokens,
  hidden {vc['hidden_size']}, {vc['num_hidden_layers']} layers; `vision_aspect_ratio` "base" (no AnyRes)
- weights: fp16 safetensors; tokenizer: byte-level BPE (Qwen2 pre-tokenizer) trained on world text
- seed {r.seed}; full recipe in `recipe.json` next to this card

## Quick start

`r4b_edge/assets/example.png` with the question "{example['question']}"
(answer {example['answer']}; the model should think: `{example['trace'].replace(chr(10), ' / ')}`).

## Evaluation (held-out world split, greedy, {results['n_items']['perception']} perception +
{results['n_items']['reasoning']} reasoning items; all rows use the fp16-rounded weights)

Time-to-answer: mean wall time until the answer starts (after `</think>`), unbatched, on the first
{r.ev_time_items} items per tier, CPU torch, on a shared 2-core machine (noisy).

{markdown(results)}
![accuracy vs tokens](eval/accuracy_vs_tokens.png)
![GRPO think rate](eval/grpo_think_rate.png)

## Reproduction

`r4b-edge train reproduce --run runs/shipped` (one process; `--nproc 2` runs each stage under
torchrun). Measured wall time on the 2-core machine ({r.threads} torch threads): {total / 60:.1f} min
(per-stage wall times from the run's own timers; tokenizer training is part of the first row,
rendering the pre-training world part of the second).

| stage | wall time |
|---|---|
{stage_rows}

## Limitations and what would close the gaps

{colour_count_note(bpo, r)}
- Auto mode spends {ratio:.2f}x the tokens of think mode{" (target <= 0.5x)" if ratio > 0.5 else ""}: a direct answer costs {tok('no-think', 'perception')} tokens
  (empty think block + answer + end), a think-mode answer {tok('think', 'perception')} on perception and
  {tok('think', 'reasoning')} on reasoning, so with the eval's {results['n_items']['perception']}:{results['n_items']['reasoning']} perception:reasoning mix auto saves
  only on the perception side, and thinks on reasoning as it should. Shorter reasoning traces
  do not close it: a run whose reasoning traces dropped the colour words (4 tokens fewer) still
  measured 0.51x, because its auto think-rate on reasoning rose to 100%, and its think-mode
  reasoning fell to 87% (docs/training.md).
{rl_note(results, r)}
{turn_note(results, r)}
"""


def turn_note(results: dict, r: Recipe) -> str:
    """The card's multi-turn paragraph, from the eval's second-turn rows."""
    s2 = results["models"]["bpo"].get("second_turn")
    got = ""
    if s2:
        got = (f" Second question of a two-question chat (auto): {100 * s2['overall']['accuracy']:.1f}% "
               f"(perception {100 * s2['perception']['accuracy']:.1f}%, reasoning {100 * s2['reasoning']['accuracy']:.1f}%) "
               f"vs {100 * results['models']['bpo']['auto']['overall']['accuracy']:.1f}% single-turn.")
    if r.an_two_turn_frac > 0:
        return (f"- Chats: annealing teaches {100 * r.an_two_turn_frac:.0f}% of its items as the second question of a chat\n"
                f"  about the image (the first a perception question; docs/training.md). BPO is single-turn.{got}\n"
                "  Three or more questions are untrained.")
    return ("- Multi-turn chat is not trained (every training item is a single question); later turns work\n"
            f"  through the template but are out of distribution.{got} The lever (`an_two_turn_frac`)\n"
            "  and its measured trade: docs/training.md.")


def ship(run_dir: Path, r: Recipe, out: Path, results: dict, timing: dict) -> Path:
    """Write the BPO model as fp16 into `out` with card, recipe and eval outputs."""
    from r4b_edge.model.checkpoint import save_checkpoint

    from .pretrain import load_stage_model

    model, cfg = load_stage_model(run_dir, "bpo", torch.device("cpu"))
    timing = dict(timing, n_params=model.num_parameters())
    model = model.half()
    save_checkpoint(model, cfg, run_dir / "tokenizer", out)
    ev_src, ev_dst = run_dir / "eval", out / "eval"
    if ev_src.exists():
        if ev_dst.exists():
            shutil.rmtree(ev_dst)
        shutil.copytree(ev_src, ev_dst)
    (out / "recipe.json").write_text((run_dir / "recipe.json").read_text())
    example = write_example(out.parent / "example.png")
    (out / "MODEL_CARD.md").write_text(model_card(run_dir, r, cfg, results, timing, example))
    for p in [out, *out.rglob("*")]:  # package data: world-readable
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    """`train reproduce [--run DIR] [--nproc N] [--out DIR]`: all stages (resumable), eval, ship."""
    ap = argparse.ArgumentParser(prog="r4b-edge train reproduce", description=main.__doc__)
    ap.add_argument("--run-dir", "--run", dest="run", default="runs/shipped")
    ap.add_argument("--preset", default="shipped", choices=["shipped", "micro"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
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

        te = time.time()
        results = run_eval(run_dir, r, run_dir / "eval")
        (run_dir / "eval" / "wall_seconds.json").write_text(json.dumps({"seconds": time.time() - te}))
    timing = {"stages": {st: stage_seconds(run_dir, st) for st in STAGE_ORDER + ("eval",)},
              "this_invocation_seconds": time.time() - t0}
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=2))
    if results:
        ship(run_dir, r, Path(a.out), results, timing)
    print(json.dumps(timing))
    return 0


def main_ship(argv: list[str] | None = None) -> int:
    """`train ship [--run DIR] [--out DIR]`: fp16 folder + card from a run with eval/results.json."""
    ap = argparse.ArgumentParser(prog="r4b-edge train ship", description=main_ship.__doc__)
    ap.add_argument("--run-dir", "--run", dest="run", default="runs/shipped")
    ap.add_argument("--out", default=str(ASSETS / "model"))
    a = ap.parse_args(argv)
    run_dir = Path(a.run)
    r = load_recipe(run_dir, None)
    res_p = run_dir / "eval" / "results.json"
    if not res_p.exists():
        raise TrainingError(f"{res_p} missing: run `train eval --run {run_dir}` first")
    timing = {"stages": {st: stage_seconds(run_dir, st) for st in STAGE_ORDER + ("eval",)}}
    ship(run_dir, r, Path(a.out), json.loads(res_p.read_text()), timing)
    print(a.out)
    return 0
