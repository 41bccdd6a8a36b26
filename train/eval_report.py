"""The eval's target check and its markdown tables (results.md; the model card reuses them)."""
from __future__ import annotations

from typing import Any

from r4b_edge.model.template import API_MODES

from .world import TIERS

MODES = API_MODES
GROUPS = TIERS + ("overall",)
#: Follow-up accuracy bars per turn (issue #13).
FOLLOW_UP_BARS = {"2": 0.95, "3": 0.93}
#: Table rows of the threshold sweep, evenly spaced over it (the full sweep: results.json, the PNG).
SWEEP_ROWS = 11
#: Float slack of the bars on differences and ratios (a gap of exactly 1 point meets "- 1 point").
EPS = 1e-9
#: 2 -> '2nd', 3 -> '3rd'.
ORDINAL = {"2": "2nd", "3": "3rd"}


def pct(x: float | None) -> str:
    """0.9731 -> '97.3%'; None -> 'n/a'."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, nd: int = 3) -> str:
    """A number with `nd` decimals; None -> 'n/a'."""
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ok(v: float | None, cond: Any) -> bool:
    return v is not None and bool(cond(v))


def targets(res: dict, anneal: dict | None = None) -> list[tuple[str, bool, str]]:
    """Issue #13's targets for one model's results: (name, met, measured). `anneal`: the
    annealing-only model's results (for "BPO improves auto accuracy"). A value that could not be
    measured (an empty group) counts as not met."""
    a, th, nt = res["auto"], res["think"], res["no-think"]
    out: list[tuple[str, bool, str]] = []
    pmin = min(res[m]["perception"]["accuracy"] for m in MODES)
    out.append(("perception accuracy >= 97.5% in every mode", pmin >= 0.975, f"min {pct(pmin)}"))
    out.append(("perception think-rate (auto) <= 5%", a["perception"]["think_rate"] <= 0.05,
                pct(a["perception"]["think_rate"])))
    out.append(("reasoning think accuracy >= 95%", th["reasoning"]["accuracy"] >= 0.95, pct(th["reasoning"]["accuracy"])))
    out.append(("reasoning think-rate (auto) >= 95%", a["reasoning"]["think_rate"] >= 0.95, pct(a["reasoning"]["think_rate"])))
    gap = th["reasoning"]["accuracy"] - nt["reasoning"]["accuracy"]
    out.append(("reasoning: no-think >= 30 points below think", gap >= 0.30 - EPS, f"{gap * 100:.1f} points"))
    d = a["overall"]["accuracy"] - th["overall"]["accuracy"]
    out.append(("overall: auto accuracy >= think accuracy - 1 point", d >= -0.01 - EPS, f"{d * 100:+.1f} points"))
    ratio = a["overall"]["mean_tokens"] / th["overall"]["mean_tokens"]
    out.append(("overall: auto tokens <= 0.5x think tokens", ratio <= 0.5 + EPS, f"{ratio:.2f}x"))
    if anneal is not None:
        a0, a1 = anneal["auto"]["overall"]["accuracy"], a["overall"]["accuracy"]
        out.append(("auto accuracy above annealing-only's", a1 > a0, f"{pct(a0)} -> {pct(a1)}"))
    fu = res.get("follow_up") or {}
    for turn, bar in FOLLOW_UP_BARS.items():
        for t in TIERS:
            m = fu.get(turn, {}).get(t)
            acc = m["accuracy"] if m else None
            out.append((f"{ORDINAL[turn]} question of a chat, {t}: accuracy >= {100 * bar:g}% (auto)",
                        _ok(acc, lambda v: v >= bar), pct(acc)))
    for turn in FOLLOW_UP_BARS:
        for t in TIERS:
            m = fu.get(turn, {}).get(t)
            g = m["think_gap"] if m else None
            out.append((f"{ORDINAL[turn]} question, {t}: think-rate within 3 points of the same items asked first",
                        _ok(g, lambda v: abs(v) <= 0.03 + EPS),
                        "n/a" if m is None else f"{pct(m['think_rate'])} vs {pct(m['think_rate_first'])} "
                                                f"({100 * g:+.1f} points)"))
    n_tags = sum(fu.get(turn, {}).get("overall", {}).get("think_tags", 0) for turn in FOLLOW_UP_BARS) + \
        a["overall"].get("think_tags", 0)
    n_ans = sum(fu.get(turn, {}).get("overall", {}).get("n", 0) for turn in FOLLOW_UP_BARS) + a["overall"]["n"]
    forced = ", ".join(f"{m} {res[m]['overall'].get('think_tags', 0)}" for m in ("think", "no-think"))
    out.append(("no auto answer contains <think> or </think> (single question and follow-ups)",
                n_tags == 0 and bool(fu), f"{n_tags} of {n_ans} answers (forced modes: {forced})"))
    g = (res.get("graded") or {}).get("graded")
    if g:
        d = g["accuracy_auto"] - g["accuracy_think"]
        out.append(("graded: auto accuracy >= think accuracy - 1 point", d >= -0.01 - EPS,
                    f"{pct(g['accuracy_auto'])} vs {pct(g['accuracy_think'])} ({100 * d:+.1f} points)"))
        ratio = g["mean_tokens_auto"] / g["mean_tokens_think"]
        out.append(("graded: auto mean tokens <= 0.6x think's", ratio <= 0.6 + EPS,
                    f"{g['mean_tokens_auto']:.1f} / {g['mean_tokens_think']:.1f} = {ratio:.2f}x"))
        v = g["auto_thinks_if_no_think_right"]
        out.append(("graded: auto thinks on <= 10% of the items no-think answers right", _ok(v, lambda x: x <= 0.10),
                    f"{pct(v)} of {g['n_no_think_right']}"))
        v = g["auto_thinks_if_no_think_wrong"]
        out.append(("graded: auto thinks on >= 90% of the items no-think answers wrong", _ok(v, lambda x: x >= 0.90),
                    f"{pct(v)} of {g['n_no_think_wrong']}"))
    cal = (res.get("calibration") or {}).get("graded")
    if cal:
        out.append(("graded: AUROC of p_think for 'no-think answers wrong' >= 0.9", _ok(cal["auroc"], lambda x: x >= 0.9),
                    num(cal["auroc"])))
    return out


def target_table(rows: list[tuple[str, bool | None, str]]) -> list[str]:
    """The target rows as a markdown table (ok None: not measured)."""
    return ["| target | met | measured |", "|---|---|---|"] + \
        [f"| {n} | {'not measured' if ok is None else 'yes' if ok else 'NO'} | {v} |" for n, ok, v in rows]


def mode_table(models: dict) -> list[str]:
    """Single-turn: model x mode x group."""
    lines = ["| model | mode | tier | n | accuracy | think-rate | mean tokens | time-to-answer (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in models.items():
        for mode in MODES:
            for t in GROUPS:
                m = res[mode].get(t)
                if m:
                    tta = num(m["mean_time_to_answer_ms"], 1) if m["mean_time_to_answer_ms"] is not None else "-"
                    lines.append(f"| {name} | {mode} | {t} | {m['n']} | {pct(m['accuracy'])} | {pct(m['think_rate'])} | "
                                 f"{m['mean_tokens']:.1f} | {tta} |")
    return lines


def family_table(models: dict) -> list[str]:
    """Accuracy per question family, model x mode."""
    fams = list(dict.fromkeys(f for res in models.values() for f in res["auto"]["families"]))
    lines = ["| model | mode | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for name, res in models.items():
        for mode in MODES:
            lines.append(f"| {name} | {mode} | " + " | ".join(pct(res[mode]["families"].get(f)) for f in fams) + " |")
    return lines


def follow_up_table(models: dict) -> list[str]:
    """Follow-ups (auto): per model, turn and tier."""
    lines = ["| model | question | tier | n | accuracy | think-rate | think-rate asked first | gap (points) | "
             "answers with a think tag | earlier answers all right |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in models.items():
        for turn, per in (res.get("follow_up") or {}).items():
            for t in GROUPS:
                m = per.get(t)
                if m:
                    lines.append(f"| {name} | {ORDINAL.get(turn, turn)} | {t} | {m['n']} | {pct(m['accuracy'])} | {pct(m['think_rate'])} | "
                                 f"{pct(m['think_rate_first'])} | {100 * m['think_gap']:+.1f} | {m['think_tags']} | "
                                 f"{pct(m['history_all_right'])} |")
    return lines


def graded_table(models: dict) -> list[str]:
    """The graded families per model and level: accuracy and tokens per mode, the decision."""
    lines = ["| model | items | n | auto | think | no-think | tokens auto / think / no-think | auto/think tokens | "
             "auto think-rate | auto thinks if no-think right | auto thinks if no-think wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in models.items():
        for g, m in (res.get("graded") or {}).items():
            lines.append(f"| {name} | {g} | {m['n']} | {pct(m['accuracy_auto'])} | {pct(m['accuracy_think'])} | "
                         f"{pct(m['accuracy_no-think'])} | {m['mean_tokens_auto']:.1f} / {m['mean_tokens_think']:.1f} / "
                         f"{m['mean_tokens_no-think']:.1f} | {m['mean_tokens_auto'] / m['mean_tokens_think']:.2f}x | "
                         f"{pct(m['think_rate_auto'])} | {pct(m['auto_thinks_if_no_think_right'])} of "
                         f"{m['n_no_think_right']} | {pct(m['auto_thinks_if_no_think_wrong'])} of {m['n_no_think_wrong']} |")
    return lines


def calibration_tables(models: dict, ship: str) -> list[str]:
    """AUROC per model and group; the shipped model's reliability table and threshold sweep."""
    lines = ["| model | items | n | no-think wrong | AUROC of p_think |", "|---|---|---|---|---|"]
    for name, res in models.items():
        for g, c in (res.get("calibration") or {}).items():
            lines.append(f"| {name} | {g} | {c['n']} | {c['n_no_think_wrong']} | {num(c['auroc'])} |")
    cal = (models.get(ship) or {}).get("calibration")
    if not cal:
        return lines
    names = list(cal)
    lines += ["", f"Reliability ({ship}): per p_think bin, items n and observed no-think error rate.", "",
              "| p_think bin | " + " | ".join(f"{g} n | {g} error" for g in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for b in range(len(cal[names[0]]["reliability"])):
        row = cal[names[0]]["reliability"][b]
        cells = []
        for g in names:
            x = cal[g]["reliability"][b]
            cells += [str(x["n"]), pct(x["error_rate"])]
        lines.append(f"| [{row['lo']:.1f}, {row['hi']:.1f}{']' if row['hi'] >= 1 else ')'} | " + " | ".join(cells) + " |")
    lines += ["", f"Sweeping think_threshold ({ship}; offline: an item thinks iff p_think >= threshold and takes its "
              "forced think result, else its forced no-think result): accuracy / mean tokens / think-rate.", "",
              "| threshold | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    sw = cal[names[0]]["sweep"]
    for k in sorted({round(j * (len(sw) - 1) / (SWEEP_ROWS - 1)) for j in range(SWEEP_ROWS)}):
        cells = [f"{pct(cal[g]['sweep'][k]['accuracy'])} / {cal[g]['sweep'][k]['mean_tokens']:.1f} / "
                 f"{pct(cal[g]['sweep'][k]['think_rate'])}" for g in names]
        lines.append(f"| {sw[k]['threshold']:.2f} | " + " | ".join(cells) + " |")
    return lines


def sweep_check_table(res: dict, ship: str) -> list[str]:
    """The offline decision rule against the measured greedy auto run."""
    sc = res.get("sweep_check") or {}
    lines = [f"| items ({ship}) | rule | decisions differing from measured auto | accuracy offline / measured | "
             "mean tokens offline / measured |", "|---|---|---|---|---|"]
    for g, c in sc.items():
        for rule in [k for k in c if k not in ("n", "measured")]:
            x, m = c[rule], c["measured"]
            lines.append(f"| {g} ({c['n']}) | {rule} | {x['decisions_differing']} | {pct(x['accuracy'])} / "
                         f"{pct(m['accuracy'])} | {x['mean_tokens']:.2f} / {m['mean_tokens']:.2f} |")
    return lines


def markdown(all_res: dict, ship: str = "bpo") -> str:
    """results.md: every table, then the target check of the shipped model."""
    models = all_res["models"]
    lines = ["Single question (greedy):", ""] + mode_table(models)
    lines += ["", "Accuracy per question family:", ""] + family_table(models)
    lines += ["", "Follow-up questions (auto, greedy): every item asked again as the 2nd and as the 3rd question of a "
              "chat about its image; the earlier answers in the history are the model's own.", ""] + follow_up_table(models)
    if any(res.get("graded") for res in models.values()):
        lines += ["", "Graded families (the same template at two levels):", ""] + graded_table(models)
    if any(res.get("calibration") for res in models.values()):
        lines += ["", "p_think as a predictor of 'no-think answers this item wrong':", ""] + calibration_tables(models, ship)
    if ship in models and models[ship].get("sweep_check"):
        lines += ["", "Offline decisions vs the measured auto run (greedy):", ""] + sweep_check_table(models[ship], ship)
    if ship in models:
        rows = targets(models[ship], models.get("anneal") if ship != "anneal" else None)
        lines += ["", f"Targets ({ship}, the shipped model):", ""] + target_table(rows)
    c = all_res.get("grpo_curve")
    p = [x for x in (c or {}).get("perception", []) if x is not None]
    if p:
        k = max(1, len(p) // 5)
        first, last = sum(p[:k]) / k, sum(p[-k:]) / k
        lines += ["", f"Plain GRPO, rollout think-rate on perception: {pct(first)} (first {k} logged steps) -> "
                      f"{pct(last)} (last {k})."]
    return "\n".join(lines) + "\n"
