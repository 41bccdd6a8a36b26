"""`r4b-edge bench`: the quick run end to end on a tiny model, the JSON schema, skips, targets."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from r4b_edge.benchmarks import report
from r4b_edge.benchmarks.latency import summarize


def test_summarize_median_and_spread() -> None:
    s = summarize([5, 1, 3, 2, 4])
    assert (s["median"], s["p25"], s["p75"], s["min"], s["max"], s["n"]) == (3, 2, 4, 1, 5, 5)
    assert summarize([])["n"] == 0


def _doc(**over) -> dict:
    lat = {"backend": "torch", "precision": "fp32", "n_prompt": 8, "n_gen": 4, "image": False,
           "peak_rss_mb": 100.0, "metrics": {k: summarize([1.0, 2.0]) for k in
                                             ("vision_encode_ms", "prefill_tps", "ttft_ms", "decode_tps", "total_ms")}}
    onnx = json.loads(json.dumps(lat)) | {"backend": "onnx", "precision": "int8"}
    onnx["metrics"]["decode_tps"] = summarize([4.0, 4.0])
    mode = {"n": 2, "accuracy": 0.5, "think_rate": 0.5, "mean_tokens": 3.0, "mean_time_to_answer_ms": 10.0,
            "time_to_answer_ms": summarize([10.0]), "ttft_ms": summarize([1.0])}
    doc = {"schema": report.SCHEMA_NAME, "schema_version": report.SCHEMA_VERSION, "created": "now",
           "machine": {"cpu": "x", "cores_logical": 2, "ram_gib": 1.0, "os": "y", "python": "3", "versions": {}},
           "model": {"path": "m"}, "settings": {}, "configurations": [
               {"backend": "torch", "precision": "fp32", "status": "ok"}],
           "latency": [lat, onnx], "modes": [{"backend": "torch", "precision": "fp32",
                                              "modes": {"auto": dict(mode, mean_time_to_answer_ms=4.0), "think": mode}}],
           "baselines": {"overhead": [], "bandwidth": {}, "roofline": {}}, "targets": [], "skipped": [],
           "duration_s": 1.0}
    doc.update(over)
    return doc


def test_schema_accepts_a_document_and_rejects_broken_ones() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    doc = _doc()
    report.validate(doc)
    for broken in (_doc(schema_version=999), _doc(latency=[{"backend": "torch", "precision": "fp32",
                                                            "n_prompt": 1, "n_gen": 1, "image": False}]),
                   _doc(configurations=[{"backend": "cuda", "precision": "x", "status": "ok"}])):
        with pytest.raises(jsonschema.ValidationError):
            report.validate(broken)
    skipped_row = {"backend": "llama", "precision": "F16", "n_prompt": 1, "n_gen": 1, "image": False,
                   "skipped": "not installed"}
    report.validate(_doc(latency=[skipped_row]))  # a skipped row needs no figures, only the reason


def test_targets_ratios() -> None:
    t = {x["name"]: x for x in report.compute_targets(_doc())}
    onnx = t["ONNX int8 / torch fp32 CPU decode"]
    assert onnx["value"] == pytest.approx(4.0 / 1.5, abs=1e-3) and onnx["met"] is True
    auto = t["auto/think mean time-to-answer (torch fp32)"]
    assert auto["value"] == pytest.approx(0.4, abs=1e-3) and auto["met"] is True
    assert t["Q4_K_M decode / roofline"]["met"] is None  # not run: reported as n/a, not as passed


def test_missing_backend_is_reported_as_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import r4b_edge.backends as backends
    from r4b_edge.benchmarks.bench import prepare_configs

    monkeypatch.setattr(backends, "is_installed", lambda name: name == "torch")
    s = {"backends": ["torch", "onnx"], "precisions": {"torch": ["fp32"], "onnx": ["int8"]},
         "device": "cpu", "threads": 1}
    specs, skipped = prepare_configs(tmp_path / "model", s, tmp_path / "cache", lambda m: None)
    assert [(x["backend"], x["precision"]) for x in specs] == [("torch", "fp32")]
    assert skipped[0]["backend"] == "onnx" and "pip install" in skipped[0]["reason"]


def test_bad_flags_fail_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from r4b_edge.apps.cli import main

    rc = main(["bench", "--quick", "--model", str(tmp_path), "-p", "abc", "--out", str(tmp_path / "o")])
    assert rc == 1 and "-p/--n-prompt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bench_quick_end_to_end(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from r4b_edge.apps.cli import main
    from r4b_edge.backends import is_installed

    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(["bench", "--quick", "--model", str(tiny_ckpt), "--out", str(out), "--cache", str(tmp_path / "cache")])
    elapsed = time.perf_counter() - t0
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    assert elapsed < 120, f"--quick took {elapsed:.0f} s (budget 120 s on 2 cores)"
    assert "config" in err  # the tqdm bar over configurations
    doc = json.loads((out / "results.json").read_text())
    report.validate(doc)
    assert doc["quick"] is True and doc["machine"]["cores_logical"] >= 1
    for b in ("torch", "llama", "onnx"):  # every backend is measured or skipped with a reason
        lat = [r for r in doc["latency"] if r["backend"] == b]
        skipped = [s for s in doc["skipped"] if s["what"].startswith(b) or f" {b} " in f" {s['what']} "]
        assert lat or skipped, b
        if is_installed(b) and lat and "skipped" not in lat[0]:
            m = lat[0]["metrics"]
            assert m["decode_tps"]["median"] > 0 and m["ttft_ms"]["median"] > 0
            assert m["vision_encode_ms"]["median"] > 0 and lat[0]["peak_rss_mb"] > 0
    torch_modes = next(r for r in doc["modes"] if r["backend"] == "torch")
    assert set(torch_modes["modes"]) == {"auto", "think", "no-think"}
    assert torch_modes["modes"]["no-think"]["think_rate"] == 0.0
    assert torch_modes["modes"]["think"]["think_rate"] == 1.0
    if is_installed("llama"):  # the headline ratio: equal settings (flash attention on both sides), with its spread
        ov = next(r for r in doc["baselines"]["overhead"] if "decode_ratio_fa" in r)
        assert ov["decode_ratio_fa"]["n"] >= 7 and ov["repeats"] >= 7
        head = next(t for t in doc["targets"] if "ours/raw llama-cpp-python, same settings" in t["name"])
        assert head["value"] == round(ov["decode_ratio_fa"]["median"], 4)
        assert f"p25-p75 {ov['decode_ratio_fa']['p25']:.3f}-{ov['decode_ratio_fa']['p75']:.3f}" in head["note"]
        assert "p25-p75" in captured.out
    names = [t["name"] for t in doc["targets"]]
    assert any("ONNX int8" in n for n in names) and any("auto/think" in n for n in names)
    md = (out / "results.md").read_text()
    assert "| backend | precision | pp |" in md and "## Targets" in md
    for png in ("accuracy_vs_time.png", "decode_tps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_memory_bandwidth_and_bytes_per_token(tiny_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from r4b_edge.benchmarks.baselines import bytes_per_token, memory_bandwidth
    from r4b_edge.export.gguf import export_gguf
    from r4b_edge.model.config import RConfig

    bw = memory_bandwidth(mib=16, repeats=2, threads=2)
    assert bw["gbps"] == max(bw["gbps_1_thread"], bw["gbps_all_threads"]) > 0
    res = export_gguf(tiny_ckpt, tmp_path / "g", quant="F16", verify=False)
    cfg = RConfig.from_file(tiny_ckpt)
    b = bytes_per_token(res.text, cfg, context=10)
    tc = cfg.text_config
    kv = 2 * tc["num_hidden_layers"] * tc["num_key_value_heads"] * tc["head_dim"] * 2 * 10
    emb = cfg.vocab_size * cfg.hidden_size * 2  # F16 token embedding: only one row is read per token
    assert b["kv_cache"] == kv and b["total"] == b["weights"] + kv
    assert b["weights"] < res.text.stat().st_size - emb + cfg.hidden_size * 2


def _mode_row(mode: str, tier: str, correct: bool, finish: str, thought: bool = False) -> dict:
    return {"mode": mode, "family": "sum", "tier": tier, "correct": correct, "thought": thought, "p_think": 0.5,
            "think_tokens": 40 if thought else 0, "answer_tokens": 3, "reply_tokens": 43 if thought else 5,
            "ttft_ms": 1.0, "time_to_answer_ms": 10.0, "total_ms": 12.0, "decode_tps": 100.0,
            "vision_encode_ms": 1.0, "first_text_ms": 1.0, "finish_reason": finish}


def test_replies_cut_at_max_tokens_are_not_scored() -> None:
    """A reply cut at max_tokens has no answer: it is counted apart, never scored as wrong."""
    from r4b_edge.benchmarks.modes import summarize_modes

    rows = [_mode_row("think", "reasoning", True, "stop", True), _mode_row("think", "reasoning", False, "length", True),
            _mode_row("think", "perception", False, "length", True),
            _mode_row("no-think", "reasoning", False, "stop"), _mode_row("no-think", "perception", True, "stop")]
    s = summarize_modes(rows)
    assert s["think"]["accuracy"] == 1.0 and s["think"]["length_stops"] == 2 and s["think"]["n"] == 3
    assert s["think"]["tiers"]["perception"]["accuracy"] is None  # every reply of the tier was cut
    assert s["no-think"]["accuracy"] == 0.5 and s["no-think"]["length_stops"] == 0
    doc = _doc(modes=[{"backend": "torch", "precision": "fp32", "modes": s}])
    doc["modes"][0]["modes"]["auto"] = dict(s["no-think"])
    doc["settings"] = {"max_tokens": 16}
    md = report.markdown(doc)
    assert "| think | 1.000 (2 of 3 cut at max_tokens, not scored) | - / 1.000 / - |" in md
    auto = next(t for t in report.compute_targets(doc) if t["name"].startswith("auto/think"))
    assert auto["met"] is None and auto["value"] is None and "2 think replies cut at max_tokens 16" in auto["note"]
    assert report.cut_replies(doc) == 2
    if importlib.util.find_spec("jsonschema"):
        report.validate(doc)


def test_one_thread_is_not_threads() -> None:
    bw = {"buffer_mib": 16, "repeats": 2, "threads": 1, "gbps_1_thread": 9.0, "gbps_all_threads": 9.0, "gbps": 9.0}
    md = report.markdown(_doc(baselines={"overhead": [], "bandwidth": bw, "roofline": {}}))
    assert "9.0 GB/s with 1 thread." in md and "1 threads" not in md
    md = report.markdown(_doc(baselines={"overhead": [], "bandwidth": dict(bw, threads=2, gbps_all_threads=15.0),
                                         "roofline": {}}))
    assert "9.0 GB/s with 1 thread, 15.0 GB/s with 2 threads." in md


@pytest.mark.slow
def test_quick_bench_lets_the_bundled_models_replies_finish(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`bench --quick` on the bundled model: its thinking replies (~45 tokens) end by themselves, so the
    table scores them (it said think accuracy 0.000 and auto/think MISSED when --quick cut replies at 16)."""
    pytest.importorskip("torch")
    from r4b_edge.api import default_model_path
    from r4b_edge.apps.cli import main

    rc = main(["bench", "--quick", "--backends", "torch", "--no-baselines", "--no-plots", "--model",
               str(default_model_path()), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    m = doc["modes"][0]["modes"]
    assert {k: m[k]["length_stops"] for k in m} == {"auto": 0, "think": 0, "no-think": 0}
    assert m["think"]["accuracy"] >= 0.8 and m["auto"]["accuracy"] >= 0.8 and m["think"]["think_rate"] == 1.0
    auto = next(t for t in doc["targets"] if t["name"].startswith("auto/think"))
    assert auto["value"] is not None and "accuracy auto" in auto["note"]
    assert "cut" not in out.out


def _bench_args(*flags: str):
    import argparse

    from r4b_edge.benchmarks.bench import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(["bench", *flags])


def test_load_flags_reach_every_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--image-tokens, --n-ctx and --dtype (issue 28) reach the specs the workers load."""
    import r4b_edge.backends as backends
    from r4b_edge.benchmarks.bench import _settings, prepare_configs
    from r4b_edge.errors import R4BError

    monkeypatch.setattr(backends, "is_installed", lambda name: name == "torch")
    s = _settings(_bench_args("--backends", "torch", "--dtype", "auto", "--image-tokens", "1280", "--n-ctx", "4096"))
    assert (s["precisions"]["torch"], s["image_tokens"], s["n_ctx"]) == (["auto"], 1280, 4096)
    specs, _ = prepare_configs(tmp_path / "model", s, tmp_path / "cache", lambda m: None)
    assert [(x["precision"], x["image_tokens"], x["kwargs"]) for x in specs] == [("auto", 1280, {"n_ctx": 4096})]
    s = _settings(_bench_args("--backends", "torch"))
    assert (s["precisions"]["torch"], s["image_tokens"], s["n_ctx"]) == (["fp32"], "auto", None)
    assert _settings(_bench_args("--image-tokens", "full"))["image_tokens"] == "full"
    with pytest.raises(R4BError, match="--dtype and --torch-precisions"):
        _settings(_bench_args("--dtype", "bf16", "--torch-precisions", "fp32"))


def test_latency_worker_prepares_images_within_the_budget(tiny_ckpt: Path) -> None:
    pytest.importorskip("torch")
    from r4b_edge.benchmarks.latency import pp_tg_worker

    base = {"backend": "torch", "precision": "fp32", "path": str(tiny_ckpt), "device": "cpu", "threads": 1,
            "kwargs": {"n_ctx": 512}}
    p = {"n_prompt": 8, "n_gen": 1, "image": True, "warmup": 0, "repeats": 1}
    full = pp_tg_worker(dict(p, spec=dict(base, image_tokens="full")))
    small = pp_tg_worker(dict(p, spec=dict(base, image_tokens=16)))
    assert small["image_tokens"] == 16 < full["image_tokens"]  # the base view alone
    assert small["runs"][0]["image_tokens"] == 16
