"""The shipped model's card, generated from measurements only: every number in it comes from the
run it describes (eval/results.json, timing.json, anneal/curation.json + curated.jsonl,
recipe.json, the model's config and tokenizer), gathered into `CardInputs`. Also writes the
README's example image. Called by `train ship` / `train reproduce` (pipeline.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .eval_report import (calibration_tables, family_table, follow_up_table, graded_table, mode_table, pct,
                          sweep_check_table, target_table, targets)
from .world import GRADED

#: The README quick-start image and the question it is meant for.
EXAMPLE = {"seed": 4242, "index": 7, "family": "sum"}
#: `train reproduce` from scratch on the 2-core machine: the issue's bar, in seconds.
REPRODUCE_BAR_S = 2 * 3600


def write_example(out: Path) -> dict:
    """Render the quick-start image; returns its question and answer."""
    from .world import make_example, render

    scene, q = make_example(EXAMPLE["seed"], EXAMPLE["index"], EXAMPLE["family"], "eval")
    render(scene).save(out)
    return {"image": out.name, "question": q.question, "answer": q.answer, "trace": q.trace}


@dataclass
class CardInputs:
    """Everything the card states, as read from the run (nothing else goes into it)."""

    results: dict  # eval/results.json
    timing: dict  # timing.json: {"stages": {stage: seconds | None}}
    recipe: dict  # recipe.json
    config: dict  # {"text": text_config, "vision": vision_config, "tokens_per_view": int}
    n_params: int
    example: dict  # write_example's {question, answer, trace}
    tokens: dict  # {"think_opening": n, "no_think_opening": n}: forced tokens after `<think>`
    curation: dict | None = None  # anneal/curation.json: {family: {direct, think}}
    curation_levels: dict | None = None  # graded records per level: {family: {level: {direct, think}}}


def curation_levels(curated: Path) -> dict | None:
    """{family: {level: {direct, think}}} of the graded records in anneal/curated.jsonl."""
    if not curated.exists():
        return None
    out: dict[str, dict[str, dict[str, int]]] = {}
    for line in curated.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        meta = rec.get("meta", {})
        if meta.get("family") in GRADED:
            s = out.setdefault(meta["family"], {}).setdefault(str(meta.get("level")), {"direct": 0, "think": 0})
            s[rec["mode"]] = s.get(rec["mode"], 0) + 1
    return out


def card_inputs(run_dir: Path, cfg: Any, results: dict, timing: dict, example: dict, n_params: int) -> CardInputs:
    """Gather the card's inputs from a finished run."""
    from .rollout import forced_ids
    from .stages import load_tokenizer

    tok = load_tokenizer(run_dir)
    forced = {k: len(forced_ids(tok, m)) for k, m in (("think_opening", "long"), ("no_think_opening", "short"))}
    cur = run_dir / "anneal" / "curation.json"
    return CardInputs(results=results, timing=timing, recipe=json.loads((run_dir / "recipe.json").read_text()),
                      config={"text": dict(cfg.text_config), "vision": dict(cfg.vision_config),
                              "tokens_per_view": int(cfg.tokens_per_view)},
                      n_params=int(n_params), example=example, tokens=forced,
                      curation=json.loads(cur.read_text()) if cur.exists() else None,
                      curation_levels=curation_levels(run_dir / "anneal" / "curated.jsonl"))


def token_definition(tokens: dict) -> str:
    """The one token count (eval, engine `Stats`/`Result.token_ids`, benchmarks, API usage)."""
    direct = tokens["no_think_opening"] + 2
    return (f"Token counts (here, in the eval, the engine's `Stats` and `Result.token_ids`, the API's usage and the "
            f"benchmarks): every token the model emitted after the prompt's `<think>`, forced ones included: the "
            f"forced opening of think mode (`\\n`, {tokens['think_opening']} token) and of a direct answer "
            f"(`\\n\\n</think>\\n\\n`, {tokens['no_think_opening']} tokens), the reasoning, `</think>`, the answer and "
            f"the end token. A one-token direct answer is {direct} tokens.")


def curation_table(inp: CardInputs) -> list[str]:
    """Annealing curation counts per family (and per graded level)."""
    if not inp.curation:
        return []
    lines = ["| family | direct | think (all N no-think samples wrong) |", "|---|---|---|"]
    for fam, s in inp.curation.items():
        lines.append(f"| {fam} | {s.get('direct', 0)} | {s.get('think', 0)} |")
        for lv, c in ((inp.curation_levels or {}).get(fam) or {}).items():
            lines.append(f"| {fam} ({lv}) | {c.get('direct', 0)} | {c.get('think', 0)} |")
    return lines


