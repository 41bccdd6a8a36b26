"""What a backend's KV cache holds, position by position, and the prefix cache of saved states.

Every position of a sequence has a *key*: a token id (an int) for a text position, and
`(image key, row)` for the `row`-th position of an image (`PreparedImage.key` is the sha256 of
its pixels and its grid, so the same photo at another budget is another image). Two prompts
share their KV entries exactly as far as their keys agree, which is what prefix reuse uses:
a follow-up evaluates only the positions after the longest common prefix with what is in the
cache (docs/design.md, "Prefix reuse").

`PrefixCache` keeps a few saved states (`KVSnapshot`) besides the live one, LRU and bounded
in bytes: a server that alternates between conversations restores the one that shares the
most with the next request instead of prefilling it again.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

Key = Hashable

#: a prompt needs at least this many positions more in the cache than a snapshot already
#: holds before the live state is saved over it (saving costs a copy of the cache)
MIN_SAVED_POSITIONS = 16


def segment_keys(segments: Sequence[Any], image_positions) -> list[Key]:
    """The keys of a prompt's positions: token ids as they are, an image's positions as
    `(image.key, row)`; `image_positions(image)` -> the positions it takes."""
    from ..model.processing import PreparedImage

    keys: list[Key] = []
    for seg in segments:
        if isinstance(seg, PreparedImage):
            keys.extend((seg.key, i) for i in range(image_positions(seg)))
        else:
            keys.extend(int(t) for t in seg)
    return keys


def common_prefix(a: Sequence[Key], b: Sequence[Key]) -> int:
    """Length of the longest common prefix of two key lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual follow-up: the whole cache is a prefix of the new prompt
        return n
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return n  # pragma: no cover - the slice comparison above already found it equal


@dataclass
class KVSnapshot:
    """A saved copy of a backend's cache: `keys` of its positions, the backend's own `state`
    (opaque), and the bytes that state holds."""

    keys: list[Key]
    state: Any
    nbytes: int


_ids = itertools.count()


class PrefixCache:
    """A few saved cache states, least recently used evicted first, at most `max_bytes` in all
    (a state larger than that is not kept). Used by one backend, from one thread at a time."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[int, KVSnapshot] = OrderedDict()
        self.hits = 0
        self.saved = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._items.values())

    def best(self, keys: Sequence[Key]) -> tuple[KVSnapshot | None, int]:
        """The saved state sharing the longest prefix with `keys`, and that length (None, 0
        when none shares a position). The one returned becomes the most recent."""
        best_id, best_n = None, 0
        for sid, snap in self._items.items():
            n = common_prefix(snap.keys, keys)
            if n > best_n:
                best_id, best_n = sid, n
        if best_id is None:
            return None, 0
        self._items.move_to_end(best_id)
        return self._items[best_id], best_n

    def covers(self, keys: Sequence[Key]) -> bool:
        """True when a saved state already holds `keys` (or all but a few positions of them)."""
        for snap in self._items.values():
            if common_prefix(snap.keys, keys) >= len(keys) - MIN_SAVED_POSITIONS:
                return True
        return False

    def put(self, snap: KVSnapshot) -> None:
        """Keep `snap`; states it extends (their keys a prefix of its keys) are dropped, then the
        least recently used ones until the total fits `max_bytes`."""
        if snap.nbytes > self.max_bytes:
            return
        for sid in [sid for sid, s in self._items.items() if common_prefix(s.keys, snap.keys) == len(s.keys)]:
            del self._items[sid]
        self._items[next(_ids)] = snap
        self.saved += 1
        while self.nbytes > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


__all__ = ["KVSnapshot", "PrefixCache", "common_prefix", "segment_keys", "MIN_SAVED_POSITIONS"]
