"""Evaluation on the held-out world split: per model x mode x tier accuracy, think-rate, mean
output tokens, mean time-to-answer; follow-up questions (eval_chat), the graded families' decision
report, p_think calibration (eval_calibration); JSON + markdown (eval_report) + PNG plots.

Token count (one definition, as the engine's `Stats`/`Result.token_ids` and the benchmarks): every
token the model emitted after the prompt's `<think>`, the forced `\\n` of think mode and the forced
`\\n\\n</think>\\n\\n` of a no-think answer included, and the end token; a one-token direct answer is
5 tokens."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import has_think_tag
from r4b_edge.model.template import API_MODES

from .cli_eval import add_eval_flags
from .data import PixelCache, read_jsonl
from .eval_calibration import calibration, p_think_batched, plot_calibration, sweep_check
from .eval_chat import TURNS, follow_up_items, follow_up_summary
from .eval_report import markdown
from .recipe import Recipe, load_recipe, set_threads
from .rollout import Roller, forced_ids, items_from_records
from .stages import ensure_world, stage_model_dir
from .world import EVAL_SEED_OFFSET, FAMILIES, TIERS

MODES = API_MODES
GROUPS = TIERS + ("overall",)
LEVELS = ("easy", "hard")


def eval_items(run_dir: Path, r: Recipe) -> tuple[list[dict], Path]:
    """The held-out set: split 'eval' scenes (disjoint from training by scene hash), seed
    `r.seed + EVAL_SEED_OFFSET` (train.world.EVAL_SEED for the shipped recipe): the items of
    `train.world.eval_items("eval", r.ev_per_family, r.seed + EVAL_SEED_OFFSET)` (every family),
    written as records for the roller; each item carries its graded `level` (None elsewhere).
    A split written earlier with other families or counts is written again."""
    from .world import write_world

    seed = r.seed + EVAL_SEED_OFFSET
    counts = {f: r.ev_per_family for f in FAMILIES}
    p = ensure_world(run_dir, "eval", seed, counts, split="eval")
    recs = read_jsonl(p)
    got: dict[str, int] = {}
    for x in recs:
        got[x["meta"].get("family")] = got.get(x["meta"].get("family"), 0) + 1
    if got != counts:
        recs = read_jsonl(write_world(p.parent, seed, counts, "eval"))
    items = items_from_records(recs)
    for it, rec in zip(items, recs):
        it["level"] = rec["meta"].get("level")
    return items, p.parent


def load_eval_model(folder: Path, fp16_round: bool = True) -> tuple[Any, Any, Any]:
    """(model fp32, config, tokenizers.Tokenizer); weights rounded through fp16 as shipped."""
    from r4b_edge.model.checkpoint import load_checkpoint

    model, cfg, tok = load_checkpoint(folder, dtype=torch.float32)
    if fp16_round:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model.eval(), cfg, tok.backend


def groups_of(items: Sequence[dict]) -> dict[str, np.ndarray]:
    """Boolean masks over the items: one per tier, and 'overall'."""
    tiers = np.array([it["tier"] for it in items])
    return {**{t: tiers == t for t in TIERS}, "overall": np.ones(len(items), dtype=bool)}


def level_groups(items: Sequence[dict]) -> dict[str, np.ndarray]:
    """The graded tier, then each of its levels (masks over the items)."""
    tiers = np.array([it["tier"] for it in items])
    levels = np.array([str(it.get("level")) for it in items])
    return {"graded": tiers == "graded", **{lv: (tiers == "graded") & (levels == lv) for lv in LEVELS}}


def rollout_arrays(ro: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per-item arrays of a list of rollouts: correct, thought, tokens, unclosed, tags (the answer
    holds a think tag)."""
    return {"correct": np.array([x.reward > 0 for x in ro], dtype=bool),
            "thought": np.array([x.parsed.thought for x in ro], dtype=bool),
            "tokens": np.array([x.parsed.n_tokens for x in ro], dtype=np.int64),
            "unclosed": np.array([x.parsed.answer is None for x in ro], dtype=bool),
            "tags": np.array([has_think_tag(x.parsed.answer) for x in ro], dtype=bool)}


