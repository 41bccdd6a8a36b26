"""The contract every backend (torch | llama | onnx) implements.

A backend owns one sequence (a KV cache) and answers three calls:
`prefill` (reset, then evaluate a prompt made of token-id runs and images),
`forward` (append tokens, return their logits) and `truncate` (roll the cache
back). Logits are float32 numpy arrays, so the engine above never sees torch.
"""
from __future__ import annotations

import abc
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..model.config import RConfig
    from ..model.processing import PreparedImage
    from ..model.tokenizer import Tokenizer

Segment = Union[Sequence[int], "PreparedImage"]
IMAGE_CACHE_SIZE = 8  # images whose packed embeddings a backend keeps (a chat re-sends its image every turn)


@dataclass
class PrefillTimings:
    """What the last `prefill` cost; the engine copies it into `Stats`."""

    image_tokens: int = 0
    vision_encode_ms: float = 0.0
    prefill_ms: float = 0.0
    cached_images: int = 0


@dataclass
class BackendInfo:
    name: str
    device: str
    model_path: str
    precision: str = ""
    extra: dict = field(default_factory=dict)


class ImageCache:
    """The backends' LRU of packed image embeddings, keyed by `PreparedImage.key` (sha256 of the
    pixels): a chat that re-sends its image every turn encodes it once."""

    def __init__(self, size: int = IMAGE_CACHE_SIZE) -> None:
        self.size = int(size)
        self._items: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every entry (the backend is closing)."""
        self._items.clear()

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, True) when `key` is cached (it becomes the most recent), else
        (compute(), False), stored and the least recent entry dropped past `size`."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit, True
        value = compute()
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value, False


def encode_segments(segments: Sequence[Segment], image_fn: Callable[[Any], tuple[Any, bool]],
                    text_fn: Callable[[Sequence[int]], Any]) -> tuple[list, PrefillTimings]:
    """Walk a prompt's segments in order: images through `image_fn` (returns
    embeddings [n, hidden] and whether they came from the cache), non-empty
    token runs through `text_fn`. Returns the parts and the image timings
    (`prefill_ms` is left for the caller, who knows when the prefill ends)."""
    from ..model.processing import PreparedImage

    parts: list = []
    t = PrefillTimings()
    vision_s = 0.0
    for seg in segments:
        if isinstance(seg, PreparedImage):
            tv = time.perf_counter()
            emb, hit = image_fn(seg)
            vision_s += time.perf_counter() - tv
            t.cached_images += int(hit)
            t.image_tokens += int(emb.shape[0])
            parts.append(("image", emb))
        elif len(seg):
            parts.append(("text", text_fn(seg)))
    t.vision_encode_ms = vision_s * 1000.0
    return parts, t


class Backend(abc.ABC):
    """One loaded model on one device, holding one sequence's KV cache."""

    name: str = ""
    device: str = "cpu"
    config: "RConfig"
    tokenizer: "Tokenizer"
    model_path: Path

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

    @abc.abstractmethod
    def image_token_count(self, image: "PreparedImage") -> int:
        """Positions an image takes in the sequence."""

    @abc.abstractmethod
    def prefill(self, segments: Sequence[Segment]) -> np.ndarray:
        """Reset the sequence, evaluate the prompt; return the last position's
        logits, shape [vocab]. Fills `self.timings`."""

    @abc.abstractmethod
    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens; return their logits, shape [len(token_ids), vocab]."""

    def forward_last(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens; return only the last one's logits, shape [vocab]. The array may be a
        read-only view of the backend's own buffer, valid until the next call on the backend
        (the engine samples from it at once); backends override this to skip the other rows."""
        return self.forward(token_ids)[-1]

    @abc.abstractmethod
    def truncate(self, n_past: int) -> None:
        """Drop cache positions >= n_past."""

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.device, str(self.model_path))

    def close(self) -> None:
        """Release native resources (llama.cpp contexts, ORT sessions)."""

    timings: PrefillTimings = PrefillTimings()
