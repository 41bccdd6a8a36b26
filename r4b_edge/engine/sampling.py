"""Token sampling on numpy logits: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GenerationOptionError


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy; top_k 0 and top_p 1.0 disable the filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationOptionError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationOptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationOptionError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise GenerationOptionError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Sampler:
    """Draws token ids from logits with one seeded generator per reply."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        p = self.params
        x = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < x.shape[-1]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.shape[-1], p=probs))
