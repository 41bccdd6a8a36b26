"""The ONNX report tool (parity / eval / speed / markdown) on a tiny export."""
from __future__ import annotations

import pytest

from r4b_edge.backends.onnx_backend import OnnxBackend
from r4b_edge.backends.torch_backend import TorchBackend
from r4b_edge.benchmarks.card import onnx_report
from r4b_edge.export.onnx import export_onnx


@pytest.fixture(scope="module")
def backends(tmp_path_factory, tiny_ckpt):
    d = export_onnx(tiny_ckpt, tmp_path_factory.getbasetemp() / f"onnx-{tiny_ckpt.name}-fp32", "fp32")
    return TorchBackend(tiny_ckpt, device="cpu"), OnnxBackend(d, device="cpu")


@pytest.mark.slow
def test_parity_eval_speed_and_table(backends):
    tb, ob = backends
    from r4b_edge.train.world import eval_items

    items = eval_items(per_family=1)
    assert len(items) == 9 and {it["tier"] for it in items} == {"perception", "reasoning", "graded"}
    par = onnx_report.greedy_parity(tb, ob, items[:3], n_tokens=8)
    assert par["identical_prompts"] == 3 and par["token_agreement"] == 1.0
    assert par["max_abs_logit_diff"] < 1e-4
    ev = onnx_report.evaluate(ob, items[:2], max_tokens=4)
    assert ev["overall"]["n"] == 2 and 0.0 <= ev["overall"]["think_rate"] <= 1.0
    speed = onnx_report.decode_speed({"torch": tb, "fp32": ob}, n_tokens=4, repeats=1)
    assert set(speed) == {"torch", "fp32"} and min(speed.values()) > 0
    res = {"model": "m", "torch": {"eval": ev, "decode_tps": speed["torch"]},
           "fp32": {"parity": par, "eval": ev, "decode_tps": speed["fp32"], "bytes": 1_000_000}}
    md = onnx_report.markdown(res)
    assert "| onnx fp32 | 1.0 |" in md and "3/3" in md and "| torch fp32 |" in md
    head = [c.strip() for c in md.splitlines()[4].split("|")]
    row = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| onnx fp32")).split("|")]
    cells = dict(zip(head, row))
    assert cells["perception acc"].endswith("%") and cells["reasoning acc"] == cells["graded acc"] == "–"
