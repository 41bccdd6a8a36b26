"""The contract every backend (torch | llama | onnx) implements.

A backend owns one sequence (a KV cache) and answers four calls: `prefill_steps` (evaluate
a prompt made of token-id runs and images, reusing the longest prefix already in the cache,
yielding `Progress` as views are encoded and chunks evaluated), `prefill` (the same, blocking;
by default from an empty cache), `forward` (append tokens, return their logits) and `truncate`
(roll the cache back). Logits are float32 numpy arrays, so the engine above never sees torch.

This class does the bookkeeping every backend shares: the key of every cached position
(`kvcache`), which positions a prompt can reuse, the image-embedding cache, the chunking
of the prefill and its timings. A backend implements the hooks below it (`_reset`,
`_truncate`, `_eval`, `_forward`, `_vision_view`, `_pack`, `_snapshot`, `_restore`).
"""
from __future__ import annotations

import abc
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence, Union

import numpy as np

from ..engine.events import Progress
from ..errors import ContextLengthError, context_fixes
from .kvcache import MIN_SAVED_POSITIONS, KVSnapshot, PrefixCache, common_prefix, segment_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..model.config import RConfig
    from ..model.processing import PreparedImage
    from ..model.tokenizer import Tokenizer

Segment = Union[Sequence[int], "PreparedImage"]
IMAGE_CACHE_SIZE = 8  # images whose packed embeddings a backend keeps (a chat re-sends its image every turn)
PREFILL_CHUNK = 512  # positions evaluated per prefill step (one `Progress` each)


@dataclass
class PrefillTimings:
    """What the last `prefill` cost; the engine copies it into `Stats`. `image_tokens`: the
    prompt's image positions (reused ones too); `positions_evaluated` + `positions_reused` =
    the prompt's positions; `cached_images`: images not encoded again (their embeddings were
    cached, or their positions were all reused)."""

    image_tokens: int = 0
    vision_encode_ms: float = 0.0
    prefill_ms: float = 0.0
    cached_images: int = 0
    positions_evaluated: int = 0
    positions_reused: int = 0


@dataclass
class BackendInfo:
    name: str
    device: str
    model_path: str
    precision: str = ""
    extra: dict = field(default_factory=dict)


class ImageCache:
    """The backends' LRU of packed image embeddings, keyed by `PreparedImage.key`: a chat that
    re-sends its image every turn encodes it once."""

    def __init__(self, size: int = IMAGE_CACHE_SIZE) -> None:
        self.size = int(size)
        self._items: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every entry (the backend is closing)."""
        self._items.clear()

    def get(self, key: str) -> Any:
        """The cached value (it becomes the most recent), or None."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: str, value: Any) -> None:
        """Store `value`; the least recent entry is dropped past `size`."""
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            self._items.popitem(last=False)


