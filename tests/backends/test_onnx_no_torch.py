"""The onnx backend runs with torch (and transformers) made unimportable: the `r4b-edge[onnx]`
install. Runs in a subprocess whose import system refuses torch."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from r4b_edge.export.onnx import export_onnx

SCRIPT = textwrap.dedent("""
    import json, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "onnxscript"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    import r4b_edge
    from r4b_edge.apps.cli import main

    model = r4b_edge.load(sys.argv[1], backend="onnx", device="auto")
    events = [e for e in model.stream(sys.argv[2], "what is it?", max_tokens=8) if type(e).__name__ != "Progress"]
    result = model.chat(sys.argv[2], "what is it?", max_tokens=8, mode="think", max_think_tokens=3,
                        measure_p_think=True)
    rc = main(["info"])
    blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print("RESULT" + json.dumps({"n_events": len(events), "first": type(events[0]).__name__,
                                  "last": type(events[-1]).__name__, "p_think": result.p_think,
                                  "image_tokens": result.stats.image_tokens, "device": model.info()["device"],
                                  "info_rc": rc, "loaded": blocked}))
""")


@pytest.mark.slow
def test_onnx_backend_runs_without_torch(tmp_path_factory, tiny_ckpt, tmp_path):
    d = export_onnx(tiny_ckpt, tmp_path_factory.getbasetemp() / f"onnx-{tiny_ckpt.name}-fp32", "fp32")
    png = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(png)
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(d), str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT"))
    r = json.loads(line[len("RESULT"):])
    assert r["loaded"] == []
    assert r["first"] == "Decision" and r["last"] == "Done" and r["n_events"] >= 2
    assert 0.0 <= r["p_think"] <= 1.0 and r["image_tokens"] > 0
    assert r["device"] == "cpu" and r["info_rc"] == 0
    assert "CPUExecutionProvider" in p.stdout  # `r4b-edge info` lists the onnxruntime providers


def test_blocker_really_blocks_torch():
    """The check above can fail: importing torch under the blocker raises."""
    code = SCRIPT.split("import r4b_edge")[0] + "import torch\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "blocked" in p.stderr