def mode_summary(a: dict[str, np.ndarray], groups: dict[str, np.ndarray],
                 timing: dict[str, list[float]] | None = None) -> dict:
    """Per group: n, accuracy, think-rate, mean tokens, unclosed think blocks, answers holding a
    think tag, mean time-to-answer (ms, from `timing`'s unbatched items)."""
    per: dict[str, Any] = {}
    for g, m in groups.items():
        if not m.any():
            continue
        tt = (timing or {}).get(g, [])
        per[g] = {"n": int(m.sum()), "accuracy": float(a["correct"][m].mean()),
                  "think_rate": float(a["thought"][m].mean()), "mean_tokens": float(a["tokens"][m].mean()),
                  "unclosed": int(a["unclosed"][m].sum()), "think_tags": int(a["tags"][m].sum()),
                  "mean_time_to_answer_ms": float(np.mean(tt) * 1000) if tt else None}
    return per


def graded_report(items: Sequence[dict], rows: dict[str, dict[str, np.ndarray]]) -> dict:
    """The graded families (tier graded) and each level: accuracy and mean tokens per mode, auto
    think-rate, and auto's think-rate on the items no-think answers right / wrong (with their n)."""
    out = {}
    nt_ok = rows["no-think"]["correct"]
    auto_th = rows["auto"]["thought"]
    for g, m in level_groups(items).items():
        if not m.any():
            continue
        right, wrong = m & nt_ok, m & ~nt_ok
        out[g] = {"n": int(m.sum()),
                  **{f"accuracy_{md}": float(rows[md]["correct"][m].mean()) for md in MODES},
                  **{f"mean_tokens_{md}": float(rows[md]["tokens"][m].mean()) for md in MODES},
                  "think_rate_auto": float(auto_th[m].mean()),
                  "n_no_think_right": int(right.sum()), "n_no_think_wrong": int(wrong.sum()),
                  "auto_thinks_if_no_think_right": float(auto_th[right].mean()) if right.any() else None,
                  "auto_thinks_if_no_think_wrong": float(auto_th[wrong].mean()) if wrong.any() else None}
    return out


def reply_budget(tok: Any, mode: str, max_tokens: int) -> int:
    """Tokens to generate so the whole reply (forced opening included) is at most `max_tokens`,
    as the engine's `max_tokens` bounds `Result.token_ids`."""
    return max(1, max_tokens - len(forced_ids(tok, mode)))


def raw_answers(ro: Sequence[Any]) -> list[str | None]:
    """The parsed answer text of each rollout (None: the think block never closed)."""
    return [x.parsed.answer for x in ro]


def summarize(items: Sequence[dict], rows: dict[str, dict[str, np.ndarray]],
              timing: dict[str, dict[str, list[float]]] | None = None) -> dict:
    """One model's results from its per-item arrays: `rows[mode]` (rollout_arrays) for each mode,
    `rows["p_think"]` {p, own_choice}, `rows["turn2"]`/`rows["turn3"]` (+ history_ok); `timing`:
    {mode: {group: [seconds]}}."""
    groups = groups_of(items)
    fams = [f for f in FAMILIES if any(it["family"] == f for it in items)]
    fam = np.array([it["family"] for it in items])
    res: dict[str, Any] = {}
    for mode in [m for m in MODES if m in rows]:
        res[mode] = mode_summary(rows[mode], groups, (timing or {}).get(mode))
        res[mode]["families"] = {f: float(rows[mode]["correct"][fam == f].mean()) for f in fams}
    if all(m in rows for m in MODES):
        res["graded"] = graded_report(items, rows)
        if "p_think" in rows:
            p, own = rows["p_think"]["p"], rows["p_think"]["own_choice"]
            res["calibration"] = calibration(p, groups, rows["think"], rows["no-think"])
            res["sweep_check"] = {g: sweep_check(p[m], own[m], {k: v[m] for k, v in rows["auto"].items()},
                                                 {k: v[m] for k, v in rows["think"].items()},
                                                 {k: v[m] for k, v in rows["no-think"].items()})
                                  for g, m in groups.items() if m.any()}
    if "auto" in rows and all(f"turn{t}" in rows for t in TURNS):
        res["follow_up"] = {str(t): follow_up_summary(rows["auto"], rows[f"turn{t}"], groups) for t in TURNS}
    return res


