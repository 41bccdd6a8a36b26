"""The true-size bench (issue 28) end to end on a tiny model: build (random checkpoint -> local
hub -> `r4b-edge pull` to GGUF Q4_K_M), the chat measurement in its own process, targets,
8-core extrapolation, results written. Checks the structure and the markdown, not the numbers.
llama.cpp's tools run too when R4B_LLAMA_CPP_BIN points at them; otherwise they are reported as
skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r4b_edge.benchmarks import llamacpp_tools, true_size_report
from r4b_edge.benchmarks import true_size as ts

pytest.importorskip("llama_cpp")
pytest.importorskip("huggingface_hub")

MTMD_LOG = """0.00.030.390 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.00.031.144 I mtmd batch encoding done in 812 ms
0.00.037.459 I image decoded (batch 1/1) in 95 ms
0.00.038.422 I llama_perf_context_print:        load time =       3.09 ms
0.00.038.439 I llama_perf_context_print: prompt eval time =    1290.50 ms /   760 tokens (    1.70 ms per token, 588.9 tokens per second)
0.00.038.454 I llama_perf_context_print:        eval time =     300.00 ms /    15 runs   (   20.00 ms per token,    50.00 tokens per second)
0.00.038.467 I llama_perf_context_print:       total time =      18.90 ms /    47 tokens
"""


def test_parse_mtmd_log():
    d = llamacpp_tools.parse_mtmd_log(MTMD_LOG)
    assert d["vision_encode_ms"] == 812 and d["prompt_eval_ms"] == 1290.5 and d["prompt_positions"] == 760
    assert d["decode_runs"] == 15 and d["decode_tps"] == pytest.approx(50.0)
    assert d["ttft_ms"] == pytest.approx(812 + 1290.5)
    assert llamacpp_tools.parse_mtmd_log("nothing")["ttft_ms"] is None


def test_parse_budgets_and_kv():
    assert ts.parse_budgets("auto, 729,4501") == ["auto", 729, 4501]
    for bad in ("", "0", "many", "-3"):
        with pytest.raises(ValueError):
            ts.parse_budgets(bad)
    from r4b_edge.export.scale_check import r4b_config

    # the formula: 36 layers x 2 x 8 kv heads x 128 x n_ctx x 2 bytes
    assert ts.kv_bytes(r4b_config(151936, 5), 8192) == 36 * 2 * 8 * 128 * 8192 * 2


def test_photo_is_deterministic(tmp_path: Path):
    a = ts.write_images(tmp_path / "a")
    b = ts.write_images(tmp_path / "b")
    assert a["sha256"] == b["sha256"] and a["size"] == [1920, 1080]
    from PIL import Image

    assert Image.open(a["photo"]).size == (1920, 1080) and Image.open(a["base_view"]).size == (384, 384)


@pytest.mark.slow
def test_true_size_end_to_end_tiny(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    work, out = tmp_path / "work", tmp_path / "out"
    bin_dir = llamacpp_tools.llama_bin_dir()
    doc = ts.run_true_size(work, out, size="tiny", budgets=["auto", 16], threads=1, max_tokens=4,
                           bin_dir=bin_dir, scaling=True, command="r4b-edge bench --true-size --quick", log=print)
    # build: pulled through the local hub into the work folder's store, cached
    b = doc["build"]
    assert Path(b["text"]).is_file() and Path(b["mmproj"]).is_file() and b["pull"]["wall_s"] > 0
    assert b["text_bytes"] > 0 and doc["files_bytes"] == b["text_bytes"] + b["mmproj_bytes"]
    again = ts.build(work, "tiny", log=lambda m: None)
    assert again["text"] == b["text"] and again["pull"] == b["pull"]  # nothing pulled again
    # ours: the default budget ran three turns in its own process; explicit budgets ran or say why not
    auto = next(r for r in doc["runs"] if r["budget"] == "auto" and r["role"] == "budget")
    assert [t["turn"] for t in auto["turns"]] == [1, 2, 3]
    for i, t in enumerate(auto["turns"]):
        assert t["stats"]["image_tokens"] > 0 and t["stats"]["prompt_tokens"] > 0 and t["first_event_ms"] is not None
        assert t["decision_ms"] is not None and t["peak_rss_mib"] > 0 and t["first_progress_ms"] is not None
        assert t["positions_evaluated"] > 0 and (t["positions_reused"] > t["stats"]["image_tokens"]) == (i > 0)
    assert auto["kv_bytes"] > 0 and auto["n_ctx"] > 0 and auto["peak_rss_mib"] > 0
    small = next(r for r in doc["runs"] if r["budget"] == 16 and r["role"] == "budget")
    assert small["turns"][0]["stats"]["image_tokens"] <= 16  # the explicit budget applied
    assert any(r["role"] == "scaling" and r["threads"] == 1 for r in doc["runs"])
    # llama.cpp's tools: measured, or skipped with the reason
    if bin_dir is None:
        assert "R4B_LLAMA_CPP_BIN" in doc["llama_cpp"]["skipped"]
    else:
        assert doc["llama_cpp"]["mtmd_cli"]["ttft_ms"] is not None
        assert len(doc["llama_cpp"]["server"]["requests"]) == 3
    # the five targets, each with a goal and a verdict (or None: not measured)
    names = [t["name"] for t in doc["targets"]]
    assert len(names) == 5 and all(t["met"] in (True, False, None) for t in doc["targets"])
    assert doc["extrapolated_8_core"]["label"] == "extrapolated" and doc["extrapolated_8_core"]["rows"]
    # written atomically, JSON + markdown
    j = json.loads((out / "true_size.json").read_text())
    assert j["schema"] == true_size_report.SCHEMA and j["machine"]["cpu"] and j["command"].startswith("r4b-edge bench")
    md = (out / "true_size.md").read_text()
    for heading in ("## Build", "## r4b-edge, a chat about the photo", "## llama.cpp's own tools",
                    "## Targets (issue 28)", "## An 8-core laptop (extrapolated, not measured)"):
        assert heading in md
    assert "**extrapolated**" in md and "r4b-edge bench --true-size --quick" in md
    assert not list(out.glob(".*.tmp"))


def test_bench_cli_true_size_flags():
    import argparse

    from r4b_edge.benchmarks import bench

    ap = argparse.ArgumentParser()
    bench.register(ap.add_subparsers())
    a = ap.parse_args(["bench", "--true-size", "--true-size-dir", "/x", "--true-size-budgets", "auto,729",
                       "--llama-bin", "/bin", "--true-size-build-only", "--no-scaling"])
    assert a.true_size and a.true_size_dir == "/x" and a.true_size_budgets == "auto,729" and a.llama_bin == "/bin"
    assert a.true_size_build_only and a.no_scaling
