"""Evaluation on the held-out world split: per model x mode x tier accuracy, think-rate,
mean output tokens, mean time-to-answer; JSON + markdown + PNG plots."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from r4b_edge.errors import TrainingError
from r4b_edge.model.template import API_MODES
from r4b_edge.world import EVAL_SEED_OFFSET, PERCEPTION, REASONING

from .common import Recipe, load_recipe, set_threads
from .data import PixelCache, read_jsonl
from .stages import ensure_world, stage_model_dir
from .rollout import Roller, items_from_records

MODES = API_MODES
TIERS = ("perception", "reasoning")


def eval_items(run_dir: Path, r: Recipe) -> tuple[list[dict], Path]:
    """The held-out set: split 'eval' scenes (disjoint from training by scene hash), seed
    `r.seed + EVAL_SEED_OFFSET` (r4b_edge.world.EVAL_SEED for the shipped recipe): the items of
    `r4b_edge.world.eval_items("eval", r.ev_per_family, r.seed + EVAL_SEED_OFFSET)`, written as
    records for the roller."""
    p = ensure_world(run_dir, "eval", r.seed + EVAL_SEED_OFFSET,
                     {f: r.ev_per_family for f in PERCEPTION + REASONING}, split="eval")
    return items_from_records(read_jsonl(p)), p.parent


def load_eval_model(folder: Path, fp16_round: bool = True) -> tuple[Any, Any, Any]:
    """(model fp32, config, tokenizers.Tokenizer); weights rounded through fp16 as shipped."""
    from r4b_edge.model.checkpoint import load_checkpoint

    model, cfg, tok = load_checkpoint(folder, dtype=torch.float32)
    if fp16_round:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model.eval(), cfg, tok.backend


def evaluate_model(model: Any, cfg: Any, tok: Any, items: Sequence[dict], root: Path, r: Recipe,
                   modes: Sequence[str] = MODES) -> dict:
    """{mode: {tier: metrics}} (+ per-family accuracy) with greedy decoding."""
    pixels = PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std)
    roller = Roller(model, tok, cfg, root, pixels)
    res: dict[str, Any] = {}
    for mode in modes:
        ro = roller.run(items, mode, max_new=r.ev_max_new, chunk=r.ev_batch)
        timing: dict[str, list[float]] = {t: [] for t in TIERS}
        for t in TIERS:  # unbatched timing subset
            sub = [it for it in items if it["tier"] == t][:r.ev_time_items]
            for it in sub:
                x = roller.run([it], mode, max_new=r.ev_max_new, chunk=1)[0]
                if x.answer_time is not None:
                    timing[t].append(x.answer_time)
        per: dict[str, Any] = {}
        for t in TIERS + ("overall",):
            rows = [(it, x) for it, x in zip(items, ro) if t == "overall" or it["tier"] == t]
            if not rows:
                continue
            tt = timing[t] if t != "overall" else timing["perception"] + timing["reasoning"]
            per[t] = {
                "n": len(rows),
                "accuracy": float(np.mean([x.reward for _, x in rows])),
                "think_rate": float(np.mean([x.parsed.thought for _, x in rows])),
                "mean_tokens": float(np.mean([x.parsed.n_tokens for _, x in rows])),
                "unclosed": int(sum(x.parsed.answer is None for _, x in rows)),
                "mean_time_to_answer_ms": float(np.mean(tt) * 1000) if tt else None,
            }
        fams = sorted({it["family"] for it in items})
        per["families"] = {f: float(np.mean([x.reward for it, x in zip(items, ro) if it["family"] == f])) for f in fams}
        per["examples"] = [{"id": it["id"], "question": it["question"], "gold": it["answer"],
                            "output": tok.decode(x.tokens, skip_special_tokens=False)} for it, x in list(zip(items, ro))[:3]]
        res[mode] = per
    return res


def second_turn_items(items: Sequence[dict], seed: int) -> list[dict]:
    """Each item as the second question of a chat: an opening perception question about the same
    scene (seeded by the item id) with its gold answer comes first, with the image."""
    from r4b_edge.world import opening_for

    out = []
    for it in items:
        q0 = opening_for(it["scene"], seed, 59, it["id"])
        out.append(dict(it, history=[(q0.question, q0.answer)]))
    return out


def evaluate_second_turn(model: Any, cfg: Any, tok: Any, items: Sequence[dict], root: Path, r: Recipe) -> dict:
    """Auto-mode accuracy and think-rate per tier on the second turn of a two-question chat."""
    roller = Roller(model, tok, cfg, root, PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std))
    ro = roller.run(second_turn_items(items, r.seed), "auto", max_new=r.ev_max_new, chunk=r.ev_batch)
    res = {}
    for t in TIERS + ("overall",):
        rows = [x for it, x in zip(items, ro) if t == "overall" or it["tier"] == t]
        if rows:
            res[t] = {"n": len(rows), "accuracy": float(np.mean([x.reward for x in rows])),
                      "think_rate": float(np.mean([x.parsed.thought for x in rows]))}
    return res


def targets(res: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets for one model's results: (name, met, measured)."""
    a, th, nt = res["auto"], res["think"], res["no-think"]
    out = []
    pmin = min(res[m]["perception"]["accuracy"] for m in MODES)
    out.append(("perception accuracy >= 97% in every mode", pmin >= 0.97, f"min {pmin:.1%}"))
    out.append(("perception think-rate (auto) <= 5%", a["perception"]["think_rate"] <= 0.05,
                f"{a['perception']['think_rate']:.1%}"))
    out.append(("reasoning think accuracy >= 90%", th["reasoning"]["accuracy"] >= 0.90, f"{th['reasoning']['accuracy']:.1%}"))
    out.append(("reasoning think-rate (auto) >= 95%", a["reasoning"]["think_rate"] >= 0.95,
                f"{a['reasoning']['think_rate']:.1%}"))
    d = a["overall"]["accuracy"] - th["overall"]["accuracy"]
    out.append(("auto accuracy >= think accuracy - 1 point", d >= -0.01, f"{d * 100:+.1f} points"))
    ratio = a["overall"]["mean_tokens"] / th["overall"]["mean_tokens"]
    out.append(("auto tokens <= 0.5x think tokens", ratio <= 0.5, f"{ratio:.2f}x"))
    gap = th["reasoning"]["accuracy"] - nt["reasoning"]["accuracy"]
    out.append(("reasoning: no-think >= 30 points below think", gap >= 0.30, f"{gap * 100:.1f} points"))
    return out


