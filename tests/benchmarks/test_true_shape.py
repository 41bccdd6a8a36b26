"""The true-shape benchmark's small parts (building the 4B-width model takes minutes: not here)."""
from __future__ import annotations

from pathlib import Path

from r4b_edge.benchmarks.true_shape import world_tokenizer
from r4b_edge.model.tokenizer import Tokenizer


def test_world_tokenizer_is_written_once(tmp_path: Path):
    d = world_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_dir(d)
    assert tok.image is not None and tok.decode(tok.encode("How many shapes are there?")) == "How many shapes are there?"
    before = (d / "tokenizer.json").stat().st_mtime_ns
    assert world_tokenizer(d) == d and (d / "tokenizer.json").stat().st_mtime_ns == before
