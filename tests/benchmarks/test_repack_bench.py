"""`bench --repack`'s worker and table on a tiny model (the real run takes minutes: docs)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")


def test_pair_worker_and_table(tiny_ckpt: Path, tmp_path: Path) -> None:
    from r4b_edge.backends import llama_repack as lr
    from r4b_edge.benchmarks import repack
    from r4b_edge.benchmarks.latency import run_isolated, summarize

    got = run_isolated("r4b_edge.benchmarks.repack:prepare_worker",
                       {"src": str(tiny_ckpt), "work": str(tmp_path), "name": "tiny", "quants": ["Q8_0"]}, timeout=300)
    path = got["paths"]["Q8_0"]
    spec = {"backend": "llama", "precision": "Q8_0", "path": path, "device": "cpu", "threads": 1}
    out = run_isolated("r4b_edge.benchmarks.repack:pair_worker",
                       {"spec": spec, "n_prompt": 16, "n_gen": 4, "repeats": 2}, timeout=300, threads=1)
    if "error" in out:  # the run loads the file with repacking on: only an AMX build may die of it
        assert lr.build_has_amx(lr.parse_features(lr.llama_system_info())) and "SIGSEGV" in out["error"]
        return
    assert len(out["on"]["pp"]) == len(out["off"]["tg"]) == 2 and all(x > 0 for x in out["on"]["tg"])
    row = {"file": "tiny Q8_0", "size_mb": 0.1, "probe_s": summarize([1.0]), "probe_ok": True, "probe": "",
           "same_tokens": out["same_tokens"], "pp_off_over_on": summarize([1.0]), "tg_off_over_on": summarize([1.0])}
    for s in ("on", "off"):
        row[s] = {"pp_tps": summarize(out[s]["pp"]), "tg_tps": summarize(out[s]["tg"]), "load_s": 0.1}
    md = repack.markdown({"rows": [row, {"file": "x", "size_mb": 1, "skipped": "worker killed by SIGSEGV",
                                         "probe_s": summarize([2.0])}],
                          "threads": 1, "n_prompt": 16, "n_gen": 4, "repeats": 2, "cpu": lr.cpu_report()})
    assert "| tiny Q8_0 | 0.1 |" in md and "worker killed by SIGSEGV" in md and "llama.cpp AMX kernels:" in md
