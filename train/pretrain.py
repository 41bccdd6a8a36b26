"""Stage 1: alignment / pre-training on world captions + perception questions, every
response a direct answer whose empty think block is loss-masked (non-thinking loss masking)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import ENDOFTEXT, IMAGE_PLACEHOLDER

from .data import read_jsonl
from .recipe import Recipe, model_config
from .sft import run_sft
from .stages import (begin_stage, chat_versions, encode_all, ensure_tokenizer, ensure_world, family_weights, focus_weights,
                     grounded, load_stage_model, load_tokenizer, pixel_cache, save_stage_model, stage_main)
from .world import GRADED, PERCEPTION


def stage1_records(recs: list[dict], r: Recipe) -> tuple[list[dict], np.ndarray]:
    """Stage 1's training list and sampling weights: captions, perception and the graded
    families' easy level (the hard level is never shown before annealing, so curation finds
    the model unable to answer it at a glance), single-turn at weight 1 - pt_chat_frac
    (colour-count x colour_count_weight) and their follow-up versions (`chat_versions`, not
    captions) at pt_chat_frac."""
    f = r.pt_chat_frac
    if not 0.0 <= f < 1.0:
        raise TrainingError(f"pt_chat_frac={f} must be in [0, 1)")
    single = [x for x in recs if x["meta"].get("tier") != "graded" or x["meta"].get("level") == "easy"]
    if f == 0:
        return single, family_weights(single, r)
    chats = chat_versions([x for x in single if x["meta"].get("family") != "caption"], r.seed, r.chat_three_frac)
    w = np.concatenate([(1 - f) * family_weights(single, r), f * family_weights(chats, r)])
    return single + chats, w / w.sum()


def replay_records(r: Recipe) -> tuple[list[dict], list[str]]:
    """Stage 0's text records of the reasoning families (scan as text, step trace), replayed in
    stage 1 at `pt_replay_frac` of its weight so the decoder keeps stage 0's arithmetic (which
    direct-answer-only batches wipe: docs/training.md)."""
    from .lm import text_records

    if not 0.0 <= r.pt_replay_frac < 1.0 or r.pt_replay_per_reasoning < 1:
        raise TrainingError(f"pt_replay_frac={r.pt_replay_frac} must be in [0, 1) and pt_replay_per_reasoning="
                            f"{r.pt_replay_per_reasoning} >= 1")
    return text_records(r.seed, r.pt_replay_per_reasoning, 0)


def run(run_dir: Path, r: Recipe) -> Path:
    """Stage 1 end to end; returns the stage's model folder (skips when already finished)."""
    dev, out, done = begin_stage(run_dir, r, "pretrain")
    if done:
        return out
    recs_path = ensure_world(run_dir, "pretrain", r.seed, {f: r.pt_per_family for f in ["caption"] + PERCEPTION + GRADED})
    ensure_tokenizer(run_dir, r)
    tok = load_tokenizer(run_dir)
    from r4b_edge.model.modeling import RForConditionalGeneration

    if r.lm_steps > 0:  # start from the stage-0 decoder
        model, cfg = load_stage_model(run_dir, "lm", dev)
    else:
        cfg = model_config(r, tok.get_vocab_size(), tok.token_to_id(IMAGE_PLACEHOLDER))
        torch.manual_seed(r.seed)
        model = RForConditionalGeneration(cfg).to(dev)
    recs, weights = stage1_records(read_jsonl(recs_path), r)
    data = encode_all(tok, recs, cfg, ["direct"] * len(recs), mask_empty_think=True)
    if r.pt_ground:
        data = grounded(tok, data, recs, cfg, r, response_slots=True)
    if r.pt_replay_frac != 0:  # stage 0's text reasoning records, encoded as stage 0 does
        trecs, tmodes = replay_records(r)
        data = data + encode_all(tok, trecs, cfg, tmodes)
        weights = np.concatenate([(1 - r.pt_replay_frac) * weights,
                                  np.full(len(trecs), r.pt_replay_frac / len(trecs))])
        recs = recs + trecs
    pad = tok.token_to_id(ENDOFTEXT)
    run_sft(run_dir / "pretrain", model, data, recs_path.parent, pixel_cache(cfg), pad,
            r, steps=r.pt_steps, batch=r.pt_batch, lr=r.pt_lr, salt=1, desc="pretrain", weights=weights)
    if r.pt_focus_steps > 0:  # second phase, resumable on its own (pretrain/focus/state.pt)
        run_sft(run_dir / "pretrain" / "focus", model, data, recs_path.parent, pixel_cache(cfg), pad, r,
                steps=r.pt_focus_steps, batch=r.pt_batch, lr=r.pt_focus_lr, salt=11, desc="pretrain focus",
                weights=focus_weights(recs, r.pt_focus_share))
    return save_stage_model(run_dir, "pretrain", model, cfg)


def main(argv: list[str] | None = None) -> int:
    """`train pretrain --run DIR [--preset shipped|micro] [--set k=v ...]` (torchrun-able)."""
    return stage_main("r4b-edge train pretrain", main.__doc__ or "", argv, run)
