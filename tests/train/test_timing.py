"""Stage wall times and where they come from: a stage copied in from another run (or trained
outside `reproduce`) is not this run's measurement, and the card says so instead of claiming a
from-scratch time."""
from __future__ import annotations

import json
import shutil

from r4b_edge.train.card import reproduce_row, wall_table
from r4b_edge.train.eval_report import target_table
from r4b_edge.train.pipeline import run_timing, stage_timing


def timed(run, stage, seconds, owner=None):
    (run / stage).mkdir(parents=True, exist_ok=True)
    (run / stage / "wall_seconds.json").write_text(json.dumps({"seconds": seconds, "run": str((owner or run).resolve())}))


def test_stage_timed_by_this_run_or_not(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    timed(run, "anneal", 900.0)
    timed(other, "lm", 600.0)
    shutil.copytree(other / "lm", run / "lm")  # reused from another run: its number, not ours
    (run / "bpo").mkdir()
    (run / "bpo" / "wall_seconds.json").write_text(json.dumps({"seconds": 300.0}))  # written before the run key
    assert stage_timing(run, "anneal") == (900.0, True)
    assert stage_timing(run, "lm") == (600.0, False)
    assert stage_timing(run, "bpo") == (300.0, False)
    assert stage_timing(run, "grpo") == (None, False)


def test_logs_only_sum_every_phase(tmp_path):
    """A stage with no timer record (trained with `train pretrain` alone): each phase's metrics
    log has its own clock; the stage took their sum."""
    run = tmp_path / "run"
    (run / "pretrain" / "focus").mkdir(parents=True)
    (run / "pretrain" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "time": 10.0 * i}) for i in range(4)))
    (run / "pretrain" / "focus" / "metrics.jsonl").write_text(json.dumps({"step": 0, "time": 5.5}) + "\n")
    assert stage_timing(run, "pretrain") == (35.5, False)
    t = run_timing(run)
    assert t["stages"]["pretrain"] == 35.5 and t["timed_here"] == []


def test_card_claims_the_from_scratch_time_only_when_measured():
    stages = {"lm": 1000.0, "pretrain": 2000.0, "anneal": 1300.0, "bpo": 330.0, "grpo": 360.0, "eval": 440.0}
    whole = {"stages": stages, "timed_here": list(stages)}
    lines, total = wall_table(whole)
    assert total == 5430.0 and "| total | 90.5 min |" in lines
    assert reproduce_row(whole, total)[1:] == (True, "90.5 min")
    slow = {"stages": dict(stages, lm=3000.0), "timed_here": list(stages)}
    assert reproduce_row(slow, wall_table(slow)[1])[1] is False
    part = {"stages": stages, "timed_here": ["anneal", "bpo", "grpo", "eval"]}
    lines, total = wall_table(part)
    name, ok, text = reproduce_row(part, total)
    assert ok is None and text.startswith("lm, pretrain trained in an earlier run")
    assert "| lm | 16.7 min (trained in an earlier run: the time recorded there) |" in lines
    assert "| total | 90.5 min (stage sum) |" in lines
    assert f"| {name} | not measured | {text} |" in target_table([(name, ok, text)])
    old = {"stages": stages}  # timing.json from before `timed_here`: read as before
    assert reproduce_row(old, total)[1] is True


def test_shipped_preset_is_the_bundled_models_recipe():
    """`train reproduce` (preset `shipped`) trains the model that ships: its recipe.json, read as a
    run folder reads it, equals the preset field for field."""
    from dataclasses import asdict

    from r4b_edge.api import BUNDLED_MODEL
    from r4b_edge.train.recipe import Recipe, recipe_from_dict

    shipped = recipe_from_dict(json.loads((BUNDLED_MODEL / "recipe.json").read_text()))
    preset = Recipe.preset("shipped")
    diff = {k: (v, asdict(preset)[k]) for k, v in asdict(shipped).items() if asdict(preset)[k] != v}
    assert not diff, f"bundled model's recipe vs the shipped preset (recipe.json, preset): {diff}"


def test_interrupted_stage_keeps_its_time_for_the_resume(tmp_path, monkeypatch):
    """A stage that dies midway leaves its time so far (heartbeat + the final partial record);
    the resumed run adds to it and clears the partial flag."""
    import time

    import r4b_edge.train.lm as lm
    from r4b_edge.errors import TrainingError
    from r4b_edge.train import pipeline
    from r4b_edge.train.recipe import Recipe

    run = tmp_path / "run"
    monkeypatch.setattr(pipeline, "HEARTBEAT_S", 0.02)
    seen = []

    def dies(run_dir, r):
        time.sleep(0.15)
        seen.append(json.loads((run_dir / "lm" / "wall_seconds.json").read_text()))  # a heartbeat landed
        raise TrainingError("killed")

    monkeypatch.setattr(lm, "run", dies)
    try:
        pipeline.run_stage(run, Recipe(), "lm", 1)
    except TrainingError:
        pass
    assert seen and seen[0]["partial"] is True and seen[0]["run"] == str(run.resolve()) and seen[0]["seconds"] > 0
    first = json.loads((run / "lm" / "wall_seconds.json").read_text())
    assert first["partial"] is True and first["seconds"] >= 0.15

    def finishes(run_dir, r):
        time.sleep(0.1)
        (run_dir / "lm" / "model").mkdir(parents=True)
        (run_dir / "lm" / "model" / "config.json").write_text("{}")

    monkeypatch.setattr(lm, "run", finishes)
    pipeline.run_stage(run, Recipe(), "lm", 1)
    done = json.loads((run / "lm" / "wall_seconds.json").read_text())
    assert "partial" not in done and done["seconds"] >= first["seconds"] + 0.1
    assert stage_timing(run, "lm") == (done["seconds"], True)
    assert pipeline.run_stage(run, Recipe(), "lm", 1) == 0.0  # finished: skipped, time kept
    assert json.loads((run / "lm" / "wall_seconds.json").read_text()) == done
