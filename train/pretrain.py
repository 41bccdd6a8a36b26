"""Stage 1: alignment / pre-training on world captions + perception questions, every
response a direct answer whose empty think block is loss-masked (non-thinking loss masking)."""
from __future__ import annotations

from pathlib import Path

import torch

from r4b_edge.world import PERCEPTION

from .common import Recipe, model_config
from .data import read_jsonl
from .sft import run_sft
from .stages import (begin_stage, encode_all, ensure_tokenizer, ensure_world, family_weights, focus_weights, grounded,
                     load_stage_model, load_tokenizer, pixel_cache, save_stage_model, stage_main)


def run(run_dir: Path, r: Recipe) -> Path:
    """Stage 1 end to end; returns the stage's model folder (skips when already finished)."""
    dev, out, done = begin_stage(run_dir, r, "pretrain")
    if done:
        return out
    recs_path = ensure_world(run_dir, "pretrain", r.seed, {f: r.pt_per_family for f in ["caption"] + PERCEPTION})
    ensure_tokenizer(run_dir, r)
    tok = load_tokenizer(run_dir)
    from r4b_edge.model.modeling import RForConditionalGeneration

    if r.lm_steps > 0:  # start from the stage-0 decoder
        model, cfg = load_stage_model(run_dir, "lm", dev)
    else:
        cfg = model_config(r, tok.get_vocab_size(), tok.token_to_id("<image>"))
        torch.manual_seed(r.seed)
        model = RForConditionalGeneration(cfg).to(dev)
    recs = read_jsonl(recs_path)
    data = encode_all(tok, recs, cfg, ["direct"] * len(recs), mask_empty_think=True)
    if r.pt_ground:
        data = grounded(tok, data, recs, cfg, r, response_slots=True)
    pad = tok.token_to_id("<|endoftext|>")
    run_sft(run_dir / "pretrain", model, data, recs_path.parent, pixel_cache(cfg), pad,
            r, steps=r.pt_steps, batch=r.pt_batch, lr=r.pt_lr, salt=1, desc="pretrain", weights=family_weights(recs, r))
    if r.pt_focus_steps > 0:  # second phase, resumable on its own (pretrain/focus/state.pt)
        run_sft(run_dir / "pretrain" / "focus", model, data, recs_path.parent, pixel_cache(cfg), pad, r,
                steps=r.pt_focus_steps, batch=r.pt_batch, lr=r.pt_focus_lr, salt=11, desc="pretrain focus",
                weights=focus_weights(recs, r.pt_focus_share))
    return save_stage_model(run_dir, "pretrain", model, cfg)


def main(argv: list[str] | None = None) -> int:
    """`train pretrain --run DIR [--preset shipped|micro] [--set k=v ...]` (torchrun-able)."""
    return stage_main("r4b-edge train pretrain", main.__doc__ or "", argv, run)
