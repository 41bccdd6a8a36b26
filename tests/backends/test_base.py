"""The backend contract's shared pieces: the image-embedding LRU every backend uses."""
from __future__ import annotations

from r4b_edge.backends.base import IMAGE_CACHE_SIZE, ImageCache


def test_image_cache_is_lru_and_reports_hits() -> None:
    calls: list[str] = []

    def compute(k: str):
        return lambda: calls.append(k) or f"emb-{k}"

    c = ImageCache(size=2)
    assert c.get_or_compute("a", compute("a")) == ("emb-a", False)
    assert c.get_or_compute("b", compute("b")) == ("emb-b", False)
    assert c.get_or_compute("a", compute("a")) == ("emb-a", True)  # a is now the most recent
    assert c.get_or_compute("c", compute("c")) == ("emb-c", False)  # evicts b, the least recent
    assert len(c) == 2
    assert c.get_or_compute("a", compute("a"))[1] is True
    assert c.get_or_compute("b", compute("b")) == ("emb-b", False)  # b was evicted: computed again
    assert calls == ["a", "b", "c", "b"]
    c.clear()
    assert len(c) == 0 and c.get_or_compute("a", compute("a"))[1] is False
    assert ImageCache().size == IMAGE_CACHE_SIZE == 8
