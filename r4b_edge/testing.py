"""Test fixtures' model builders, kept out of the runtime modules: a tiny valid config and a
randomly initialised checkpoint written as an R-4B folder. Nothing in r4b_edge imports this; the
tests (tests/conftest.py) and downstream test suites do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .model.config import RConfig
from .model.tokenizer import Tokenizer


def tiny_config(anyres: bool = True, vocab_size: int = 1024, image_token_index: int | None = None,
                **text_overrides: Any) -> RConfig:
    """A small valid config for tests: 2-layer Qwen3 (hidden 64) + 2-layer SigLIP (32 px, patch 8)."""
    tc = {
        "model_type": "qwen3", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"},
        "attention_bias": False, "tie_word_embeddings": False,
    }
    tc.update(text_overrides)
    vc = {
        "model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    }
    d = {
        "architectures": ["RForConditionalGeneration"], "model_type": "R",
        "text_config": tc, "vision_config": vc,
        "image_token_index": vocab_size - 3 if image_token_index is None else image_token_index,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]] if anyres else None,
        "vision_aspect_ratio": "anyres" if anyres else "base",
        "projector_hidden_act": "gelu", "tie_word_embeddings": False,
    }
    return RConfig.from_dict(d)


def write_random_checkpoint(out_dir: str | os.PathLike, config: RConfig,
                            tokenizer: Tokenizer | str | os.PathLike | Sequence[str | os.PathLike],
                            seed: int = 0, max_shard_bytes: int | None = None) -> Path:
    """A randomly initialised model saved as an R-4B folder (torch)."""
    import torch

    from .model.checkpoint import DEFAULT_MAX_SHARD_BYTES, save_checkpoint
    from .model.modeling import RForConditionalGeneration

    torch.manual_seed(seed)
    model = RForConditionalGeneration(config).eval()
    return save_checkpoint(model, config, tokenizer, out_dir,
                           max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)


def slow_down(backend, delay: float):
    """Make every `forward` / `forward_last` of `backend` (the decision's and each decode step's)
    take `delay` more seconds, as a big model would (tests of stopping, queues and timeouts).
    Returns a function that undoes it."""
    import time

    fwd, last = backend.forward, backend.forward_last

    def slow(ids):
        time.sleep(delay)
        return fwd(ids)

    def slow_last(ids):
        time.sleep(delay)
        return last(ids)

    backend.forward, backend.forward_last = slow, slow_last

    def undo() -> None:
        vars(backend).pop("forward", None)
        vars(backend).pop("forward_last", None)

    return undo
