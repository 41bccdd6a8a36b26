"""Deadline sweep: accuracy and the share of answers delivered within T, against T.

`r4b-edge bench --deadline-sweep` asks the world's held-out eval items (every tier,
`r4b_edge.train.world.eval_items`) through the public API, greedy: first in the fixed modes (think,
no-think, and auto for reference), then with `deadline_ms=T` for a grid of T spanning from the
no-think replies' 95th-percentile time (x 1.1) to past the think replies' (x 1.3). A reply is
delivered within T if its wall time, from the `stream` call to its `Done`, is at most T.

At each T every item is also asked in fixed think and fixed no-think right beside its deadline
reply (the order rotates per item), and those replies decide which fixed mode fits at that T: a
machine whose speed drifts during the sweep (seen: 12 -> 16 ms per direct reply within one run)
then moves both sides of the comparison, not only the deadline side.

Targets, per T: at least 95% of the deadline-mode answers within T, and accuracy at least that
of the better fixed mode that fits in T (a fixed mode fits if 95% of its replies took <= T).
A T where not even no-think fits (0.7 x its p95 is in the grid) is reported outside the target.

The engine's deadline planner learns the decode speed and the reply lengths from the replies
it has served, as a long-running process would: the fixed-mode passes run first in the same
process and serve as its warm-up.

With `fresh=True` (`r4b-edge bench --deadline-sweep --deadline-fresh`) every T runs in a fresh
process instead, as a one-shot `chat --deadline T` does: nothing served yet, so its first plan
comes from the model's own reply lengths (`r4b_edge.model.reply_lengths`) and, where the pace
decides, a probe of a few decode steps. The first reply of each T's process is a deadline reply to
the first reasoning-tier item (asked before its fixed-mode neighbours), reported on its own: the
first call.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from .latency import summarize

FIXED = ("think", "no-think", "auto")
SIDE = ("think", "no-think")  # the fixed modes a deadline reply is compared with


def _ask(model: Any, img: Any, item: dict, max_tokens: int, **kw: Any) -> dict:
    from r4b_edge.engine.events import Decision, Done
    from r4b_edge.train.world import check_answer

    t0 = time.perf_counter()
    plan, result = None, None
    for ev in model.stream(img, item["question"], max_tokens=max_tokens, **kw):
        if isinstance(ev, Decision):
            plan = ev.deadline
        elif isinstance(ev, Done):
            result = ev.result
    wall = (time.perf_counter() - t0) * 1000.0
    s = result.stats
    return {"family": item["family"], "tier": item["tier"], "correct": bool(check_answer(result.answer, item["answer"])),
            "thought": bool(result.thought), "p_think": result.p_think, "think_tokens": s.think_tokens,
            "answer_tokens": s.answer_tokens, "budget_hit": bool(s.budget_hit), "wall_ms": wall,
            "planned_budget": plan.max_think_tokens if plan else None,
            "planned_tok_s": plan.tok_s if plan else None, "plan_reason": plan.reason if plan else None,
            "tok_s_source": plan.tok_s_source if plan else None,
            "lengths_source": plan.lengths_source if plan else None}


def _open(p: dict) -> tuple[Any, list, list]:
    """The model of `p["spec"]`, the eval items and their prepared images."""
    from r4b_edge.api import Model
    from r4b_edge.train.world import eval_items

    from .latency import open_backend

    items = eval_items(per_family=int(p["per_family"]), seed=int(p["seed"]), families=p.get("families"),
                       interleaved=True)
    model = Model(open_backend(p["spec"]))
    return model, items, [model.prepare(it["image"]) for it in items]


def _fixed(model: Any, items: list, images: list, p: dict) -> dict:
    """Warm-up, the fixed-mode passes, their p95 and the grid of T."""
    max_tokens = int(p.get("max_tokens", 96))
    for img, it in list(zip(images, items))[:4]:  # warm-up (untimed)
        model.chat(img, it["question"], mode="think", max_tokens=max_tokens)
    fixed = {m: [_ask(model, img, it, max_tokens, mode=m) for img, it in zip(images, items)] for m in FIXED}
    p95 = {m: float(np.percentile([r["wall_ms"] for r in rs], 95)) for m, rs in fixed.items()}
    lo, hi = 1.1 * p95["no-think"], 1.3 * p95["think"]
    grid = [0.7 * p95["no-think"]] + [float(x) for x in np.geomspace(lo, hi, int(p.get("n_deadlines", 8)))]
    return {"items": len(items), "fixed": fixed, "fixed_p95_ms": p95, "grid": grid}


def _at(model: Any, items: list, images: list, T: float, max_tokens: int) -> tuple[list, dict]:
    """Every item with `deadline_ms=T`, each beside a fixed think and a fixed no-think reply (the
    order rotates per item; item 0 asks its deadline reply first)."""
    rows, beside = [], {m: [] for m in SIDE}
    for i, (img, it) in enumerate(zip(images, items)):
        order = ("deadline",) + SIDE
        for what in order[i % 3:] + order[:i % 3]:
            if what == "deadline":
                rows.append(_ask(model, img, it, max_tokens, mode="auto", deadline_ms=T))
            else:
                beside[what].append(_ask(model, img, it, max_tokens, mode=what))
    return rows, beside


def sweep_worker(p: dict) -> dict:
    """Worker: the fixed modes, then the deadline grid, on one configuration, in one process."""
    model, items, images = _open(p)
    try:
        out = _fixed(model, items, images, p)
        out["sweep"], out["beside"] = {}, {}
        for T in out.pop("grid"):
            key = f"{T:.3f}"
            out["sweep"][key], out["beside"][key] = _at(model, items, images, T, int(p.get("max_tokens", 96)))
    finally:
        model.close()
    return out


def fixed_worker(p: dict) -> dict:
    """Worker (`fresh`): the fixed modes and the grid."""
    model, items, images = _open(p)
    try:
        return _fixed(model, items, images, p)
    finally:
        model.close()


def deadline_worker(p: dict) -> dict:
    """Worker (`fresh`): one T, `p["T"]`, in this fresh process; its first reply is the deadline reply
    to the first reasoning-tier item."""
    model, items, images = _open(p)
    # the first call asks the first reasoning-tier item (a question worth thinking about)
    k = next((i for i, it in enumerate(items) if it["tier"] == "reasoning"), 0)
    items, images = [items[k]] + items[:k] + items[k + 1:], [images[k]] + images[:k] + images[k + 1:]
    try:
        rows, beside = _at(model, items, images, float(p["T"]), int(p.get("max_tokens", 96)))
    finally:
        model.close()
    return {"sweep": rows, "beside": beside}


def summarize_sweep(out: dict) -> dict:
    """Per T: deadline-mode accuracy (overall / per tier), share within T, think rate; the fixed
    modes' accuracy and share within T; the better fitting fixed mode; the targets."""
    rows = []
    for key, rs in out["sweep"].items():
        T = float(key)
        fixed = out.get("beside", {}).get(key) or {m: out["fixed"][m] for m in SIDE}
        within = float(np.mean([r["wall_ms"] <= T for r in rs]))
        acc = float(np.mean([r["correct"] for r in rs]))
        tiers = {t: float(np.mean([r["correct"] for r in rs if r["tier"] == t]))
                 for t in sorted({r["tier"] for r in rs})}
        fits = {m: float(np.mean([r["wall_ms"] <= T for r in fr])) for m, fr in fixed.items()}
        fixed_acc = {m: float(np.mean([r["correct"] for r in fr])) for m, fr in fixed.items()}
        fitting = [m for m in SIDE if fits[m] >= 0.95]
        best = max(fitting, key=lambda m: fixed_acc[m]) if fitting else None
        in_range = fits["no-think"] >= 0.95  # below that, no mode delivers 95% in time
        first = rs[0] if out.get("fresh") else None  # a fresh process's first call
        rows.append({
            "deadline_ms": T, "accuracy": acc, "tiers": tiers, "within": within,
            "first_call": None if first is None else {
                "tier": first["tier"], "thought": first["thought"], "correct": first["correct"],
                "wall_ms": first["wall_ms"], "within": first["wall_ms"] <= T, "plan_reason": first.get("plan_reason"),
                "tok_s_source": first.get("tok_s_source"), "lengths_source": first.get("lengths_source")},
            "think_rate": float(np.mean([r["thought"] for r in rs])),
            "budget_hit_rate": float(np.mean([r["budget_hit"] for r in rs])),
            "wall_ms": summarize([r["wall_ms"] for r in rs]),
            "fixed_within": fits, "fixed_accuracy": fixed_acc, "best_fitting_fixed": best,
            "in_target_range": in_range,
            "met_within": (within >= 0.95) if in_range else None,
            "met_accuracy": (acc >= fixed_acc[best] if best else True) if in_range else None,
        })
    return {"rows": rows, "fixed_p95_ms": out["fixed_p95_ms"], "items": out["items"], "fresh": bool(out.get("fresh")),
            "fixed_summary": {m: {"accuracy": float(np.mean([r["correct"] for r in fr])),
                                  "wall_ms": summarize([r["wall_ms"] for r in fr])}
                              for m, fr in out["fixed"].items()}}


