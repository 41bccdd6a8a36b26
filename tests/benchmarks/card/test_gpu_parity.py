"""benchmarks/card/gpu_parity.py on the CPU: the torch oracle against itself is identical, and a
target that cannot run is reported (one JSON line with the error) instead of hiding the others."""
from __future__ import annotations

import json

import pytest

from r4b_edge.benchmarks.card.gpu_parity import main
from r4b_edge.train.world import FAMILIES

SHIPPED = "r4b_edge/assets/model"

NF = len(FAMILIES)  # one item per world family at --per-family 1


def test_torch_cpu_against_the_oracle_and_a_missing_target(capsys: pytest.CaptureFixture) -> None:
    from pathlib import Path

    model = str(Path(__file__).resolve().parents[3] / SHIPPED)
    rc = main(["--model", model, "--targets", f"torch:cpu,onnx:cpu={model}", "--per-family", "1"])
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rc == 1  # the onnx target failed
    ok, bad = rows
    assert ok["target"] == "torch:cpu" and ok["items"] == NF and ok["identical_to_torch_cpu"] == NF
    assert ok["accuracy"] == ok["torch_cpu_accuracy"] and ok["median_decode_tps"] > 0
    assert bad["target"].startswith("onnx:cpu=") and "export it first" in bad["error"]


def test_saved_reference_is_read_back_without_torch(tmp_path, capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys
    from pathlib import Path

    model = str(Path(__file__).resolve().parents[3] / SHIPPED)
    ref = tmp_path / "ref.json"
    assert main(["--model", model, "--targets", "torch:cpu", "--per-family", "1", "--save-reference", str(ref)]) == 0
    saved = json.loads(ref.read_text())
    assert saved["per_family"] == 1 and len(saved["replies"]) == NF
    # a fresh process reading the file: the oracle is not rerun, so torch is never imported
    code = ("import sys, runpy; sys.argv = ['gpu_parity', '--model', %r, '--targets', 'llama:cpu=/nonexistent', "
            "'--per-family', '1', '--reference', %r]\n"
            "try:\n    runpy.run_module('r4b_edge.benchmarks.card.gpu_parity', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)") % (model, str(ref))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "TORCH False" in out and '"error"' in out  # the target failed (no such folder), torch untouched
    with pytest.raises(SystemExit, match=f"holds {NF} replies at --per-family 1"):
        main(["--model", model, "--targets", "torch:cpu", "--per-family", "2", "--reference", str(ref)])