def not_timed_here(timing: dict) -> list[str]:
    """Stages whose time this run's own timers did not record (copied in from another run); [] for
    a timing.json written before `timed_here` existed."""
    here = timing.get("timed_here")
    return [] if here is None else [k for k in timing["stages"] if k not in here]


def wall_table(timing: dict) -> tuple[list[str], float]:
    """Wall time per stage and the total (seconds)."""
    st, reused = timing["stages"], not_timed_here(timing)

    def cell(k: str, v: float | None) -> str:
        if not v:
            return "not recorded"
        return f"{v / 60:.1f} min" + (" (trained in an earlier run: the time recorded there)" if k in reused else "")

    total = float(sum(v for v in st.values() if v))
    lines = ["| stage | wall time |", "|---|---|"] + [f"| {k} | {cell(k, v)} |" for k, v in st.items()]
    return lines + [f"| total | {total / 60:.1f} min{' (stage sum)' if reused else ''} |"], total


def reproduce_row(timing: dict, total: float) -> tuple[str, bool | None, str]:
    """The from-scratch target: measured only when every stage was timed in this run."""
    name = f"`train reproduce` from scratch <= {REPRODUCE_BAR_S // 3600} h (all stages + eval)"
    reused = not_timed_here(timing)
    if reused:
        return name, None, (f"{', '.join(reused)} trained in an earlier run; stage sum {total / 60:.1f} min, "
                            "not one from-scratch run")
    return name, total <= REPRODUCE_BAR_S, f"{total / 60:.1f} min"