def evaluate_model(model: Any, cfg: Any, tok: Any, items: Sequence[dict], root: Path, r: Recipe,
                   modes: Sequence[str] = MODES, chat_seed: int | None = None) -> tuple[dict, dict]:
    """(results, per-item arrays) of one model, greedy: single-turn per mode x tier, the graded
    report, p_think calibration, the threshold check, and (auto) the follow-ups asked 2nd and 3rd.
    `chat_seed`: world seed of the chats' earlier questions (default the eval split's)."""
    pixels = PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std)
    roller = Roller(model, tok, cfg, root, pixels)
    rows: dict[str, dict[str, np.ndarray]] = {}
    timing: dict[str, dict[str, list[float]]] = {}
    examples = {}
    for mode in modes:
        budget = reply_budget(tok, mode, r.ev_max_new)
        ro = roller.run(items, mode, max_new=budget, chunk=r.ev_batch)
        rows[mode] = rollout_arrays(ro)
        timing[mode] = {g: [] for g in GROUPS}
        for t in TIERS:  # unbatched timing subset
            for it in [it for it in items if it["tier"] == t][:r.ev_time_items]:
                x = roller.run([it], mode, max_new=budget, chunk=1)[0]
                if x.answer_time is not None:
                    timing[mode][t].append(x.answer_time)
                    timing[mode]["overall"].append(x.answer_time)
        examples[mode] = [{"id": it["id"], "question": it["question"], "gold": it["answer"],
                           "output": tok.decode(x.tokens, skip_special_tokens=False)} for it, x in list(zip(items, ro))[:3]]
    p, own = p_think_batched(model, tok, cfg, items, root, pixels, chunk=max(1, r.ev_batch // 2))
    rows["p_think"] = {"p": p, "own_choice": own}
    if "auto" in modes:
        seed = r.seed + EVAL_SEED_OFFSET if chat_seed is None else chat_seed

        def ask(batch: Sequence[dict]) -> list[str | None]:
            return raw_answers(roller.run(batch, "auto", max_new=r.ev_max_new, chunk=r.ev_batch))

        fu = follow_up_items(items, seed, ask)
        for t in TURNS:
            rows[f"turn{t}"] = rollout_arrays(roller.run(fu[t], "auto", max_new=r.ev_max_new, chunk=r.ev_batch))
            rows[f"turn{t}"]["history_ok"] = np.array([x["history_correct"] == len(x["history"]) for x in fu[t]])
    res = summarize(items, rows, timing)
    for mode in modes:
        res[mode]["examples"] = examples[mode]
    return res, rows


def items_json(items: Sequence[dict], per_model: dict[str, dict]) -> dict:
    """The per-item arrays of every model (compact lists), with each item's id, tier, family, level."""
    out: dict[str, Any] = {"id": [it["id"] for it in items], "tier": [it["tier"] for it in items],
                           "family": [it["family"] for it in items], "level": [it.get("level") for it in items],
                           "models": {}}
    for name, rows in per_model.items():
        out["models"][name] = {k: {kk: [round(float(x), 6) if v.dtype.kind == "f" else int(x) for x in v]
                                   for kk, v in d.items()} for k, d in rows.items()}
    return out


def grpo_curve(run_dir: Path) -> dict | None:
    """GRPO's rollout think-rate per tier over steps (paper Fig. 10) from its metrics log."""
    p = run_dir / "grpo" / "metrics.jsonl"
    if not p.exists():
        return None
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    rows = [x for x in rows if "step" in x and "think_rate/perception/auto" in x]
    last: dict[int, dict] = {}
    for x in rows:
        last[x["step"]] = x
    steps = sorted(last)
    return {"steps": steps, **{t: [last[s].get(f"think_rate/{t}/auto") for s in steps] for t in TIERS}}


def plots(all_res: dict, out: Path) -> list[Path]:
    """accuracy_vs_tokens.png (per model x mode, overall), grpo_think_rate.png, and for the shipped
    model reliability.png and threshold_curve.png (eval_calibration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    marks = {"auto": "o", "think": "^", "no-think": "s"}
    for name, res in all_res["models"].items():
        for mode in MODES:
            m = res[mode]["overall"]
            ax.scatter(m["mean_tokens"], m["accuracy"] * 100, marker=marks[mode], s=50, label=f"{name} {mode}")
    ax.set_xlabel("mean output tokens per query")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("held-out world: accuracy vs output tokens")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_tokens.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    c = all_res.get("grpo_curve")
    if c:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for t in TIERS:
            if any(x is not None for x in c.get(t, [])):
                ax.plot(c["steps"], [100 * (x or 0) for x in c[t]], label=t)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("think-rate of rollouts (%)")
        ax.set_title("plain GRPO (free mode choice): thinking rate over training")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "grpo_think_rate.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    ship = all_res.get("ship", "bpo")
    res = all_res["models"].get(ship) or next(iter(all_res["models"].values()))
    if res.get("calibration"):
        cal = {g: c for g, c in res["calibration"].items() if g != "overall"}
        modes = {md: {g: res[md][g] for g in cal if g in res[md]} for md in MODES}
        paths += plot_calibration(cal, modes, out, ship)
    return paths


def run(run_dir: Path, r: Recipe, out: Path, models: Sequence[str] = ("anneal", "bpo", "grpo"),
        ship: str = "bpo") -> dict:
    """Evaluate every finished stage model of the run; writes results.json/.md, items.json (per-item
    arrays), wall_seconds.json and the PNGs into `out`."""
    t_start = time.time()
    set_threads(r)
    items, root = eval_items(run_dir, r)
    counts = {t: sum(it["tier"] == t for it in items) for t in TIERS}
    levels = {lv: sum(it.get("level") == lv for it in items) for lv in LEVELS}
    all_res: dict[str, Any] = {"n_items": counts, "n_levels": levels, "per_family": r.ev_per_family,
                               "seed": r.seed + EVAL_SEED_OFFSET, "ship": ship, "models": {}}
    per_item: dict[str, dict] = {}
    for name in models:
        d = stage_model_dir(run_dir, name)
        if not (d / "config.json").exists():
            continue
        model, cfg, tok = load_eval_model(d)
        t0 = time.time()
        all_res["models"][name], per_item[name] = evaluate_model(model, cfg, tok, items, root, r)
        all_res["models"][name]["eval_seconds"] = round(time.time() - t0, 1)
    if not all_res["models"]:
        raise TrainingError(f"no finished stage models under {run_dir} (looked for {', '.join(models)})")
    all_res["grpo_curve"] = grpo_curve(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(all_res))
    (out / "items.json").write_text(json.dumps(items_json(items, per_item), separators=(",", ":")))
    (out / "results.md").write_text(markdown(all_res, ship))
    plots(all_res, out)
    (out / "wall_seconds.json").write_text(json.dumps({"seconds": round(time.time() - t_start, 1),
                                                       "run": str(Path(run_dir).resolve())}))
    return all_res


def main(argv: list[str] | None = None) -> int:
    """`train eval --run DIR [--out DIR] [--models anneal,bpo,grpo]`."""
    ap = argparse.ArgumentParser(prog="r4b-edge train eval", description=main.__doc__)
    add_eval_flags(ap)
    a = ap.parse_args(argv)
    run_dir = Path(a.run)
    r = load_recipe(run_dir, a.preset, a.set)
    res = run(run_dir, r, Path(a.out) if a.out else run_dir / "eval", a.models.split(","))
    print(markdown(res, res.get("ship", "bpo")))
    return 0
