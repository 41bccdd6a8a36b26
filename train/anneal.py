"""Stage 2: bi-mode annealing. Curate by the paper's rule (N sampled no-think answers
from the current model: all wrong -> reasoning sample with trace, else direct), then SFT
on the mix (ratio direct:reasoning in the recipe)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import ENDOFTEXT

from .checks import PASS
from .data import read_jsonl, write_jsonl
from .dist import barrier, is_main, rank, world_size
from .metrics import Metrics
from .recipe import Recipe
from .rollout import Roller, items_from_records
from .sft import run_sft
from .stages import (begin_stage, chat_versions, encode_all, ensure_world, family_weights, grounded, load_stage_model,
                     load_tokenizer, pixel_cache, save_stage_model, stage_main)
from .world import GRADED, PERCEPTION, REASONING


def curate(model: Any, tok: Any, cfg: Any, recs: list[dict], root: Path, r: Recipe) -> list[dict]:
    """The paper's rule on every objective record; returns records with `mode` set. A sample is
    wrong when its `checks.check` score is below `checks.PASS`.

    Records without an answer (subjective) stay direct. Item k's sample j uses seed
    hash(seed, k, j), so the outcome does not depend on batching or the rank count."""
    model.eval()
    roller = Roller(model, tok, cfg, root, pixel_cache(cfg))
    items = items_from_records(recs)
    mine = list(range(rank(), len(items), world_size()))
    n = r.an_samples
    fails: dict[int, int] = {}
    chunk = max(n, 256 // n * n)
    bar = tqdm(total=len(mine), desc="curate", disable=not is_main(), mininterval=2.0)
    for c in range(0, len(mine), chunk // n):
        ks = [k for k in mine[c:c + chunk // n] if items[k]["answer"] is not None]
        seeds = [int(np.random.default_rng([r.seed, 7, k, j]).integers(2**62)) for k in ks for j in range(n)]
        ro = roller.run([items[k] for k in ks], "no-think", repeats=n, temperature=r.an_temperature,
                        seeds=seeds, max_new=8, chunk=chunk)
        for i, k in enumerate(ks):
            fails[k] = sum(1 for x in ro[i * n:(i + 1) * n] if x.reward < PASS)
        bar.update(len(mine[c:c + chunk // n]))
    bar.close()
    if dist.is_initialized():
        parts: list[Any] = [None] * world_size()
        dist.all_gather_object(parts, fails)
        fails = {k: v for p in parts for k, v in p.items()}
    out = []
    for k, rec in enumerate(recs):
        rec = dict(rec)
        all_fail = k in fails and fails[k] == n
        rec["mode"] = "think" if (all_fail and rec.get("trace")) else "direct"
        rec["meta"] = dict(rec["meta"], curation_failures=fails.get(k), curation_samples=n)
        out.append(rec)
    return out


def mix_weights(recs: list[dict], r: Recipe) -> tuple[list[dict], list[str], np.ndarray]:
    """Training list (records, modes) and sampling weights: direct:reasoning = ratio:1, plus a
    `an_perception_trace_frac` share of the direct side taught with its trace after a forced
    `<think>\n` (the decision token untrained: these items stay direct in auto mode);
    inside each group colour-count records weigh `colour_count_weight` and product-plus records
    `an_product_plus_weight` (its trace's last addition is the reasoning tier's weakest
    step); `an_chat_frac` of
    each group's weight goes to its records' follow-up versions (`stages.chat_versions`: asked
    second or third in a chat about the image)."""
    direct = [x for x in recs if x["mode"] == "direct"]
    reason = [x for x in recs if x["mode"] == "think"]
    traced = [x for x in direct if x.get("trace")]
    ratio, ptf = r.an_direct_to_reasoning, r.an_perception_trace_frac
    groups = [(direct, "direct", ratio / (1 + ratio) * (1 - ptf if traced else 1.0)),
              (reason, "think", 1 / (1 + ratio)), (traced, "forced-think", ratio / (1 + ratio) * ptf if traced else 0.0)]
    groups = [g for g in groups if g[0] and g[2] > 0]
    tot = sum(g[2] for g in groups)
    recs_out, modes, w = [], [], []
    f2 = r.an_chat_frac
    if not 0.0 <= f2 < 1.0:
        raise TrainingError(f"an_chat_frac={f2} must be in [0, 1)")
    if not r.an_product_plus_weight > 0:
        raise TrainingError(f"an_product_plus_weight={r.an_product_plus_weight} must be > 0")
    for lst, mode, share in groups:
        parts = [(lst, share * (1 - f2))] + ([(chat_versions(lst, r.seed, r.chat_three_frac), share * f2)] if f2 > 0 else [])
        for part, sh in parts:
            recs_out += part
            modes += [mode] * len(part)
            fw = family_weights(part, r)
            if r.an_product_plus_weight != 1.0:
                fw = fw * np.array([r.an_product_plus_weight if x.get("meta", {}).get("family") == "product-plus"
                                    else 1.0 for x in part])
                fw = fw / fw.sum()
            w += list(sh / tot * fw)
    wa = np.asarray(w, dtype=np.float64)
    return recs_out, modes, wa / wa.sum()


def run(run_dir: Path, r: Recipe) -> Path:
    """Stage 2 end to end (skips finished parts: curated.jsonl, then the model)."""
    dev, out, done = begin_stage(run_dir, r, "anneal")
    if done:
        return out
    stage = run_dir / "anneal"
    stage.mkdir(parents=True, exist_ok=True)
    counts = {f: r.an_pool_perception for f in PERCEPTION} | {f: r.an_pool_reasoning for f in REASONING} | \
        {f: r.an_pool_graded for f in GRADED}
    recs_path = ensure_world(run_dir, "anneal", r.seed + 1, counts)
    tok = load_tokenizer(run_dir)
    model, cfg = load_stage_model(run_dir, "pretrain", dev)
    cur_path = stage / "curated.jsonl"
    if not cur_path.exists():
        cur = curate(model, tok, cfg, read_jsonl(recs_path), recs_path.parent, r)
        if is_main():
            write_jsonl(cur_path, cur)
            stats: dict[str, dict[str, int]] = {}
            for x in cur:
                s = stats.setdefault(x["meta"]["family"], {"direct": 0, "think": 0})
                s[x["mode"]] += 1
            Metrics(stage / "metrics.jsonl").log(event="curation", samples=r.an_samples, families=stats)
            (stage / "curation.json").write_text(json.dumps(stats, indent=2))
        barrier()
    cur = read_jsonl(cur_path)
    recs, modes, w = mix_weights(cur, r)
    data = encode_all(tok, recs, cfg, modes, mask_empty_think=False)
    if r.an_ground:
        data = grounded(tok, data, recs, cfg, r, response_slots=False)
    torch.manual_seed(r.seed + 2)
    run_sft(stage, model, data, recs_path.parent, pixel_cache(cfg), tok.token_to_id(ENDOFTEXT), r,
            steps=r.an_steps, batch=r.an_batch, lr=r.an_lr, salt=2, desc="anneal", weights=w)
    return save_stage_model(run_dir, "anneal", model, cfg)


def main(argv: list[str] | None = None) -> int:
    """`train anneal --run DIR [--preset ...] [--set k=v ...]` (needs the pretrain stage; torchrun-able);
    `train anneal --model M --data FILE.jsonl --out RUN ...`: a user's model and data (finetune.py)."""
    from .finetune import main as user_main, wants_user_path

    if wants_user_path(argv):
        return user_main("anneal", argv)
    return stage_main("r4b-edge train anneal", main.__doc__ or "", argv, run)