def markdown(all_res: dict, ship: str = "bpo") -> str:
    """The comparison table (+ targets of the shipped model)."""
    lines = ["| model | mode | tier | accuracy | think-rate | mean tokens | time-to-answer (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name, res in all_res["models"].items():
        for mode in MODES:
            for t in TIERS + ("overall",):
                m = res[mode][t]
                tta = f"{m['mean_time_to_answer_ms']:.1f}" if m["mean_time_to_answer_ms"] is not None else "-"
                lines.append(f"| {name} | {mode} | {t} | {m['accuracy']:.1%} | {m['think_rate']:.1%} | "
                             f"{m['mean_tokens']:.1f} | {tta} |")
    fams = sorted({f for res in all_res["models"].values() for f in res["auto"]["families"]})
    lines += ["", "Accuracy per question family:", "",
              "| model | mode | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for name, res in all_res["models"].items():
        for mode in MODES:
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{res[mode]['families'].get(f, 0):.0%}" for f in fams) + " |")
    if ship in all_res["models"]:
        lines += ["", f"Targets ({ship}, the shipped model):", "", "| target | met | measured |", "|---|---|---|"]
        for n, ok, v in targets(all_res["models"][ship]):
            lines.append(f"| {n} | {'yes' if ok else 'NO'} | {v} |")
        if "anneal" in all_res["models"]:
            a0 = all_res["models"]["anneal"]["auto"]["overall"]["accuracy"]
            a1 = all_res["models"][ship]["auto"]["overall"]["accuracy"]
            lines.append(f"| BPO improves auto accuracy over annealing-only | {'yes' if a1 > a0 else 'NO'} | "
                         f"{a0:.1%} -> {a1:.1%} |")
    if all_res.get("grpo_curve"):
        c = all_res["grpo_curve"]
        p = [x for x in c["perception"] if x is not None]
        if p:
            k = max(1, len(p) // 5)
            first, last = float(np.mean(p[:k])), float(np.mean(p[-k:]))
            lines.append(f"| plain GRPO drifts toward thinking on perception | {'yes' if last > first else 'NO'} | "
                         f"rollout think-rate {first:.1%} (first {k} steps) -> {last:.1%} (last {k}) |")
    if any("second_turn" in res for res in all_res["models"].values()):
        lines += ["", "Second question of a two-question chat about the image (auto; the first, a perception",
                  "question, answered by its gold answer in the history):", "",
                  "| model | perception | reasoning | overall | think-rate perception / reasoning | single-turn overall |",
                  "|---|---|---|---|---|---|"]
        for name, res in all_res["models"].items():
            s2 = res.get("second_turn")
            if s2:
                lines.append(f"| {name} | {s2['perception']['accuracy']:.1%} | {s2['reasoning']['accuracy']:.1%} | "
                             f"{s2['overall']['accuracy']:.1%} | {s2['perception']['think_rate']:.1%} / "
                             f"{s2['reasoning']['think_rate']:.1%} | {res['auto']['overall']['accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


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
    return {"steps": steps, "perception": [last[s].get("think_rate/perception/auto") for s in steps],
            "reasoning": [last[s].get("think_rate/reasoning/auto") for s in steps]}


def plots(all_res: dict, out: Path) -> list[Path]:
    """accuracy_vs_tokens.png (per model x mode, overall) and grpo_think_rate.png."""
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
        ax.plot(c["steps"], [100 * (x or 0) for x in c["perception"]], label="perception")
        ax.plot(c["steps"], [100 * (x or 0) for x in c["reasoning"]], label="reasoning")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("think-rate of rollouts (%)")
        ax.set_title("plain GRPO (free mode choice): thinking rate over training")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "grpo_think_rate.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def run(run_dir: Path, r: Recipe, out: Path, models: Sequence[str] = ("anneal", "bpo", "grpo")) -> dict:
    """Evaluate every finished stage model of the run; writes results.json/.md + PNGs into out."""
    set_threads(r)
    items, root = eval_items(run_dir, r)
    counts = {t: sum(it["tier"] == t for it in items) for t in TIERS}
    all_res: dict[str, Any] = {"n_items": counts, "seed": r.seed + EVAL_SEED_OFFSET, "models": {}}
    for name in models:
        d = stage_model_dir(run_dir, name)
        if not (d / "config.json").exists():
            continue
        model, cfg, tok = load_eval_model(d)
        t0 = time.time()
        all_res["models"][name] = evaluate_model(model, cfg, tok, items, root, r)
        all_res["models"][name]["second_turn"] = evaluate_second_turn(model, cfg, tok, items, root, r)
        all_res["models"][name]["eval_seconds"] = round(time.time() - t0, 1)
    if not all_res["models"]:
        raise TrainingError(f"no finished stage models under {run_dir} (looked for {', '.join(models)})")
    all_res["grpo_curve"] = grpo_curve(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(all_res, indent=2))
    (out / "results.md").write_text(markdown(all_res))
    plots(all_res, out)
    return all_res


def main(argv: list[str] | None = None) -> int:
    """`train eval --run DIR [--out DIR] [--models anneal,bpo,grpo]`."""
    ap = argparse.ArgumentParser(prog="r4b-edge train eval", description=main.__doc__)
    ap.add_argument("--run-dir", "--run", dest="run", default="runs/shipped")
    ap.add_argument("--preset", default="shipped", choices=["shipped", "micro"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    ap.add_argument("--models", default="anneal,bpo,grpo")
    a = ap.parse_args(argv)
    run_dir = Path(a.run)
    r = load_recipe(run_dir, a.preset, a.set)
    res = run(run_dir, r, Path(a.out) if a.out else run_dir / "eval", a.models.split(","))
    print(markdown(res))
    return 0
