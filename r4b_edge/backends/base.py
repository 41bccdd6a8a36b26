"""The contract every backend (torch | llama | onnx) implements.

A backend owns one sequence (a KV cache) and answers three calls:
`prefill` (reset, then evaluate a prompt made of token-id runs and images),
`forward` (append tokens, return their logits) and `truncate` (roll the cache
back). Logits are float32 numpy arrays, so the engine above never sees torch.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..model.config import RConfig
    from ..model.processing import PreparedImage
    from ..model.tokenizer import Tokenizer

Segment = Union[Sequence[int], "PreparedImage"]


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

    @property
    def n_ctx(self) -> int:
        """Context length the backend can hold."""
        return self.config.max_position_embeddings

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

    @abc.abstractmethod
    def truncate(self, n_past: int) -> None:
        """Drop cache positions >= n_past."""

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.device, str(self.model_path))

    def close(self) -> None:
        """Release native resources (llama.cpp contexts, ORT sessions)."""

    timings: PrefillTimings = PrefillTimings()