class Backend(abc.ABC):
    """One loaded model on one device, holding one sequence's KV cache."""

    name: str = ""
    device: str = "cpu"
    config: "RConfig"
    tokenizer: "Tokenizer"
    model_path: Path
    prefill_chunk: int = PREFILL_CHUNK
    #: saved cache states beside the live one (None: only the live one; the server sets one)
    prefix_cache: PrefixCache | None = None
    timings: PrefillTimings = PrefillTimings()

    def _init_sequence(self) -> None:
        """Subclasses call this in `__init__`: an empty sequence and image cache."""
        self._keys: list = []
        self._images = ImageCache()
        self.timings = PrefillTimings()

    @property
    @abc.abstractmethod
    def n_past(self) -> int:
        """Positions currently in the KV cache."""

    #: the `n_ctx` the backend was loaded with (None: the model's whole context)
    n_ctx_limit: int | None = None

    @property
    def n_ctx(self) -> int:
        """Context length the backend can hold: the model's context, or `n_ctx_limit` when smaller."""
        limit = self.config.max_position_embeddings
        return limit if self.n_ctx_limit is None else min(limit, int(self.n_ctx_limit))

    def image_token_count(self, image: "PreparedImage") -> int:
        """Positions an image takes in the sequence (the grid it was prepared with: a budget may
        have chosen a smaller one than the model's full grid)."""
        return int(image.n_tokens)

    @property
    def cached_keys(self) -> list:
        """The key of every position in the cache (`kvcache`), oldest first (a copy)."""
        return list(self._keys)

    # ---- prefill ------------------------------------------------------------------------------
    def prefill(self, segments: Sequence[Segment], *, reuse: bool = False) -> np.ndarray:
        """Evaluate a prompt; return the last position's logits [vocab]. `reuse=False` (the
        default) starts from an empty cache; see `prefill_steps`. Fills `self.timings`."""
        steps = self.prefill_steps(segments, reuse=reuse)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, segments: Sequence[Segment], *, reuse: bool = True,
                      ) -> Generator[Progress, None, np.ndarray]:
        """Evaluate a prompt, yielding `Progress` (as each image starts and after each of its views,
        as the prefill starts and after each chunk of `prefill_chunk` positions); returns the last
        position's logits [vocab].

        With `reuse`, the cache keeps the longest prefix it shares with the prompt (or a state
        of `prefix_cache` that shares more is restored first) and only the positions after it
        are evaluated: at least the last one, whose logits are returned. Positions evaluated
        before an interruption (the consumer closing the generator) stay reusable."""
        t0 = time.perf_counter()
        keys = segment_keys(segments, self.image_token_count)
        if not keys:
            raise ContextLengthError("prefill got an empty prompt: pass at least one token or image")
        if len(keys) > self.n_ctx:
            raise ContextLengthError(
                f"the prompt needs {len(keys)} positions but the {self.name} context holds {self.n_ctx}: "
                + context_fixes(len(keys), self.n_ctx, self.config.max_position_embeddings))
        keep = self._reusable(keys) if reuse else 0
        keep = min(keep, len(keys) - 1)
        if keep == 0:
            self._reset()
            self._keys = []
        elif keep < self.n_past:
            self.truncate(keep)
        tm = PrefillTimings(positions_reused=keep, positions_evaluated=len(keys) - keep)
        parts = yield from self._tail_inputs(segments, keep, tm)
        done, total = 0, len(keys) - keep
        t1 = time.perf_counter()
        yield Progress("prefill", 0, total, 0.0)
        logits, chunk = None, []
        try:
            for p, (kind, x, pkeys) in enumerate(parts):
                for s in range(0, len(pkeys), self.prefill_chunk):
                    k = min(self.prefill_chunk, len(pkeys) - s)
                    last = p == len(parts) - 1 and s + k == len(pkeys)
                    chunk = pkeys[s:s + k]
                    out = self._eval(kind, x[s:s + k], last)
                    self._keys.extend(chunk)
                    chunk = []
                    done += k
                    if last:
                        logits = out
                    yield Progress("prefill", done, total, (time.perf_counter() - t1) * 1000.0)
        except BaseException:  # an error, Ctrl-C, or the consumer leaving: keep what is consistent
            if chunk and self.n_past == len(self._keys) + len(chunk):
                self._keys.extend(chunk)  # the chunk was evaluated just before the interruption
            elif self.n_past != len(self._keys):  # part of a chunk: start clean next time
                self._reset()
                self._keys = []
            raise
        tm.prefill_ms = (time.perf_counter() - t0) * 1000.0 - tm.vision_encode_ms
        self.timings = tm
        return logits

    def _reusable(self, keys: list) -> int:
        """Positions of `keys` the cache can keep: the live cache's common prefix, or a saved
        state's when `prefix_cache` has one that shares more (it is restored). The live state is
        saved first when the prompt would drop a part of it no saved state holds."""
        if len(self._keys) != self.n_past:  # moved by something that bypassed this class
            self._keys = []
            return 0
        keep = common_prefix(self._keys, keys)
        pc = self.prefix_cache
        if pc is None:
            return keep
        if len(self._keys) - keep >= MIN_SAVED_POSITIONS and not pc.covers(self._keys):
            state, nbytes = self._snapshot()
            pc.put(KVSnapshot(list(self._keys), state, nbytes))
        snap, n = pc.best(keys)
        if snap is not None and n > keep:
            self._restore(snap.state)
            self._keys = list(snap.keys)
            pc.hits += 1
            keep = n
        return keep

    def _tail_inputs(self, segments: Sequence[Segment], keep: int, tm: PrefillTimings,
                     ) -> Generator[Progress, None, list]:
        """The prompt's parts past position `keep` as (kind, rows, keys): token ids ("text")
        or packed image embeddings ("image", encoded now unless cached, one `Progress` a view)."""
        from ..model.processing import PreparedImage

        parts: list = []
        pos = 0
        for seg in segments:
            if isinstance(seg, PreparedImage):
                n = self.image_token_count(seg)
                tm.image_tokens += n
                if pos + n <= keep:
                    tm.cached_images += 1
                else:
                    emb = self._images.get(seg.key)
                    if emb is None:
                        emb = yield from self._encode_image(seg, tm)
                        self._images.put(seg.key, emb)
                    else:
                        tm.cached_images += 1
                    lo = max(0, keep - pos)
                    parts.append(("image", emb[lo:], [(seg.key, i) for i in range(lo, n)]))
            else:
                ids = [int(t) for t in seg]
                n = len(ids)
                if pos + n > keep and n:
                    lo = max(0, keep - pos)
                    parts.append(("text", ids[lo:], ids[lo:]))
            pos += n
        return parts

    def image_embeddings(self, image: "PreparedImage") -> tuple[Any, bool]:
        """The image's packed embeddings [n_tokens, hidden] (the backend's array type; cached by
        `image.key`) and whether they came from the cache."""
        hit = self._images.get(image.key)
        if hit is not None:
            return hit, True
        steps = self._encode_image(image, PrefillTimings())
        while True:
            try:
                next(steps)
            except StopIteration as done:
                self._images.put(image.key, done.value)
                return done.value, False

    def _encode_image(self, image: "PreparedImage", tm: PrefillTimings) -> Generator[Progress, None, Any]:
        """Encode the image's views one at a time (a `Progress` each), then pack them."""
        t0 = time.perf_counter()
        n_views = int(image.pixel_values.shape[0])
        feats = []
        yield Progress("vision", 0, n_views, 0.0)
        for i in range(n_views):
            feats.append(self._vision_view(image, i))
            yield Progress("vision", i + 1, n_views, (time.perf_counter() - t0) * 1000.0)
        emb = self._pack(image, feats)
        if int(emb.shape[0]) != self.image_token_count(image):
            from ..errors import ModelFormatError

            raise ModelFormatError(f"image embeddings have {emb.shape[0]} rows; the prompt reserved "
                                   f"{self.image_token_count(image)}")
        tm.vision_encode_ms += (time.perf_counter() - t0) * 1000.0
        return emb

    # ---- decode -------------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens; return their logits, shape [len(token_ids), vocab]."""
        ids = [int(t) for t in token_ids]
        try:
            return self._forward(ids)
        finally:
            self._sync(ids)

    def forward_last(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens; return only the last one's logits, shape [vocab]. The array may be a
        read-only view of the backend's own buffer, valid until the next call on the backend
        (the engine samples from it at once)."""
        ids = [int(t) for t in token_ids]
        try:
            return self._forward_last(ids)
        finally:
            self._sync(ids)

    def _sync(self, ids: list[int]) -> None:
        """After a forward: the keys of the positions it added (all of `ids`, or the part
        evaluated before an error)."""
        n, k = self.n_past, len(self._keys)
        if n >= k:
            self._keys.extend(ids[:n - k])
        else:
            del self._keys[n:]

    def truncate(self, n_past: int) -> None:
        """Drop cache positions >= n_past."""
        n_past = max(0, int(n_past))
        if n_past >= self.n_past:
            return
        self._truncate(n_past)
        del self._keys[n_past:]

    def snapshot(self) -> KVSnapshot:
        """A copy of the cache as it is now (what `prefix_cache` keeps)."""
        state, nbytes = self._snapshot()
        return KVSnapshot(list(self._keys), state, nbytes)

    def restore(self, snap: KVSnapshot) -> None:
        """Make `snap` the live cache."""
        self._restore(snap.state)
        self._keys = list(snap.keys)

    # ---- hooks --------------------------------------------------------------------------------
    @abc.abstractmethod
    def _reset(self) -> None:
        """Empty the cache."""

    @abc.abstractmethod
    def _truncate(self, n_past: int) -> None:
        """Drop cache positions >= n_past (< n_past now)."""

    @abc.abstractmethod
    def _eval(self, kind: str, rows: Any, want_logits: bool) -> np.ndarray | None:
        """Evaluate `rows` at positions n_past..: token ids (kind "text", a list) or image
        embeddings ("image", rows of what `_pack` returned); the last row's logits [vocab]
        when `want_logits`, else None (nothing is computed for them)."""

    @abc.abstractmethod
    def _forward(self, ids: list[int]) -> np.ndarray:
        """Append tokens; their logits [len(ids), vocab]."""

    def _forward_last(self, ids: list[int]) -> np.ndarray:
        return self._forward(ids)[-1]

    @abc.abstractmethod
    def _vision_view(self, image: "PreparedImage", i: int) -> Any:
        """Projected features [tokens_per_view, hidden] of the image's view `i`."""

    @abc.abstractmethod
    def _pack(self, image: "PreparedImage", feats: list) -> Any:
        """The image's sequence [n_tokens, hidden] from its views' features (AnyRes packing)."""

    @abc.abstractmethod
    def _snapshot(self) -> tuple[Any, int]:
        """(a copy of the cache's state, its bytes)."""

    @abc.abstractmethod
    def _restore(self, state: Any) -> None:
        """Make a `_snapshot` state the cache."""

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.device, str(self.model_path))

    def close(self) -> None:
        """Release native resources (llama.cpp contexts, ORT sessions)."""


def numpy_pack(image: "PreparedImage", feats: list, config: "RConfig", newline: np.ndarray | None) -> np.ndarray:
    """`_pack` for backends with numpy features: `processing.pack_anyres`."""
    from ..model.processing import pack_anyres

    return pack_anyres(np.stack(feats), image.grid, image.orig_size, config, newline)
