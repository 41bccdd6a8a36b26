"""`backends.kvcache`: position keys, common prefixes and the bounded LRU of saved states."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.backends.kvcache import KVSnapshot, PrefixCache, common_prefix, segment_keys
from r4b_edge.model.processing import PreparedImage


def _image(key: str, n: int) -> PreparedImage:
    return PreparedImage(np.zeros((1, 3, 2, 2), np.float32), (0, 0), (2, 2), n, key, None)


def test_segment_keys_name_every_position() -> None:
    keys = segment_keys([[1, 2], _image("abc", 3), [4]], lambda im: im.n_tokens)
    assert keys == [1, 2, ("abc", 0), ("abc", 1), ("abc", 2), 4]


@pytest.mark.parametrize("a, b, n", [([], [1], 0), ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1, 2], 2),
                                     ([1, 5, 3], [1, 2, 3], 1), ([("x", 0)], [("y", 0)], 0), ([7], [7], 1)])
def test_common_prefix(a, b, n) -> None:
    assert common_prefix(a, b) == n


def test_prefix_cache_is_lru_bounded_in_bytes_and_drops_what_a_state_extends() -> None:
    pc = PrefixCache(max_bytes=100)
    pc.put(KVSnapshot([1, 2], "s12", 40))
    pc.put(KVSnapshot([1, 2, 3], "s123", 40))  # extends [1, 2]: that one goes
    assert len(pc) == 1 and pc.nbytes == 40
    pc.put(KVSnapshot([9], "s9", 40))
    snap, n = pc.best([1, 2, 3, 4])  # the most recent now
    assert (snap.state, n) == ("s123", 3)
    pc.put(KVSnapshot([8], "s8", 40))  # 120 bytes: the least recently used ([9]) is dropped
    assert {s.state for s in pc._items.values()} == {"s123", "s8"}
    pc.put(KVSnapshot([7], "big", 101))  # larger than the whole cache: not kept
    assert len(pc) == 2 and pc.best([5]) == (None, 0)
    assert pc.covers([1, 2, 3]) and not pc.covers(list(range(100)))
    with pytest.raises(ValueError, match=">= 0"):
        PrefixCache(-1)
