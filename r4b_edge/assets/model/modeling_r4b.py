"""R-4B for transformers (remote code: `trust_remote_code=True`).

Self-contained: imports only torch and transformers (written for transformers 5.24). The source of
truth is r4b-edge's `r4b_edge/model/hf_remote/`; every model folder r4b-edge writes carries a copy.

transformers' LlavaOnevisionForConditionalGeneration with R-4B's projector, as vLLM's `rvl.py`
defines it: LayerNorm(vision hidden, eps 1e-6) -> Linear -> GELU (erf) -> Linear, biases on.
Image features: the SigLIP tower's `vision_feature_layer` hidden state (no post-layernorm, no CLS),
projected; AnyRes images pack the base view, then the tile feature map unpadded to the image's
aspect with `image_newline` closing every row (`anyres_max_N` downsamples it as LLaVA-OneVision
does); base-only configs ("base", no pinpoints) use the base view alone. Every image is tiled,
also when a prompt holds several (LLaVA-OneVision tiles single images only).
Tensor names are R-4B's: model.language_model.*, model.vision_tower.vision_model.*,
model.multi_modal_projector.{pre_norm,linear_1,linear_2}.*, model.image_newline, lm_head.*.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers import AutoModel
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
    unpad_image,
)

from .configuration_r4b import RConfig

_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


class RMultiModalProjector(nn.Module):
    """LayerNorm(eps 1e-6) -> Linear -> exact GELU -> Linear (vLLM: pre_norm, linear_1, linear_2)."""

    def __init__(self, config: RConfig) -> None:
        super().__init__()
        vh, th = config.vision_config.hidden_size, config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(vh, eps=1e-6)
        self.linear_1 = nn.Linear(vh, th, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(th, th, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


class RPreTrainedModel(LlavaOnevisionPreTrainedModel):
    config_class = RConfig
    config: RConfig
    input_modalities = ("image", "text")


class RModel(RPreTrainedModel, LlavaOnevisionModel):
    """The `model.*` namespace: vision tower, projector, image_newline, Qwen3 decoder."""

    def __init__(self, config: RConfig) -> None:
        RPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower.post_layernorm = nn.Identity()  # unused: the projector's pre_norm sits there
        self.multi_modal_projector = RMultiModalProjector(config)
        std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def anyres(self) -> bool:
        return bool(self.config.image_grid_pinpoints) and self.config.vision_aspect_ratio.startswith("anyres")

    def _grid(self, image_size: list[int]) -> tuple[int, int]:
        """(rows, cols) of AnyRes tiles for an image of (height, width); (0, 0) for base-only."""
        if not self.anyres:
            return 0, 0
        s = self.config.vision_config.image_size
        h, w = select_best_resolution(image_size, self.config.image_grid_pinpoints)
        return h // s, w // s

    def _pack(self, feats: torch.Tensor, image_size: list[int], vision_aspect_ratio: str) -> torch.Tensor:
        """Packed features [n_tokens, hidden] of one image's projected views [V, P*P, hidden]."""
        base = feats[0]
        rows, cols = self._grid(image_size)
        if rows * cols == 0:
            return base
        p = self.config.vision_config.image_size // self.config.vision_config.patch_size
        fmap = feats[1:].view(rows, cols, p, p, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        fmap = unpad_image(fmap, image_size)
        m = _ANYRES_MAX.fullmatch(vision_aspect_ratio)
        if m:
            ch, cw = fmap.shape[1:]
            ratio = math.sqrt(ch * cw / (int(m.group(1)) * p * p))
            if ratio > 1.1:
                fmap = nn.functional.interpolate(fmap[None], [int(ch // ratio), int(cw // ratio)], mode="bilinear")[0]
        nl = self.image_newline[:, None, None].expand(*fmap.shape[:-1], 1).to(fmap.dtype)
        fmap = torch.cat((fmap, nl), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((base, fmap), dim=0)

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                           vision_feature_layer: int | None = None, vision_feature_select_strategy: str | None = None,
                           vision_aspect_ratio: str | None = None, batch_num_images: torch.Tensor | None = None,
                           **kwargs) -> BaseModelOutputWithPooling:
        """Vision tower output whose `pooler_output` is the list of packed features, one per image.
        pixel_values: [images, max views, 3, S, S] (zero-padded views are dropped) or [views, 3, S, S]."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        ratio = vision_aspect_ratio or self.config.vision_aspect_ratio
        sizes = [[int(x) for x in s] for s in image_sizes]
        n_views = [1 + r * c for r, c in (self._grid(s) for s in sizes)]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_views)], dim=0)
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(n_views):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 5 dims, or 4 dims "
                             f"with {sum(n_views)} views for image_sizes {sizes}")
        kwargs.pop("return_dict", None)
        kwargs.pop("output_hidden_states", None)
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        feats = self.multi_modal_projector(out.hidden_states[layer])
        out.pooler_output = [self._pack(f, s, ratio) for f, s in zip(torch.split(feats, n_views), sizes)]
        return out

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """Image placeholder mask [B, T, 1] (R-4B takes no video)."""
        if input_ids is None:
            tok = self.get_input_embeddings()(torch.tensor(self.config.image_token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == tok).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        if image_features is not None and int(mask.sum()) != image_features.shape[0]:
            raise ValueError(f"Image features and image tokens do not match: tokens {int(mask.sum())}, "
                             f"features {image_features.shape[0]}")
        return mask.unsqueeze(-1).to(inputs_embeds.device), None


class RForConditionalGeneration(RPreTrainedModel, LlavaOnevisionForConditionalGeneration):
    """R-4B with its LM head (untied unless `tie_word_embeddings`)."""

    def __init__(self, config: RConfig) -> None:
        RPreTrainedModel.__init__(self, config)
        self.model = RModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


__all__ = ["RForConditionalGeneration", "RModel", "RPreTrainedModel"]
