"""The deadline sweep's bookkeeping: within-T shares, the better fitting fixed mode, targets."""
from __future__ import annotations

from pathlib import Path

import pytest

from r4b_edge.benchmarks import deadline_sweep as D


def _r(tier, correct, wall, thought=False):
    return {"tier": tier, "family": "f", "correct": correct, "thought": thought, "budget_hit": False,
            "wall_ms": wall, "think_tokens": 0, "answer_tokens": 1, "p_think": 0.5,
            "planned_budget": None, "planned_tok_s": None}


def _out():
    fixed = {"think": [_r("reasoning", True, 90, True), _r("perception", True, 80, True)],
             "no-think": [_r("reasoning", False, 10), _r("perception", True, 12)],
             "auto": [_r("reasoning", True, 90, True), _r("perception", True, 12)]}
    sweep = {"5.000": [_r("reasoning", False, 11), _r("perception", True, 9)],      # nothing fits
             "20.000": [_r("reasoning", False, 15), _r("perception", True, 30)],    # half late: missed
             "50.000": [_r("reasoning", True, 45, True), _r("perception", True, 12)],
             "100.000": [_r("reasoning", False, 95, True), _r("perception", True, 12)]}  # below think: missed
    return {"items": 2, "fixed": fixed, "fixed_p95_ms": {"think": 89.5, "no-think": 11.9, "auto": 89.0},
            "sweep": sweep}


def test_summary_targets(tmp_path: Path):
    s = D.summarize_sweep(_out())
    rows = {r["deadline_ms"]: r for r in s["rows"]}
    assert not rows[5.0]["in_target_range"] and rows[5.0]["met_within"] is None
    assert rows[20.0]["within"] == 0.5 and rows[20.0]["met_within"] is False
    assert rows[20.0]["best_fitting_fixed"] == "no-think" and rows[20.0]["met_accuracy"] is True
    assert rows[50.0]["met_within"] and rows[50.0]["met_accuracy"] and rows[50.0]["tiers"]["reasoning"] == 1.0
    assert rows[100.0]["best_fitting_fixed"] == "think" and rows[100.0]["met_accuracy"] is False
    md = D.markdown(s)
    assert md.count("**no**") == 2 and "no mode fits" in md
    assert D.plot(s, tmp_path / "p.png").stat().st_size > 1000


def test_fixed_replies_beside_each_T_decide_what_fits():
    """A machine that slows down during the sweep: the up-front think pass fit in T, but the think
    replies asked beside the deadline replies at that T did not, so the bar is no-think's."""
    out = _out()
    out["beside"] = {"100.000": {"think": [_r("reasoning", True, 130, True), _r("perception", True, 120, True)],
                                 "no-think": [_r("reasoning", False, 14), _r("perception", True, 15)]}}
    rows = {r["deadline_ms"]: r for r in D.summarize_sweep(out)["rows"]}
    assert rows[100.0]["fixed_within"] == {"think": 0.0, "no-think": 1.0}
    assert rows[100.0]["best_fitting_fixed"] == "no-think" and rows[100.0]["met_accuracy"] is True
    assert rows[50.0]["best_fitting_fixed"] == "no-think"  # no replies beside it: the up-front pass
    assert rows[100.0]["fixed_accuracy"]["no-think"] == 0.5


def test_fresh_sweep_reports_each_processes_first_call(tmp_path: Path):
    out = _out()
    out["fresh"] = True
    s = D.summarize_sweep(out)
    rows = {r["deadline_ms"]: r for r in s["rows"]}
    assert rows[50.0]["first_call"]["thought"] and rows[50.0]["first_call"]["within"]
    assert rows[20.0]["first_call"] == dict(rows[20.0]["first_call"], tier="reasoning", within=True, correct=False)
    md = D.markdown(s)
    assert "first call (fresh process)" in md and "| think, right, 45 ms |" in md
    assert D.summarize_sweep(_out())["rows"][0]["first_call"] is None  # one process: no first call per T


@pytest.mark.slow
def test_fresh_sweep_runs_every_T_in_a_new_process(tiny_ckpt: Path):
    """Each T's process has served nothing before its first (deadline) reply: it plans from the model's
    priors, while the one-process sweep's replies at every T come after the fixed passes."""
    spec = {"backend": "torch", "precision": "fp32", "path": str(tiny_ckpt), "device": "cpu", "threads": 1}
    fresh = D.run_sweep(spec, 1, 0, max_tokens=12, n_deadlines=2, families=["digit", "sum"], fresh=True)
    assert fresh["fresh"] and len(fresh["rows"]) == 3
    for r in fresh["rows"]:
        assert "replies served" not in r["first_call"]["lengths_source"]
        assert r["first_call"]["tier"] == "reasoning"
    warm = D.run_sweep(spec, 1, 0, max_tokens=12, n_deadlines=2, families=["digit", "sum"])
    assert all(r["first_call"] is None for r in warm["rows"])
    assert all("replies served" in x["lengths_source"] for rs in warm["raw"]["sweep"].values() for x in rs)
