"""The recipe: every knob of the training stages and the eval (`Recipe`, presets `shipped` and
`micro`, `key=value` overrides, a run's recipe.json), the small model it builds (`model_config`),
the learning-rate schedule every stage follows (`lr_at`) and its per-process thread count."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from r4b_edge.errors import TrainingError
from r4b_edge.fsutil import atomic_write
from r4b_edge.model.config import RConfig

from .cli import PRESETS
from .dist import barrier, is_main


@dataclass
class Recipe:
    """Every knob of the three stages + eval (presets: shipped, micro)."""

    seed: int = 1234
    threads: int = 2  # torch threads per process (0: leave default; 2 = this machine's cores)
    # model
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_head_dim: int = 64
    text_intermediate: int = 768
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 512
    image_size: int = 64
    patch_size: int = 16  # 4 image tokens per world cell
    vocab_size: int = 1024
    # stage 0: the decoder's text pre-training (world text, no images; 0 steps skips it)
    lm_per_reasoning: int = 8000  # per reasoning family (think, with trace)
    lm_per_perception: int = 1500  # per perception family (direct)
    lm_perception_think_frac: float = 0.0  # share of perception items taught with their trace
    lm_per_graded: int = 4000  # per graded family (think, with trace, every level)
    lm_steps: int = 1500
    lm_batch: int = 32
    lm_lr: float = 3e-3
    # stage 1: alignment / pre-training (captions + perception, empty think masked)
    pt_per_family: int = 3000
    pt_steps: int = 2500
    pt_batch: int = 32
    pt_lr: float = 3e-3
    pt_ground: int = 1  # stage-1 auxiliary grounding targets (docs/training.md)
    ground_colour_anchor: int = 0  # colour-count answers carried from the colour word (stages 1-2)
    ground_colour_match: int = 1  # colour-count: per-cell match bits on the question's slots (stages 1-2)
    colour_count_weight: float = 3.0  # sampling weight of colour-count records vs other records (stages 1-2)
    pt_focus_steps: int = 1500  # stage 1, second phase: colour-count at `pt_focus_share` of the batch (0: off)
    pt_focus_share: float = 0.5
    pt_focus_lr: float = 2e-3
    pt_chat_frac: float = 0.3  # share of stage 1's weight on follow-up versions (2nd/3rd question of a chat)
    chat_three_frac: float = 0.5  # share of follow-ups asked third (two earlier questions), else second
    pt_replay_frac: float = 0.2  # share of stage 1's weight on stage 0's text reasoning records (replay)
    pt_replay_per_reasoning: int = 2000  # stage-0 text records per reasoning family replayed in stage 1
    # stage 2: bi-mode annealing
    an_pool_perception: int = 400  # per perception family
    an_pool_reasoning: int = 1500  # per reasoning family
    an_pool_graded: int = 2000  # per graded family (both levels)
    an_samples: int = 8  # N no-think samples per objective item
    an_temperature: float = 1.0
    an_direct_to_reasoning: float = 1.0  # mixing ratio (paper: ~2:1)
    an_perception_trace_frac: float = 0.7  # direct items also taught with their trace (forced think)
    an_chat_frac: float = 0.4  # share of each annealing group taught as a follow-up (2nd/3rd question)
    an_product_plus_weight: float = 1.0  # sampling weight of product-plus records in the annealing mix
    an_steps: int = 1500
    an_batch: int = 32
    an_lr: float = 1e-3
    an_ground: int = 1  # keep the grounding targets (image + perception prompt slots)
    # stage 3: BPO / GRPO
    rl_steps: int = 80
    rl_prompts: int = 16  # prompts per step (global)
    rl_group: int = 4  # g rollouts per mode (BPO) ; GRPO uses 2g free rollouts
    rl_lr: float = 2e-5
    rl_beta: float = 0.02
    rl_clip: float = 0.2
    rl_temperature: float = 1.0
    rl_max_new: int = 64
    rl_reasoning_frac: float = 0.5
    rl_ppo_epochs: int = 1
    # eval
    ev_per_family: int = 200
    ev_time_items: int = 20  # unbatched timing items per tier x mode
    ev_batch: int = 256
    ev_max_new: int = 80
    micro_batch: int = 64  # rows per forward/backward chunk inside a rank
    save_every: int = 50
    log_every: int = 10

    @classmethod
    def preset(cls, name: str) -> "Recipe":
        """'shipped' (the default checkpoint) or 'micro' (CI: seconds per stage)."""
        if name == "shipped":
            return cls()
        if name == "micro":
            return cls(threads=1, text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1, text_head_dim=32,
                       text_intermediate=128, vision_hidden=32, vision_layers=1, vision_heads=1,
                       vision_intermediate=64, vocab_size=400, lm_per_reasoning=10, lm_per_perception=4, lm_steps=6,
                       lm_batch=8, pt_per_family=40, pt_steps=12, pt_batch=8, pt_focus_steps=4,
                       pt_lr=3e-3, an_pool_perception=6, an_pool_reasoning=10, an_samples=4, an_steps=10,
                       an_batch=8, an_lr=3e-3, an_chat_frac=0.25, an_pool_graded=8, lm_per_graded=8, pt_chat_frac=0.25, pt_replay_per_reasoning=10, rl_steps=4, rl_prompts=4, rl_group=2, rl_lr=1e-3,
                       rl_max_new=24, ev_per_family=4, ev_time_items=1, ev_batch=32, ev_max_new=24,
                       save_every=4, log_every=2, micro_batch=16)
        raise TrainingError(f"unknown recipe preset {name!r}; use one of {', '.join(PRESETS)}")

    def with_overrides(self, items: Sequence[str]) -> "Recipe":
        """Apply 'key=value' overrides (types follow the field)."""
        d = asdict(self)
        types = {f.name: f.type for f in fields(self)}
        for it in items:
            if "=" not in it:
                raise TrainingError(f"override {it!r} must look like key=value")
            k, v = it.split("=", 1)
            if k not in d:
                raise TrainingError(f"unknown recipe field {k!r}")
            t = types[k]
            d[k] = float(v) if t in ("float", float) else int(v)
        return Recipe(**d)


#: Renamed recipe fields: an old run's recipe.json still loads.
RENAMED = {"an_two_turn_frac": "an_chat_frac"}


def recipe_from_dict(d: dict) -> Recipe:
    """A Recipe from a recipe.json's dict (renamed fields mapped; unknown fields named in the error)."""
    d = {RENAMED.get(k, k): v for k, v in d.items()}
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TrainingError(f"recipe.json has unknown fields {unknown}; known: {sorted(known)}")
    return Recipe(**d)


