"""benchmarks/gpu_parity.py on the CPU: the torch oracle against itself is identical, and a
target that cannot run is reported (one JSON line with the error) instead of hiding the others."""
from __future__ import annotations

import json

import pytest

from r4b_edge.benchmarks.gpu_parity import main

SHIPPED = "r4b_edge/assets/model"


def test_torch_cpu_against_the_oracle_and_a_missing_target(capsys: pytest.CaptureFixture) -> None:
    from pathlib import Path

    model = str(Path(__file__).resolve().parents[2] / SHIPPED)
    rc = main(["--model", model, "--targets", f"torch:cpu,onnx:cpu={model}", "--per-family", "1"])
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rc == 1  # the onnx target failed
    ok, bad = rows
    assert ok["target"] == "torch:cpu" and ok["items"] == 8 and ok["identical_to_torch_cpu"] == 8
    assert ok["accuracy"] == ok["torch_cpu_accuracy"] and ok["median_decode_tps"] > 0
    assert bad["target"].startswith("onnx:cpu=") and "export it first" in bad["error"]