def rl_note(inp: CardInputs) -> str:
    """What BPO and plain GRPO changed, from the measured rows and the GRPO curve."""
    m, r = inp.results["models"], inp.recipe
    if not {"anneal", "bpo"} <= set(m):
        return ""

    def v(model: str, mode: str, tier: str, key: str) -> str:
        x = m[model][mode].get(tier)
        return pct(x[key]) if x else "n/a"

    text = (f"- RL: {r['rl_steps']} steps x {r['rl_prompts']} prompts x {2 * r['rl_group']} rollouts at lr {r['rl_lr']:g}. "
            f"Auto accuracy anneal -> BPO: {v('anneal', 'auto', 'overall', 'accuracy')} -> "
            f"{v('bpo', 'auto', 'overall', 'accuracy')}; auto think-rate on reasoning "
            f"{v('anneal', 'auto', 'reasoning', 'think_rate')} -> {v('bpo', 'auto', 'reasoning', 'think_rate')}, on "
            f"perception {v('anneal', 'auto', 'perception', 'think_rate')} -> {v('bpo', 'auto', 'perception', 'think_rate')}, "
            f"on the graded family {v('anneal', 'auto', 'graded', 'think_rate')} -> {v('bpo', 'auto', 'graded', 'think_rate')}.")
    if "grpo" in m:
        text += (f" Plain GRPO (free mode choice): auto accuracy {v('grpo', 'auto', 'overall', 'accuracy')}, auto "
                 f"think-rate on perception {v('grpo', 'auto', 'perception', 'think_rate')}.")
    c = inp.results.get("grpo_curve") or {}
    p = [x for x in c.get("perception", []) if x is not None]
    if p:
        k = max(1, len(p) // 5)
        first, last = sum(p[:k]) / k, sum(p[-k:]) / k
        text += (f" Its rollout think-rate on perception went {pct(first)} -> {pct(last)} (mean of the first and "
                 f"last fifth of the logged steps): {'a drift toward thinking' if last > first else 'no drift toward thinking'}.")
    return text


def weak_note(inp: CardInputs, ship: str) -> str:
    """Families under the perception bar in some mode (measured), or nothing."""
    res = inp.results["models"][ship]
    low = sorted(((f, md, a) for md in ("auto", "think", "no-think") for f, a in res[md]["families"].items()
                  if a < 0.975), key=lambda x: x[2])
    if not low:
        return ""
    return "- Families under 97.5% in some mode: " + ", ".join(f"{f} {md} {pct(a)}" for f, md, a in low) + "."


def model_card(inp: CardInputs) -> str:
    """MODEL_CARD.md text, from `inp` only."""
    res, r = inp.results, inp.recipe
    ship = res.get("ship", "bpo")
    tc, vc = inp.config["text"], inp.config["vision"]
    models = res["models"]
    walls, total = wall_table(inp.timing)
    rows = targets(models[ship], models.get("anneal") if ship != "anneal" else None)
    rows.append(reproduce_row(inp.timing, total))
    n = res["n_items"]
    tiers = ", ".join(f"{v} {k}" for k, v in n.items())
    lv = ", ".join(f"{v} {k}" for k, v in (res.get("n_levels") or {}).items())
    ex = inp.example
    sections = [
        "# r4b-edge default model (world-R-tiny)", "",
        f"A {inp.n_params / 1e6:.2f} M-parameter model in the R-4B layout (SigLIP vision tower + projector + Qwen3 "
        "decoder, `RForConditionalGeneration`, base view only) trained from scratch with `r4b-edge train reproduce` "
        "on the procedural visual-reasoning world (docs/world.md), following R-4B's recipe: text pre-training of the "
        "decoder -> alignment with non-thinking loss masking -> bi-mode annealing (curated by the paper's rule, "
        f"N={r['an_samples']} no-think samples per item: all wrong -> thinking sample) -> BPO. It decides per item "
        "whether to think; the follow-up questions of a chat are trained. It knows nothing outside the world.", "",
        f"- text: Qwen3, hidden {tc['hidden_size']}, {tc['num_hidden_layers']} layers, {tc['num_attention_heads']} heads "
        f"({tc['num_key_value_heads']} KV, head_dim {tc['head_dim']}), MLP {tc['intermediate_size']}, vocab {tc['vocab_size']}",
        f"- vision: SigLIP, {vc['image_size']} px, patch {vc['patch_size']} -> {inp.config['tokens_per_view']} image tokens, "
        f"hidden {vc['hidden_size']}, {vc['num_hidden_layers']} layers; `vision_aspect_ratio` \"base\" (no AnyRes)",
        f"- weights: fp16 safetensors; seed {r['seed']}; full recipe in `recipe.json` next to this card", "",
        "## Quick start", "",
        f"`r4b_edge/assets/example.png` with the question \"{ex['question']}\" (answer {ex['answer']}; trace: "
        f"`{ex['trace'].replace(chr(10), ' / ')}`).", "",
        "## Evaluation", "",
        f"Held-out world split (seed {res['seed']}, {res.get('per_family', 'n/a')} items per family: {tiers}"
        + (f"; graded levels {lv}" if lv else "") + "), greedy, fp16-rounded weights, models anneal, BPO (shipped: "
        f"{ship}) and plain GRPO. Time-to-answer: unbatched, the first {r['ev_time_items']} items per tier, CPU torch "
        "on a shared machine (noisy).", "",
        token_definition(inp.tokens), "",
        "### Single question", ""] + mode_table(models) + ["", "Accuracy per question family:", ""] + family_table(models)
    sections += ["", "### Follow-up questions", "",
                 "Every item asked again as the 2nd and as the 3rd question of a chat about its image, auto mode; the "
                 "history holds the model's own earlier answers (greedy, answer text only, as the runtime keeps it).", ""]
    sections += follow_up_table(models)
    if any(x.get("graded") for x in models.values()):
        sections += ["", "### Graded family: one template, easy and hard items", ""] + graded_table(models)
    if any(x.get("calibration") for x in models.values()):
        sections += ["", "### p_think as a calibrated signal", "",
                     "AUROC of p_think for \"no-think answers this item wrong\", the reliability table and the "
                     "threshold sweep. The sweep is offline: an item thinks iff p_think >= threshold and takes its forced "
                     "think result, else its forced no-think result, which is what the engine's auto mode with that "
                     "`think_threshold` does under greedy decoding.", ""] + calibration_tables(models, ship)
        sections += ["", "Offline decisions against the measured auto run:", ""] + sweep_check_table(models[ship], ship)
        sections += ["", "![threshold sweep](eval/threshold_curve.png)", "![reliability](eval/reliability.png)"]
    sections += ["", "### Targets", ""] + target_table(rows)
    sections += ["", "![accuracy vs tokens](eval/accuracy_vs_tokens.png)"]
    if res.get("grpo_curve"):
        sections += ["![GRPO think rate](eval/grpo_think_rate.png)"]
    cur = curation_table(inp)
    if cur:
        sections += ["", "## Annealing curation", "",
                     f"Per family: items kept direct and items given a thinking sample (all {r['an_samples']} "
                     "no-think samples wrong).", ""] + cur
    sections += ["", "## Reproduction", "",
                 f"`r4b-edge train reproduce --run runs/shipped`, one process, torch threads: {r['threads']}; wall "
                 "times from the run's own timers (tokenizer training is part of the first stage).", ""] + walls
    notes = [x for x in (rl_note(inp), weak_note(inp, ship)) if x]
    if not all(ok for _, ok, _ in rows):
        notes.append("- Some targets are not met: the rows marked NO (or not measured) in the table above.")
    if notes:
        sections += ["", "## Notes", ""] + notes
    return "\n".join(sections) + "\n"
