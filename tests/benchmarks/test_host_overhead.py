"""`r4b-edge bench --host-overhead`: the engine over precomputed logits at vocab 151,936."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from r4b_edge.benchmarks import host_overhead as H


def test_logit_rows_are_seeded_and_keep_specials_out() -> None:
    a = H.logit_rows(3, "typical", list(range(10, 400)), [0, 1, 2], seed=4)
    b = H.logit_rows(3, "typical", list(range(10, 400)), [0, 1, 2], seed=4)
    assert a.shape == (3, H.VOCAB) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.isneginf(a[:, :3]).all()
    assert set(a.argmax(axis=1).tolist()) <= set(range(10, 400))  # the head sits on text ids
    typ, flat = H.row_stats(a), H.row_stats(H.logit_rows(3, "flat", list(range(10, 400)), [0, 1, 2]))
    assert typ["top1_prob_median"] > 0.3 > flat["top1_prob_median"]
    assert typ["entropy_nats_median"] < flat["entropy_nats_median"]


def test_worker_runs_every_setting_through_the_engine() -> None:
    doc = H.host_overhead_worker({"n_gen": 24, "repeats": 1, "kinds": ["typical"]})
    assert [r["setting"] for r in doc["rows"]] == [name for name, _ in H.SETTINGS]
    for r in doc["rows"]:
        assert r["engine_ms_per_token"]["n"] == 1 and r["engine_ms_per_token"]["median"] > 0
        assert r["engine_cpu_ms_per_token"]["median"] > 0 and r["sampler_ms"] > 0
    md = H.markdown(doc)
    assert all(name in md for name, _ in H.SETTINGS)
    t = H.targets(doc)
    assert len(t) == len(H.SETTINGS) and t[0]["goal"] == "<= 0.05 ms"
    json.dumps(doc)


def test_greedy_reply_follows_the_rows_argmax() -> None:
    """The host backend hands the rows to the real engine: greedy tokens are the rows' argmax."""
    from r4b_edge.api import default_model_path
    from r4b_edge.engine.generate import Engine, GenerationOptions
    from r4b_edge.model.tokenizer import Tokenizer

    base = Tokenizer.from_dir(default_model_path())
    special = sorted(base.special_ids)
    text = [i for i in range(base.vocab_size) if i not in special]
    rows = H.logit_rows(8, "typical", text, special, seed=2)
    be = H._host_backend(H._folded_tokenizer(base, text), rows)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    res = Engine(be).generate_prompt(prompt, [], GenerationOptions(max_tokens=12))
    n0 = len(base.encode(prompt))
    assert res.token_ids == [int(rows[(n0 + i) % 8].argmax()) for i in range(12)]
    assert res.answer


def test_cli_writes_the_table(tmp_path: Path, capsys) -> None:
    from r4b_edge.apps.cli import main

    assert main(["bench", "--host-overhead", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "host_overhead.json").read_text())
    assert len(doc["rows"]) == 2 * len(H.SETTINGS) and doc["targets"]
    assert "engine ms/token" in (tmp_path / "host_overhead.md").read_text()


def test_folded_tokenizer_decodes_like_the_bundled_one() -> None:
    """Ids inside the bundled vocabulary decode unchanged; ids beyond it as the ordinary text id
    they fold onto; everything else (special ids, encode) is the bundled tokenizer's."""
    from r4b_edge.api import default_model_path
    from r4b_edge.model.tokenizer import Tokenizer

    base = Tokenizer.from_dir(default_model_path())
    text = [i for i in range(base.vocab_size) if i not in base.special_ids]
    fold = H._folded_tokenizer(base, text)
    ids = [text[3], text[40], base.im_end]
    assert fold.decode(ids) == base.decode(ids)
    far = H.VOCAB - 7
    assert fold.decode([text[3], far]) == base.decode([text[3], text[far % len(text)]])
    assert fold.decode([far], skip_special=True) == base.decode([text[far % len(text)]], skip_special=True)
    assert (fold.eos_ids, fold.end_think, fold.vocab_size) == (base.eos_ids, base.end_think, base.vocab_size)
    assert fold.encode("two shapes") == base.encode("two shapes")
