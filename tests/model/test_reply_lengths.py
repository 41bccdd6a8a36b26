"""The model's own reply lengths (deadline mode's priors in a fresh process): derived from the eval
results in the engine's units, carried by the GGUF and ONNX exports, and the fallback without them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from r4b_edge.errors import ModelFormatError
from r4b_edge.formats import GGUF_REPLY_LENGTHS_KEY, ONNX_REPLY_LENGTHS_FILE
from r4b_edge.model.reply_lengths import (EVAL_RESULTS, ReplyLengths, eval_reply_lengths, from_eval_results,
                                          read_reply_lengths)
from r4b_edge.model.tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "r4b_edge" / "assets" / "model"


class _Tok:
    """Stands in for a tokenizer: `EMPTY_THINK_CONTINUATION` is 3 tokens, the separator 1."""

    def encode(self, text: str) -> list[int]:
        return {"\n\n</think>\n\n": [1, 2, 1], "\n\n": [1]}[text]


def _results(auto_tokens=20.0, rate=0.5, direct=6.0, think_mode=50.0) -> dict:
    rows = {"auto": {"mean_tokens": auto_tokens, "think_rate": rate}, "no-think": {"mean_tokens": direct},
            "think": {"mean_tokens": think_mode, "think_rate": 1.0}}
    return {"ship": "bpo", "models": {"bpo": {m: {"overall": r} for m, r in rows.items()}}}


def test_lengths_from_eval_results_in_engine_units():
    got = from_eval_results(_results(), _Tok())
    # thinking replies: (20 - 0.5 * 6) / 0.5 = 34 tokens; the answer after `</think>`: 6 - 3 + 1 = 4;
    # the reasoning before `</think>`: 34 - 4 - 1 = 29
    assert (got.think_tokens, got.answer_tokens_think, got.answer_tokens_no_think) == (29.0, 4.0, 6.0)
    never = from_eval_results(_results(rate=0.0), _Tok())  # auto never thinks: think mode's length
    assert never.think_tokens == 50.0 - 4.0 - 1.0
    assert from_eval_results({"ship": "bpo", "models": {}}, _Tok()) is None
    assert from_eval_results({"models": {"bpo": {}}}, _Tok()) is None
    assert from_eval_results(_results(auto_tokens=3.0, direct=6.0), _Tok()) is None  # not a length


def test_bundled_lengths_match_the_engines_replies():
    """The derived lengths against what the engine counts on real replies of the bundled model."""
    pytest.importorskip("torch")
    import r4b_edge
    from r4b_edge.train.world import eval_items

    tok = Tokenizer.from_dir(BUNDLED)
    want = eval_reply_lengths(BUNDLED, tok)
    assert want.answer_tokens_no_think == pytest.approx(5.0, abs=0.05)  # `\n\n</think>\n\n` + digit + end
    assert want.answer_tokens_think == pytest.approx(3.0, abs=0.05)     # `\n\n` + digit + end
    assert "stage bpo" in want.source
    reasoning, answers, direct = [], [], []
    with r4b_edge.load(BUNDLED, backend="torch") as m:
        assert m.engine.deadline.think_tokens == want.think_tokens  # what a fresh process plans with
        for it in eval_items(per_family=3, interleaved=True):
            r = m.chat(it["image"], it["question"])
            if r.thought:
                reasoning.append(r.stats.think_tokens - 1)  # the tokens before `</think>`
                answers.append(r.stats.answer_tokens)
            else:
                direct.append(r.stats.answer_tokens)
    assert len(reasoning) >= 6 and len(direct) >= 6
    assert np.mean(reasoning) == pytest.approx(want.think_tokens, rel=0.15)
    assert np.mean(answers) == pytest.approx(want.answer_tokens_think, abs=1.0)  # two-digit sums: one more
    assert np.mean(direct) == pytest.approx(want.answer_tokens_no_think, abs=0.5)


def test_no_eval_results_means_no_lengths(tmp_path: Path):
    tok = _Tok()
    assert eval_reply_lengths(tmp_path, tok) is None
    assert read_reply_lengths(tmp_path, tok) is None
    (tmp_path / EVAL_RESULTS).parent.mkdir()
    (tmp_path / EVAL_RESULTS).write_text("{not json")
    assert eval_reply_lengths(tmp_path, tok) is None  # an unreadable report: the planner's defaults


def test_malformed_export_summary_names_the_file(tmp_path: Path):
    (tmp_path / "genai_config.json").write_text("{}")
    (tmp_path / ONNX_REPLY_LENGTHS_FILE).write_text(json.dumps({"think_tokens": -1}))
    with pytest.raises(ModelFormatError, match=f"{ONNX_REPLY_LENGTHS_FILE}.*re-export"):
        read_reply_lengths(tmp_path, _Tok())
    ok = ReplyLengths(42.0, 3.0, 5.0, "eval")
    (tmp_path / ONNX_REPLY_LENGTHS_FILE).write_text(json.dumps(ok.to_dict()))
    got = read_reply_lengths(tmp_path, _Tok())
    assert (got.think_tokens, got.answer_tokens_think, got.answer_tokens_no_think) == (42.0, 3.0, 5.0)


@pytest.fixture(scope="module")
def ckpt_with_eval(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    """The tiny checkpoint plus the bundled model's eval results."""
    out = tmp_path_factory.mktemp("evalckpt") / "tiny-with-eval"
    shutil.copytree(tiny_ckpt, out)
    (out / EVAL_RESULTS).parent.mkdir()
    shutil.copyfile(BUNDLED / EVAL_RESULTS, out / EVAL_RESULTS)
    return out


def _same(a: ReplyLengths, b: ReplyLengths) -> bool:
    return all(abs(x - y) < 1e-3 for x, y in zip((a.think_tokens, a.answer_tokens_think, a.answer_tokens_no_think),
                                                (b.think_tokens, b.answer_tokens_think, b.answer_tokens_no_think)))


def test_gguf_export_carries_the_lengths(ckpt_with_eval: Path, tiny_ckpt: Path, tmp_path: Path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    import r4b_edge
    from r4b_edge.export.gguf import export_gguf

    tok = Tokenizer.from_dir(ckpt_with_eval)
    want = eval_reply_lengths(ckpt_with_eval, tok)
    res = export_gguf(ckpt_with_eval, tmp_path / "g", quant="F16", verify=False)
    got = read_reply_lengths(res.text, tok)
    assert _same(got, want) and GGUF_REPLY_LENGTHS_KEY in got.source
    with r4b_edge.load(res.text, backend="llama") as m:
        assert m.engine.deadline.think_tokens == pytest.approx(want.think_tokens, abs=1e-3)
        assert GGUF_REPLY_LENGTHS_KEY in m.engine.deadline.prior_source
    plain = export_gguf(tiny_ckpt, tmp_path / "p", quant="F16", verify=False)  # no eval results: no key
    assert read_reply_lengths(plain.text, tok) is None


def test_onnx_export_carries_the_lengths(ckpt_with_eval: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    import r4b_edge
    from r4b_edge.export.onnx import export_onnx

    tok = Tokenizer.from_dir(ckpt_with_eval)
    out = export_onnx(ckpt_with_eval, tmp_path / "o", "fp32")
    assert _same(read_reply_lengths(out, tok), eval_reply_lengths(ckpt_with_eval, tok))
    manifest = json.loads((out / "manifest.json").read_text())
    assert ONNX_REPLY_LENGTHS_FILE in [f["name"] for f in manifest["files"]]
    with r4b_edge.load(out, backend="onnx") as m:
        assert ONNX_REPLY_LENGTHS_FILE in m.engine.deadline.prior_source