def _first(f: dict | None) -> str:
    if f is None:
        return ""
    return (f" {'think' if f['thought'] else 'direct'}, {'right' if f['correct'] else 'wrong'}, "
            f"{f['wall_ms']:.0f} ms{'' if f['within'] else ' (late)'} |")


def markdown(s: dict, command: str = "") -> str:
    tiers = sorted({t for r in s["rows"] for t in r["tiers"]})
    lines = [f"Deadline sweep on {s['items']} held-out world items ({', '.join(tiers)}), greedy; wall time "
             "from the `stream` call to `Done`; at each T the fixed modes are asked beside each deadline reply "
             "and decide what fits." + (f" Command: `{command}`." if command else ""),
             "", "Fixed modes: " + "; ".join(
                 f"{m} accuracy {v['accuracy']:.3f}, wall {v['wall_ms']['median']:.1f} ms median, "
                 f"{s['fixed_p95_ms'][m]:.1f} ms p95" for m, v in s["fixed_summary"].items()), "",
             f"| T ms | deadline accuracy | {' / '.join(tiers)} | within T | think rate | budget cut | "
             "think within T | no-think within T | better fitting fixed (accuracy) | met |"
             + (" first call (fresh process) |" if s.get("fresh") else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if s.get("fresh") else "")]
    if s.get("fresh"):
        lines[0] += (" Every T ran in a fresh process (nothing served before it); its first reply, a deadline "
                     "reply to a reasoning item, is the first call: thought or direct, right or wrong, wall ms.")
    for r in s["rows"]:
        t = r["tiers"]
        best = r["best_fitting_fixed"]
        bf = f"{best} ({r['fixed_accuracy'][best]:.3f})" if best else "none fits"
        if r["in_target_range"]:
            met = "yes" if r["met_within"] and r["met_accuracy"] else "**no**"
        else:
            met = "(no mode fits: outside the target)"
        lines.append(f"| {r['deadline_ms']:.1f} | {r['accuracy']:.3f} | "
                     f"{' / '.join(f'{t.get(k, 0):.3f}' for k in tiers)} | {r['within']:.3f} | {r['think_rate']:.2f} | "
                     f"{r['budget_hit_rate']:.2f} | {r['fixed_within']['think']:.2f} | "
                     f"{r['fixed_within']['no-think']:.2f} | {bf} | {met} |" + _first(r.get("first_call")))
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Any) -> Any:
    """Accuracy and share within T against T (deadline mode, and the fixed modes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = [r["deadline_ms"] for r in s["rows"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(T, [r["accuracy"] for r in s["rows"]], "o-", label="deadline mode")
    for m, style in (("think", "--s"), ("no-think", ":^")):
        a1.plot(T, [r["fixed_accuracy"][m] if r["fixed_within"][m] >= 0.95 else np.nan for r in s["rows"]], style,
                label=f"{m} (where 95% fit)")
    a1.set_xscale("log")
    a1.set_xlabel("deadline T (ms)")
    a1.set_ylabel("accuracy")
    a1.set_ylim(0, 1.05)
    a1.legend(fontsize=8)
    a2.plot(T, [r["within"] for r in s["rows"]], "o-", label="deadline mode")
    for m, style in (("think", "--s"), ("no-think", ":^")):
        a2.plot(T, [r["fixed_within"][m] for r in s["rows"]], style, label=m)
    a2.axhline(0.95, color="grey", lw=0.8)
    a2.set_xscale("log")
    a2.set_xlabel("deadline T (ms)")
    a2.set_ylabel("share of answers within T")
    a2.set_ylim(0, 1.05)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sweep(spec: dict, per_family: int, seed: int, max_tokens: int = 96, n_deadlines: int = 8,
              families: Sequence[str] | None = None, fresh: bool = False) -> dict:
    """Run the sweep and summarise it: in this process, or (`fresh`) the fixed modes in this process
    and every T in a fresh one."""
    from r4b_edge.errors import R4BError

    from .latency import run_isolated

    p = {"spec": spec, "per_family": per_family, "seed": seed, "max_tokens": max_tokens,
         "n_deadlines": n_deadlines, "families": list(families) if families else None}
    if not fresh:
        out = sweep_worker(p)
        return summarize_sweep(out) | {"raw": out}
    out = fixed_worker(p) | {"fresh": True, "sweep": {}, "beside": {}}
    for T in out.pop("grid"):
        got = run_isolated("r4b_edge.benchmarks.deadline_sweep:deadline_worker", p | {"T": T},
                           threads=spec.get("threads"))
        if "sweep" not in got:
            raise R4BError(f"the deadline sweep's process for T = {T:.1f} ms failed: "
                           f"{got.get('error') or got.get('skipped')}")
        out["sweep"][f"{T:.3f}"], out["beside"][f"{T:.3f}"] = got["sweep"], got["beside"]
    return summarize_sweep(out) | {"raw": out}
