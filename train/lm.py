"""Stage 0: the language model's own pre-training on world text (no images).

R-4B starts from a pre-trained Qwen3 that already reads, copies and adds; the small model
starts from nothing. This stage gives its decoder that text skill first: the scene readout
is written into the user turn as text (instead of an image), reasoning questions are answered
with their step trace and perception questions directly (optionally a share of them with
their trace: `lm_perception_think_frac`), items drawn fresh from the world's
own generator (no rendering). The vision tower and projector stay at their initial weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r4b_edge.model.reply import ENDOFTEXT, IMAGE_PLACEHOLDER

from .data import PixelCache, make_record
from .recipe import Recipe, model_config
from .sft import run_sft
from .stages import begin_stage, encode_all, ensure_tokenizer, load_tokenizer, save_stage_model, stage_main
from .world import GRADED, PERCEPTION, REASONING, make_example, scan_text

#: Example indices for this stage start here, away from the other stages' pools.
INDEX_BASE = 20_000_000


def text_records(seed: int, per_reasoning: int, per_perception: int,
                 perception_think_frac: float = 0.0, per_graded: int = 0) -> tuple[list[dict], list[str]]:
    """(records, modes): the scan as text in the prompt; reasoning and graded (every level) ->
    think, perception -> direct, except the first `perception_think_frac` of each perception
    family's items -> think."""
    recs, modes = [], []
    n_think = round(per_perception * perception_think_frac)
    for fam in REASONING + PERCEPTION + GRADED:
        n = per_perception if fam in PERCEPTION else per_graded if fam in GRADED else per_reasoning
        for k, i in enumerate(range(INDEX_BASE, INDEX_BASE + n)):
            scene, q = make_example(seed, i, fam)
            recs.append(make_record(f"lm-{fam}-{i}", None, f"{scan_text(scene)}\n{q.question}", q.answer,
                                    q.trace, {"tier": q.tier, "family": fam}))
            modes.append("direct" if fam in PERCEPTION and k >= n_think else "think")
    return recs, modes


def run(run_dir: Path, r: Recipe) -> Path:
    """Stage 0 end to end; returns its model folder (skips when finished, resumes from state.pt)."""
    dev, out, done = begin_stage(run_dir, r, "lm")
    if r.lm_steps <= 0 or done:  # skipped, or finished
        return out
    ensure_tokenizer(run_dir, r)
    tok = load_tokenizer(run_dir)
    from r4b_edge.model.modeling import RForConditionalGeneration

    cfg = model_config(r, tok.get_vocab_size(), tok.token_to_id(IMAGE_PLACEHOLDER))
    torch.manual_seed(r.seed)
    model: Any = RForConditionalGeneration(cfg).to(dev)
    recs, modes = text_records(r.seed, r.lm_per_reasoning, r.lm_per_perception, r.lm_perception_think_frac,
                               r.lm_per_graded)
    data = encode_all(tok, recs, cfg, modes)
    run_sft(run_dir / "lm", model, data, run_dir, PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std),
            tok.token_to_id(ENDOFTEXT), r, steps=r.lm_steps, batch=r.lm_batch, lr=r.lm_lr, salt=0, desc="lm")
    return save_stage_model(run_dir, "lm", model, cfg)


def main(argv: list[str] | None = None) -> int:
    """`train lm --run DIR [--preset shipped|micro] [--set k=v ...]` (torchrun-able)."""
    return stage_main("r4b-edge train lm", main.__doc__ or "", argv, run)
