"""The run plumbing every training stage imports: world splits and the tokenizer of a run
folder, stage model folders (begin / load / save), record encoding with grounding labels and
family weights, and the stage CLI (`stage_main`). The stages themselves are lm.py, pretrain.py,
anneal.py, bpo.py."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import IM_START, IMAGE_PLACEHOLDER, THINK_OPEN
from r4b_edge.model.template import CHAT_TEMPLATE, Message, render_conversation

from .cli import add_run_flags
from .data import Encoded, PixelCache, encode_record
from .dist import barrier, is_main, setup_dist
from .recipe import Recipe, load_recipe, set_threads
from .tokenizer import train_tokenizer, save_tokenizer
from .world import FAMILIES, TEMPLATES, history_for, make_example, scan_text, write_world


def world_dir(run: Path, name: str) -> Path:
    """Folder of a generated world split."""
    return run / "data" / name


def ensure_world(run: Path, name: str, seed: int, counts: dict[str, int], split: str = "train") -> Path:
    """Rank 0 renders the split once (skipped when records.jsonl exists); returns records.jsonl."""
    d = world_dir(run, name)
    p = d / "records.jsonl"
    if is_main() and not p.exists():
        write_world(d, seed, counts, split)
    barrier()
    return p


def tokenizer_texts(seed: int, n: int = 300) -> list[str]:
    """World text for BPE training: templates, captions, traces, answers of every family."""
    heads = (render_conversation([Message("user", t, images=1)], None) for t in TEMPLATES.values())
    texts = ["".join(x for x, _ in pieces) for pieces in heads]
    for i in range(n):
        for fam in FAMILIES:
            scene, q = make_example(seed, 10_000_000 + i, fam)
            texts += [q.question, f"\n{q.trace}\n", f"\n\n{q.answer}", scan_text(scene)]
    return texts


def ensure_tokenizer(run: Path, r: Recipe) -> Path:
    """Train + save the run's tokenizer once (rank 0)."""
    d = run / "tokenizer"
    if is_main() and not (d / "tokenizer.json").exists():
        tok = train_tokenizer(tokenizer_texts(r.seed), vocab_size=r.vocab_size)
        save_tokenizer(tok, d, CHAT_TEMPLATE)
    barrier()
    return d


def load_tokenizer(run: Path) -> Any:
    """The run's tokenizers.Tokenizer."""
    from tokenizers import Tokenizer

    p = run / "tokenizer" / "tokenizer.json"
    if not p.exists():
        raise TrainingError(f"{p} missing: run the pretrain stage first")
    return Tokenizer.from_file(str(p))


def stage_model_dir(run: Path, stage: str) -> Path:
    """Final R-4B folder of a stage."""
    return run / stage / "model"


def begin_stage(run: Path, r: Recipe, stage: str) -> tuple[torch.device, Path, bool]:
    """Every stage's start: join the process group, apply the recipe's threads; returns
    (device, the stage's model folder, whether that folder is already finished)."""
    _, _, dev = setup_dist()
    set_threads(r)
    out = stage_model_dir(run, stage)
    return dev, out, (out / "config.json").exists()


def load_stage_model(run: Path, stage: str, device: torch.device) -> tuple[Any, Any]:
    """(model fp32 train mode, config) from a finished stage."""
    from r4b_edge.model.checkpoint import load_checkpoint

    d = stage_model_dir(run, stage)
    if not (d / "config.json").exists():
        raise TrainingError(f"stage {stage!r} has no finished model at {d}; run it first")
    model, cfg, _ = load_checkpoint(d, device=device, dtype=torch.float32)
    return model, cfg


def save_stage_model(run: Path, stage: str, model: Any, cfg: Any) -> Path:
    """Rank 0 writes the stage's R-4B folder (fp32 for the chain) atomically."""
    from r4b_edge.model.checkpoint import save_checkpoint

    d = stage_model_dir(run, stage)
    if is_main():
        save_checkpoint(model, cfg, run / "tokenizer", d)
    barrier()
    return d


def encode_all(tok: Any, recs: Sequence[dict], cfg: Any, modes: Sequence[str | None] | None = None,
               mask_empty_think: bool = False) -> list[Encoded]:
    """Tokenise records in the training format."""
    ms = modes or [None] * len(recs)
    return [encode_record(tok, rec, cfg.image_token_index, cfg.tokens_per_view, m, mask_empty_think)
            for rec, m in zip(recs, ms)]


POSITION_WORDS = ("top-left", "top-right", "bottom-left", "bottom-right")


