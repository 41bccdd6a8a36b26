"""Token logprobs: entries against a float64 reference, top-k order and ties, exact bytes of split UTF-8 tokens."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.engine.logprobs import MAX_TOP_LOGPROBS, LogprobRecorder, check_top_logprobs, logsumexp
from r4b_edge.errors import GenerationOptionError


def ref_logprobs(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def test_entry_matches_float64_reference_at_qwen_vocab(tiny_tokenizer):
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(151_936) * 4).astype(np.float32)
    row[7] = 30.0
    rec = LogprobRecorder(tiny_tokenizer, top_logprobs=5)
    tid = 300  # any id the tiny tokenizer has (the row is longer than its vocabulary; only logits matter)
    e = rec.entry(row[:tiny_tokenizer.vocab_size], tid)
    want = ref_logprobs(row[:tiny_tokenizer.vocab_size])
    assert e.id == tid and e.logprob == pytest.approx(want[tid], abs=1e-9)
    assert [t.id for t in e.top_logprobs] == list(np.argsort(-want, kind="stable")[:5])
    assert [t.logprob for t in e.top_logprobs] == pytest.approx(sorted(want, reverse=True)[:5], abs=1e-9)
    assert float(logsumexp(row)) == pytest.approx(float(np.log(np.exp(row.astype(np.float64)).sum())), rel=1e-12)


def test_ties_ordered_by_id_and_k_larger_than_vocab(tiny_tokenizer):
    V = tiny_tokenizer.vocab_size
    row = np.zeros(V, dtype=np.float32)
    row[[9, 3, 50]] = 2.0
    rec = LogprobRecorder(tiny_tokenizer, top_logprobs=2)
    assert [t.id for t in rec.entry(row, 50).top_logprobs] == [3, 9]
    assert len(rec.top(row, float(logsumexp(row)), V + 5)) == V
    assert rec.entry(row, 50).logprob == pytest.approx(2.0 - np.log(3 * np.e**2 + V - 3), abs=1e-6)


def test_bytes_are_exact_for_tokens_that_split_a_character(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "café 東京 ñ € 🙂 Ж"  # the last two are not in the tiny corpus: byte tokens
    ids = tok.encode(text)
    parts = [tok.token_bytes(t) for t in ids]
    assert b"".join(parts) == text.encode("utf-8")
    split = [p for p in parts if _invalid(p)]
    assert split, "fixture: some token of the tiny tokenizer holds part of a multi-byte character"
    rec = LogprobRecorder(tok)
    row = np.zeros(tok.vocab_size, dtype=np.float32)
    bad = ids[[_invalid(p) for p in parts].index(True)]
    e = rec.entry(row, bad)
    assert bytes(e.bytes) == tok.token_bytes(bad) and "\ufffd" in e.token
    special = rec.entry(row, tok.im_end)
    assert special.token == "<|im_end|>" and bytes(special.bytes) == b"<|im_end|>"


def _invalid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_check_top_logprobs():
    check_top_logprobs(True, MAX_TOP_LOGPROBS)
    check_top_logprobs(False, 0)
    for lp, k, msg in [(False, 2, "needs logprobs=True"), (True, MAX_TOP_LOGPROBS + 1, "within"),
                       (True, -1, "within"), (True, 1.5, "within"), ("yes", 0, "True or False")]:
        with pytest.raises(GenerationOptionError, match=msg):
            check_top_logprobs(lp, k)
