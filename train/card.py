"""The shipped model's card: its prose (recipe, eval tables, notes on the measured trade-offs)
and the README's example image, written by `train ship` / `train reproduce` (recipe.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import Recipe

#: The README quick-start image and the question it is meant for.
EXAMPLE = {"seed": 4242, "index": 7, "family": "sum"}


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
    if r.an_chat_frac > 0:
        return (f"- Chats: annealing teaches {100 * r.an_chat_frac:.0f}% of its items as the second question of a chat\n"
                f"  about the image (the first a perception question; docs/training.md). BPO is single-turn.{got}\n"
                "  Three or more questions are untrained.")
    return ("- Multi-turn chat is not trained (every training item is a single question); later turns work\n"
            f"  through the template but are out of distribution.{got} The lever (`an_two_turn_frac`)\n"
            "  and its measured trade: docs/training.md.")
