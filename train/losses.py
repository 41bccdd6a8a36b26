"""The training forward and its losses: image features spliced into the token embeddings,
per-token log-probabilities of the targets (SFT, BPO/GRPO, rollouts, calibration) and the
summed SFT cross-entropy."""
from __future__ import annotations

from typing import Any

import torch

from r4b_edge.errors import TrainingError


def embed_inputs(model: Any, ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with every image token run of ids replaced by that image's base-view features."""
    emb = model.embed_tokens(ids)
    mask = ids == model.config.image_token_index
    n = int(mask.sum())
    if pixel_values is None or pixel_values.shape[0] == 0:
        if n:
            raise TrainingError(f"batch has {n} image tokens but no images")
        return emb
    feats = model.model.multi_modal_projector(model.vision_hidden_states(pixel_values.to(emb.device)))
    if feats.shape[0] * feats.shape[1] != n:
        raise TrainingError(f"batch has {n} image tokens but {feats.shape[0]} images x {feats.shape[1]} features")
    return emb.masked_scatter(mask[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))


def token_logprobs(model: Any, ids: torch.Tensor, att: torch.Tensor, pv: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[:, t+1] | ids[:, :t+1]) for every position: [B, T-1]; targets default to ids.

    Positions whose target is -100 get log-prob 0 (they are masked by the caller anyway)."""
    emb = embed_inputs(model, ids, pv)
    logits, _ = model.forward(emb, attention_mask=att, position_ids=position_ids, use_cache=False)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = (ids if targets is None else targets)[:, 1:]
    return lp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt >= 0)


def sft_loss_sum(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy of the labels (not the inputs) and the labelled count."""
    lab = batch["labels"]
    lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], targets=lab)
    m = lab[:, 1:] != -100
    return -(lp * m).sum(), int(m.sum())
