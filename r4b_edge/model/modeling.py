"""RForConditionalGeneration (torch): SigLIP vision tower + LayerNorm/MLP projector + Qwen3 decoder.

Built from transformers components (SiglipVisionModel, Qwen3Model); module paths give exactly
R-4B's tensor names:
  model.language_model.*, model.vision_tower.vision_model.*,
  model.multi_modal_projector.{pre_norm,linear_1,linear_2}.*, model.image_newline, lm_head.weight
The tower's `post_layernorm` (unused: the projector's `pre_norm` sits there) and pooling `head`
are not built, so they are not in the state dict; checkpoint.py ignores them when a file has them.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3Model, SiglipVisionConfig, SiglipVisionModel
from transformers.cache_utils import DynamicCache

from ..errors import BackendUnavailableError, ContextLengthError, ImageError, ModelFormatError
from .config import RConfig
from .processing import check_grid, grid_layout

if TYPE_CHECKING:  # pragma: no cover
    from .processing import PreparedImage

# Keys of a text/vision config dict that are not constructor fields of the HF configs.
_DROP_KEYS = {"architectures", "transformers_version", "_name_or_path"}


def qwen3_config(cfg: RConfig) -> Qwen3Config:
    """The transformers Qwen3Config of `cfg.text_config` (accepts rope_theta or rope_parameters)."""
    d = {k: v for k, v in cfg.text_config.items() if k not in _DROP_KEYS and k != "model_type"}
    if "rope_parameters" not in d and "rope_theta" in d:
        d["rope_parameters"] = {"rope_theta": float(d.pop("rope_theta")), "rope_type": "default"}
    d.pop("rope_theta", None)
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    c = Qwen3Config(**d)
    return c


def siglip_config(cfg: RConfig) -> SiglipVisionConfig:
    """The transformers SiglipVisionConfig of `cfg.vision_config` (v1 classes, no pooling head)."""
    d = {k: v for k, v in cfg.vision_config.items()
         if k not in _DROP_KEYS and k not in ("model_type", "image_mean", "image_std")}
    d["vision_use_head"] = False
    return SiglipVisionConfig(**d)


def truncate_cache(cache: DynamicCache, n_past: int) -> None:
    """Drop cache positions >= n_past in place (transformers 5 `crop` takes a negative count)."""
    have = cache.get_seq_length()
    if not 0 <= n_past <= have:
        raise ValueError(f"cannot truncate a cache of {have} positions to {n_past}")
    if n_past == 0:
        cache.reset()
    elif n_past < have:
        cache.crop(n_past - have)


class RProjector(nn.Module):
    """LayerNorm(vision, eps 1e-6) -> Linear -> exact (erf) GELU -> Linear, biases on."""

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(vision_hidden, eps=1e-6)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(x))))


class _VisionTower(nn.Module):
    """Holds the SigLIP model as `.vision_model` (the pre-transformers-5 name R-4B files use)."""

    def __init__(self, vcfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(vcfg)
        self.vision_model.post_layernorm = nn.Identity()

    def forward(self, pixel_values: torch.Tensor, **kw: Any) -> Any:
        return self.vision_model(pixel_values=pixel_values, **kw)


class _RModel(nn.Module):
    """The `model.*` namespace of R-4B."""

    def __init__(self, config: RConfig) -> None:
        super().__init__()
        vcfg, tcfg = siglip_config(config), qwen3_config(config)
        self.vision_tower = _VisionTower(vcfg)
        self.multi_modal_projector = RProjector(vcfg.hidden_size, tcfg.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(tcfg.hidden_size) / math.sqrt(tcfg.hidden_size))
        self.language_model = Qwen3Model(tcfg)


def check_transformers() -> None:
    """The decoder cache is passed as `cache=` (transformers >= 5.24); older 5.x name it
    `past_key_values` and would fail deep inside generation, so fail here with the fix."""
    import inspect

    import transformers

    if "cache" not in inspect.signature(Qwen3Model.forward).parameters:
        raise BackendUnavailableError(
            f"transformers {transformers.__version__} names the decoder cache `past_key_values`; the torch path "
            "needs transformers 5.24 (the pinned version): pip install 'transformers==5.24.0'")


class RForConditionalGeneration(nn.Module):
    """R-4B: `image_features`, `embed_tokens`, `forward` (see docs/design.md)."""

    def __init__(self, config: RConfig, init_weights: bool = True) -> None:
        """Build the model; `init_weights=False` skips random init (weights are loaded next)."""
        check_transformers()
        super().__init__()
        self.config = config
        ctx: Any = contextlib.nullcontext()
        if not init_weights:
            from transformers.initialization import no_init_weights

            ctx = no_init_weights()
        with ctx:
            self.model = _RModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.text_hf_config = self.model.language_model.config

    # ---- properties ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        seen: set[int] = set()
        n = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    # ---- vision ----------------------------------------------------------------------------
    def vision_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower hidden state of `vision_feature_layer` for all patches: [V, P*P, Dv]."""
        out = self.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.config.vision_feature_layer]

    def image_features(self, pixel_values: torch.Tensor | np.ndarray, grid: Sequence[int],
                       orig_size: Sequence[int]) -> torch.Tensor:
        """Projected, packed image features [n_tokens, hidden]: base view, then the AnyRes tile
        feature map unpadded to the image's aspect with `image_newline` after every row, computed
        from `grid` (the one the image was prepared with: a budget may choose a smaller one than
        the full pinpoint list; (0, 0) is the base view alone)."""
        pv = torch.as_tensor(pixel_values).to(device=self.device, dtype=self.dtype)
        S = self.config.image_size
        if pv.ndim != 4 or tuple(pv.shape[1:]) != (3, S, S):
            raise ImageError(f"pixel_values must be [views, 3, {S}, {S}] (got {tuple(pv.shape)})")
        rows, cols = check_grid(grid)
        if pv.shape[0] != 1 + rows * cols:
            raise ImageError(f"pixel_values has {pv.shape[0]} views; grid {rows}x{cols} needs {1 + rows * cols}")
        feats = self.model.multi_modal_projector(self.vision_hidden_states(pv))  # [V, P*P, H]
        return self.pack_image_features(feats, (rows, cols), orig_size)

    def pack_image_features(self, feats: torch.Tensor, grid: Sequence[int], orig_size: Sequence[int]) -> torch.Tensor:
        """One image's projected views [V, P*P, H] -> its packed features [n_tokens, H] (base view,
        then the unpadded tile map with `image_newline` after every row); `image_features` without
        the towers, so training can run every image's views through the tower in one call."""
        P = self.config.image_size // self.config.patch_size
        rows, cols = check_grid(grid)
        base = feats[0]
        if rows * cols == 0:
            return base
        H = feats.shape[-1]
        fmap = feats[1:].view(rows, cols, P, P, H).permute(4, 0, 2, 1, 3).reshape(H, rows * P, cols * P)
        lay = grid_layout((int(orig_size[0]), int(orig_size[1])), self.config, (rows, cols))
        uh, uw = lay["unpadded"]
        top, left = (rows * P - uh) // 2, (cols * P - uw) // 2
        fmap = fmap[:, top:top + uh, left:left + uw]
        if tuple(lay["feature"]) != (uh, uw):  # anyres_max_N downsampling
            fmap = nn.functional.interpolate(fmap[None], list(lay["feature"]), mode="bilinear")[0]
        fh = fmap.shape[1]
        nl = self.model.image_newline.to(fmap.dtype)[:, None, None].expand(H, fh, 1)
        fmap = torch.cat([fmap, nl], dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat([base, fmap], dim=0)

    # ---- text ------------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, hidden] of ids [B, T]."""
        return self.model.language_model.embed_tokens(ids.to(self.device))

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for `forward`."""
        return DynamicCache(config=self.text_hf_config)

    def forward(self, inputs_embeds: torch.Tensor, past_key_values: DynamicCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                use_cache: bool = True, logits: str = "all") -> tuple[torch.Tensor | None, DynamicCache | None]:
        """Decoder + LM head: (logits [B, T, V], cache). The cache is updated in place.
        `logits`: "all" positions, only the "last" ([B, 1, V]: a prefill needs no more), or
        "none" (None: a prefill chunk before the last; the LM head is not run)."""
        n_past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = n_past + inputs_embeds.shape[1]
        if total > self.config.max_position_embeddings:
            raise ContextLengthError(f"sequence of {total} positions exceeds the model's context of "
                                     f"{self.config.max_position_embeddings}")
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        out = self.model.language_model(
            inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask,
            position_ids=position_ids, cache=past_key_values if use_cache else None, use_cache=use_cache,
        )
        cache = out.cache if use_cache else None
        if logits == "none":
            return None, cache
        hidden = out.last_hidden_state if logits == "all" else out.last_hidden_state[:, -1:]
        return self.lm_head(hidden), cache

    def forward_with_images(self, input_ids: torch.Tensor, images: Sequence["PreparedImage"],
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of ids [B, T] whose `image_token_index` placeholders are replaced, in
        order, by the features of `images` (no cache; used by training and as an oracle)."""
        ids = input_ids.to(self.device)
        if ids.ndim == 1:
            ids = ids[None]
        embeds = self.embed_tokens(ids)
        mask = ids == self.config.image_token_index
        n_slots = int(mask.sum())
        n_feats = sum(int(im.n_tokens) for im in images)
        if n_slots != n_feats:
            raise ImageError(f"input has {n_slots} image placeholder tokens but the {len(images)} image(s) "
                             f"need {n_feats}")
        if images:
            feats = torch.cat([self.image_features(im.pixel_values, im.grid, im.orig_size) for im in images])
            if feats.shape[0] != n_feats:
                raise ModelFormatError(f"image features have {feats.shape[0]} rows; processing said {n_feats}")
            embeds = embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))
        logits, _ = self.forward(embeds, attention_mask=attention_mask, use_cache=False)
        return logits
