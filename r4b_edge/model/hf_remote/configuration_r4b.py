"""R-4B configuration for transformers (remote code: `trust_remote_code=True`).

Self-contained: imports only transformers (written for transformers 5.24). The source of truth is
r4b-edge's `r4b_edge/model/hf_remote/`; every model folder r4b-edge writes carries a copy.

R-4B = LLaVA-OneVision layout: a SigLIP `vision_config`, a Qwen3 `text_config`, a LayerNorm+MLP
projector, `image_newline`. `vision_aspect_ratio`: "base" (one S x S view, no tiling; used when
`image_grid_pinpoints` is null), "anyres" (base view + AnyRes tiles, unpadded, no downsampling) or
"anyres_max_N" (LLaVA-OneVision's feature-map downsampling to about N tiles).
"""
from __future__ import annotations

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

_SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14, "image_size": 384,
                  "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False}


class RConfig(PreTrainedConfig):
    """R-4B `config.json` (model_type "R")."""

    model_type = "R"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model",
                                       init_kwargs=_SIGLIP_SO400M),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 151646
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "full"
    vision_feature_layer: int = -1
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_grid_pinpoints: list | None = None
    vision_aspect_ratio: str = "anyres"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_feature_select_strategy != "full":
            raise ValueError("R-4B's SigLIP tower has no CLS token: vision_feature_select_strategy must be "
                             f"'full' (got {self.vision_feature_select_strategy!r})")
        if self.image_grid_pinpoints is None and self.vision_aspect_ratio.startswith("anyres"):
            self.vision_aspect_ratio = "base"  # no pinpoints: nothing to tile
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True


__all__ = ["RConfig"]