def add_grounding_labels(tok: Any, e: Encoded, rec: dict, cfg: Any, response_slots: bool = True,
                         colour_anchor: bool = False, colour_match: bool = False) -> Encoded:
    """Auxiliary targets in label slots the model never predicts at inference (docs/training.md).

    - after image token j: the first token of the value (digit or shape) of the cell patch j
      lies in, except that when a cell spans several patches its bottom-right patch carries
      the cell's colour instead; in the slots of the 4 tokens that follow the image's newline:
      the colours of cells 0..3 (dense vision grounding);
    - perception questions only: every prompt slot from the question's position word on (with
      `colour_anchor`, also from a colour-count question's colour word; else from `?`) up to the
      assistant header: the answer's first token, so the answer is carried forward one position
      at a time instead of by a long learned jump;
    - with `colour_match`, a colour-count question's colour word and the 3 tokens after it
      predict `1` or `0`: whether cell 0..3 has that colour, so the count at `?` sums four
      bits at fixed positions instead of matching content (docs/training.md);
    - with `response_slots`, also the loss-masked empty think block of a direct answer
      (stage 1 only; annealing trains those slots on the real template)."""
    scene = rec.get("meta", {}).get("scene")
    if not scene:
        return e
    cells = [c.split(":") for c in scene.split("|")]
    P = cfg.image_size // cfg.patch_size
    per = max(1, P // 2)  # patch rows per cell
    img = cfg.image_token_index
    pos = [i for i, t in enumerate(e.ids) if t == img]
    for j, p in enumerate(pos[:P * P]):
        r, c = divmod(j, P)
        k = (r // per) * 2 + (c // per)
        corner = per > 1 and r % per == per - 1 and c % per == per - 1
        what = " " + cells[k][2] if corner else cells[k][1]
        if p + 1 < len(e.labels):
            e.labels[p + 1] = tok.encode(what, add_special_tokens=False).ids[0]
    if pos:  # the slots of the 4 tokens after the image's newline: the colours of cells 0..3
        q0 = pos[-1] + 2
        for k in range(4):
            if q0 + k + 1 < len(e.labels) and e.labels[q0 + k + 1] == -100:
                e.labels[q0 + k + 1] = tok.encode(" " + cells[k][2], add_special_tokens=False).ids[0]
    fam, ans, meta = rec["meta"].get("family"), rec.get("answer"), rec["meta"]
    if not carries_answer(rec):
        return e  # the answer carry is for questions read at a glance (perception, a graded easy item)
    a0 = tok.encode(ans, add_special_tokens=False).ids[0]
    think = tok.token_to_id(THINK_OPEN)
    if think not in e.ids:
        return e
    t = len(e.ids) - 1 - e.ids[::-1].index(think)  # the last turn's <think>
    heads = [i for i in range(t) if e.ids[i] == tok.token_to_id(IM_START)]
    lo = heads[-2] if len(heads) >= 2 else 0  # the last user turn (earlier turns are history)
    start = None
    pw = meta.get("pos") or (meta.get("colour") if colour_anchor else None)
    if pw:
        w = tok.encode(" " + pw, add_special_tokens=False).ids
        start = next((i + len(w) for i in range(lo, t - len(w)) if e.ids[i:i + len(w)] == w), None)
    if colour_match and fam == "colour-count":
        w = tok.encode(" " + rec["meta"]["colour"], add_special_tokens=False).ids
        c = next((i for i in range(lo, t - len(w)) if e.ids[i:i + len(w)] == w), None)
        if c is not None:
            c += len(w) - 1
            bits = [tok.encode("1" if cell[2] == rec["meta"]["colour"] else "0", add_special_tokens=False).ids[0]
                    for cell in cells]
            for k, b in enumerate(bits):
                if c + k + 1 < t:  # replaces the dense colour targets on these slots
                    e.labels[c + k + 1] = b
    if start is None:
        qm = [i for i in range(lo, t) if tok.decode([e.ids[i]]).endswith("?")]
        start = qm[-1] + 1 if qm else t
    end = t + 1
    if response_slots:
        while end < len(e.labels) and e.labels[end] == -100:
            end += 1
    for i in range(start, end):
        if e.labels[i] == -100:
            e.labels[i] = a0
    return e


def carries_answer(rec: dict) -> bool:
    """Whether the grounding carries the answer through the prompt: perception questions and the
    easy level of a graded family (one glance), never captions, reasoning or a graded hard item."""
    meta = rec.get("meta", {})
    if not rec.get("answer") or meta.get("family") == "caption":
        return False
    return meta.get("tier") == "perception" or (meta.get("tier") == "graded" and meta.get("level") == "easy")


#: World seed salt of the earlier questions of training chats (the eval uses its own).
CHAT_SALT = 53


def follow_up(rec: dict, seed: int, n_prev: int) -> dict:
    """`rec` asked as question n_prev + 1 of a chat about its image: `n_prev` earlier questions
    about the same scene, from every family it suits (`world.history_for`, seeded by the record
    id), each with its answer behind an empty think block as the runtime renders history; the
    image goes with the first question. Only the last turn is trained (`meta.turn`)."""
    hist = history_for(rec["meta"]["scene"], seed, CHAT_SALT, rec["id"], n_prev)
    user = rec["messages"][0]["content"].split("\n", 1)[-1]
    msgs: list[dict] = []
    for k, q in enumerate(hist):
        head = f"{IMAGE_PLACEHOLDER}\n" if k == 0 else ""
        msgs += [{"role": "user", "content": head + q.question}, {"role": "assistant", "content": q.answer}]
    msgs += [{"role": "user", "content": user if hist else rec["messages"][0]["content"]}, rec["messages"][1]]
    return dict(rec, id=f"{rec['id']}-turn{n_prev + 1}", messages=msgs,
                meta=dict(rec["meta"], turn=n_prev + 1, history=[q.family for q in hist]))


def chat_versions(recs: Sequence[dict], seed: int, three_frac: float) -> list[dict]:
    """Each record as a follow-up: the second question of a chat, or (for the share `three_frac`,
    chosen by record position so it is layout-free) the third."""
    if not 0.0 <= three_frac <= 1.0:
        raise TrainingError(f"chat_three_frac={three_frac} must be in [0, 1]")
    out = []
    for k, rec in enumerate(recs):
        third = (k * 0.6180339887) % 1.0 < three_frac
        out.append(follow_up(rec, seed, 2 if third else 1))
    return out


def family_weights(recs: Sequence[dict], r: Recipe) -> np.ndarray:
    """Sampling weights over records: colour-count records weigh `colour_count_weight`, the rest 1."""
    w = np.array([r.colour_count_weight if rec.get("meta", {}).get("family") == "colour-count" else 1.0
                  for rec in recs], dtype=np.float64)
    if w.sum() <= 0:
        raise TrainingError(f"colour_count_weight={r.colour_count_weight} leaves no record to sample")
    return w / w.sum()


def focus_weights(recs: Sequence[dict], share: float) -> np.ndarray:
    """Sampling weights giving colour-count records `share` of the batch, the rest uniform."""
    cc = np.array([rec.get("meta", {}).get("family") == "colour-count" for rec in recs])
    if not 0.0 < share < 1.0 or cc.all() or not cc.any():
        raise TrainingError(f"pt_focus_share={share} needs 0 < share < 1 and both colour-count and other records "
                            f"(have {int(cc.sum())} colour-count of {len(recs)})")
    w = np.where(cc, share / cc.sum(), (1.0 - share) / (~cc).sum())
    return w / w.sum()


def grounded(tok: Any, data: list[Encoded], recs: Sequence[dict], cfg: Any, r: Recipe,
             response_slots: bool) -> list[Encoded]:
    """`add_grounding_labels` with the recipe's colour options on every record."""
    return [add_grounding_labels(tok, e, rec, cfg, response_slots=response_slots,
                                 colour_anchor=bool(r.ground_colour_anchor), colour_match=bool(r.ground_colour_match))
            for e, rec in zip(data, recs)]


def pixel_cache(cfg: Any) -> PixelCache:
    """Pixel loader matching the model's preprocessing."""
    return PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std)


def stage_args(prog: str, doc: str) -> argparse.ArgumentParser:
    """Common stage flags: --run, --preset, --set key=value."""
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    add_run_flags(ap)
    return ap


def stage_main(prog: str, doc: str, argv: list[str] | None, run_fn: Callable[[Path, Recipe], Path]) -> int:
    """The body of every stage CLI: parse the common flags, join the process group,
    load the run's recipe, run the stage, print its output folder on rank 0."""
    a = stage_args(prog, doc).parse_args(argv)
    setup_dist()
    run_dir = Path(a.run)
    out = run_fn(run_dir, load_recipe(run_dir, a.preset, a.set))
    if is_main():
        print(out)
    return 0