def load_recipe(run: Path, preset: str | None, overrides: Sequence[str] = ()) -> Recipe:
    """The run's recipe.json if present (a run keeps its recipe), else the preset; written back."""
    p = run / "recipe.json"
    if p.exists():
        rec = recipe_from_dict(json.loads(p.read_text()))
        if overrides:
            rec = rec.with_overrides(overrides)
    else:
        rec = Recipe.preset(preset or "shipped").with_overrides(overrides)
    if is_main():
        run.mkdir(parents=True, exist_ok=True)
        with atomic_write(p) as tmp:
            tmp.write_text(json.dumps(asdict(rec), indent=2))
    barrier()
    return rec


def model_config(r: Recipe, vocab_size: int, image_token_index: int) -> RConfig:
    """The R-4B-layout config of the recipe's small model (base view only, no AnyRes)."""
    tc = {
        "model_type": "qwen3", "vocab_size": vocab_size, "hidden_size": r.text_hidden,
        "intermediate_size": r.text_intermediate, "num_hidden_layers": r.text_layers,
        "num_attention_heads": r.text_heads, "num_key_value_heads": r.text_kv_heads,
        "head_dim": r.text_head_dim, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False, "tie_word_embeddings": False,
    }
    vc = {
        "model_type": "siglip_vision_model", "image_size": r.image_size, "patch_size": r.patch_size,
        "hidden_size": r.vision_hidden, "intermediate_size": r.vision_intermediate,
        "num_hidden_layers": r.vision_layers, "num_attention_heads": r.vision_heads, "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    }
    return RConfig.from_dict({
        "architectures": ["RForConditionalGeneration"], "model_type": "R", "text_config": tc,
        "vision_config": vc, "image_token_index": image_token_index, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "image_grid_pinpoints": None,
        "vision_aspect_ratio": "base", "projector_hidden_act": "gelu", "tie_word_embeddings": False,
    })


def lr_at(step: int, total: int, peak: float, warmup: int | None = None) -> float:
    """Linear warm-up then cosine decay to 10% of peak."""
    w = warmup if warmup is not None else max(1, total // 20)
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_threads(r: Recipe) -> None:
    """Apply the recipe's thread count (per process)."""
    if r.threads > 0:
        torch.set_num_threads(r.threads)
