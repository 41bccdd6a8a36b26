"""The backend contract's shared pieces: the image-embedding LRU every backend uses."""
from __future__ import annotations

from r4b_edge.backends.base import IMAGE_CACHE_SIZE, ImageCache


def test_image_cache_is_lru() -> None:
    c = ImageCache(size=2)
    assert c.get("a") is None
    c.put("a", "emb-a")
    c.put("b", "emb-b")
    assert c.get("a") == "emb-a"  # a is now the most recent
    c.put("c", "emb-c")  # evicts b, the least recent
    assert len(c) == 2 and c.get("b") is None
    assert c.get("a") == "emb-a" and c.get("c") == "emb-c"
    c.clear()
    assert len(c) == 0 and c.get("a") is None
    assert ImageCache().size == IMAGE_CACHE_SIZE == 8
