"""End-to-end per mode through the public API, and accuracy-per-token on the world's eval split.

For one configuration (backend x precision, in its own process) every eval item is asked in
every mode (auto | think | no-think) with `Model.stream` (greedy); the `Stats` of the `Done`
result give time to first token, time to first answer token and the token counts, and the
world's rule checker (`r4b_edge.train.world.check_answer`) scores the answer. The parent turns
the per-item rows into the table a user reads to pick a mode: accuracy, think-rate, mean tokens
and mean time-to-answer, with medians and quartiles of the latencies.

Modes run one after another over all items (mode-outer), so with more eval items than the
backend's image cache holds (8) every call pays its own vision encode.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from r4b_edge.errors import R4BError
from r4b_edge.model.template import API_MODES

from .latency import BenchSkip, open_backend, peak_rss_mb, run_isolated, summarize

MODES = API_MODES


def modes_worker(p: dict) -> dict:
    """Worker: load one configuration and answer every eval item in every mode."""
    from r4b_edge.api import Model
    from r4b_edge.engine.events import Done
    from r4b_edge.train.world import EVAL_SEED, check_answer, eval_items

    seed, max_tokens = int(p.get("seed", EVAL_SEED)), int(p.get("max_tokens", 64))
    try:
        items = eval_items(per_family=int(p["per_family"]), seed=seed, families=p.get("families"), interleaved=True)
    except R4BError as e:
        raise BenchSkip(str(e)) from None
    model = Model(open_backend(p["spec"]), image_tokens=p["spec"].get("image_tokens", "auto"))
    try:
        images = [model.prepare(it["image"]) for it in items]
        model.chat(images[0], items[0]["question"], mode="no-think", max_tokens=4)  # warm-up
        rows = []
        for mode in p.get("modes", MODES):
            for it, img in zip(items, images):
                t0 = time.perf_counter()
                first_event_ms = None
                result = None
                for ev in model.stream(img, it["question"], mode=mode, max_tokens=max_tokens):
                    if first_event_ms is None and not isinstance(ev, Done) and hasattr(ev, "text"):
                        first_event_ms = (time.perf_counter() - t0) * 1000.0
                    if isinstance(ev, Done):
                        result = ev.result
                wall = (time.perf_counter() - t0) * 1000.0
                s = result.stats
                rows.append({
                    "mode": mode, "family": it["family"], "tier": it["tier"],
                    "correct": bool(check_answer(result.answer, it["answer"])), "thought": bool(result.thought),
                    "p_think": result.p_think, "think_tokens": s.think_tokens,
                    "answer_tokens": s.answer_tokens, "reply_tokens": len(result.token_ids),
                    "ttft_ms": s.ttft_ms, "time_to_answer_ms": s.time_to_answer_ms, "total_ms": s.total_ms,
                    "decode_tps": s.decode_tps, "vision_encode_ms": s.vision_encode_ms,
                    "first_text_ms": first_event_ms if first_event_ms is not None else wall,
                    "finish_reason": s.finish_reason,
                })
    finally:
        model.close()
    return {"rows": rows, "peak_rss_mb": peak_rss_mb(), "n_items": len(items)}


def _accuracy(rs: Sequence[dict]) -> float | None:
    """Share right among the replies that ended by themselves; a reply cut at `max_tokens`
    (finish_reason "length") has no answer to score, so it is left out; None when all were cut."""
    done = [r for r in rs if r["finish_reason"] != "length"]
    return sum(r["correct"] for r in done) / len(done) if done else None


def summarize_modes(rows: Sequence[dict]) -> dict[str, dict]:
    """Per mode: accuracy (overall and per tier, over the replies not cut at `max_tokens`; the cut
    ones are counted in `length_stops`), think-rate, mean tokens, mean and median
    time-to-answer / time to first token, with spreads."""
    out: dict[str, dict] = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        n = len(rs)
        tiers = {}
        for tier in sorted({r["tier"] for r in rs}):
            tr = [r for r in rs if r["tier"] == tier]
            tiers[tier] = {"n": len(tr), "accuracy": _accuracy(tr),
                           "think_rate": sum(r["thought"] for r in tr) / len(tr),
                           "length_stops": sum(r["finish_reason"] == "length" for r in tr)}
        out[mode] = {
            "n": n,
            "accuracy": _accuracy(rs),
            "think_rate": sum(r["thought"] for r in rs) / n,
            "mean_tokens": sum(r["reply_tokens"] for r in rs) / n,
            "mean_think_tokens": sum(r["think_tokens"] for r in rs) / n,
            "mean_time_to_answer_ms": sum(r["time_to_answer_ms"] for r in rs) / n,
            "time_to_answer_ms": summarize([r["time_to_answer_ms"] for r in rs]),
            "ttft_ms": summarize([r["ttft_ms"] for r in rs]),
            "total_ms": summarize([r["total_ms"] for r in rs]),
            "decode_tps": summarize([r["decode_tps"] for r in rs if r["decode_tps"] > 0]),
            "length_stops": sum(r["finish_reason"] == "length" for r in rs),
            "tiers": tiers,
        }
    return out


def run_modes(spec: dict, per_family: int, seed: int, modes: Sequence[str] = MODES,
              max_tokens: int = 64, families: Sequence[str] | None = None, timeout: float = 3600.0) -> dict:
    """One configuration's per-mode table, from a fresh process (`skipped` on failure)."""
    row: dict[str, Any] = {"backend": spec["backend"], "precision": spec["precision"], "seed": seed,
                           "per_family": per_family, "max_tokens": max_tokens, "threads": spec.get("threads")}
    out = run_isolated("r4b_edge.benchmarks.modes:modes_worker",
                       {"spec": spec, "per_family": per_family, "seed": seed, "modes": list(modes),
                        "max_tokens": max_tokens, "families": list(families) if families else None},
                       timeout=timeout, threads=spec.get("threads"))
    if "rows" not in out:
        row["skipped"] = out.get("skipped") or out.get("error") or "unknown failure"
        return row
    row.update({"n_items": out["n_items"], "peak_rss_mb": out["peak_rss_mb"],
                "modes": summarize_modes(out["rows"])})
    return row
