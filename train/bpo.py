"""Stage 3: BPO (bi-mode policy optimisation) and the plain-GRPO baseline.

BPO: per prompt g rollouts forced into thinking (`<think>\\n`) and g forced into
non-thinking (`<think>\\n\\n</think>\\n\\n`); rule reward; advantages normalised over the
merged 2g group; clipped objective; beta * KL (k3) to the frozen annealed reference.
The forced mode tokens are scored with the response, so the merged-group advantage
also teaches the auto-mode decision. GRPO: 2g rollouts from the auto prompt (free choice)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import ENDOFTEXT, THINK_OPEN

from .data import read_jsonl
from .dist import all_reduce_grads, all_sum, barrier, is_main, shard
from .losses import token_logprobs
from .metrics import Metrics
from .recipe import Recipe, lr_at
from .rollout import Roller, Rollout, items_from_records
from .sft import make_optimizer
from .stages import (begin_stage, ensure_world, load_stage_model, load_tokenizer, pixel_cache, save_stage_model,
                       stage_main)
from .state import load_state, save_state
from .world import GRADED, PERCEPTION, REASONING, TIERS


def step_prompts(r: Recipe, step: int, pool: Sequence[dict]) -> list[int]:
    """The global prompt set of `step`: rl_reasoning_frac reasoning or graded, the rest perception."""
    rng = np.random.default_rng([r.seed, 31, step])
    reason = [i for i, it in enumerate(pool) if it["tier"] != "perception"]
    percep = [i for i, it in enumerate(pool) if it["tier"] == "perception"]
    n_r = int(round(r.rl_prompts * r.rl_reasoning_frac))
    return [int(x) for x in rng.choice(reason, n_r, replace=False)] + \
           [int(x) for x in rng.choice(percep, r.rl_prompts - n_r, replace=False)]


def rollouts_for(roller: Roller, r: Recipe, algo: str, step: int, pool: Sequence[dict], pids: Sequence[int]) -> list[list[Rollout]]:
    """Per prompt, its 2g rollouts (BPO: g think + g no-think; GRPO: 2g auto)."""
    g = r.rl_group
    groups: list[list[Rollout]] = [[] for _ in pids]
    plan = [("think", 0), ("no-think", g)] if algo == "bpo" else [("auto", 0)]
    reps = g if algo == "bpo" else 2 * g
    for mode, off in plan:
        seeds = [int(np.random.default_rng([r.seed, 41, step, p, off + j]).integers(2**62))
                 for p in pids for j in range(reps)]
        ro = roller.run([pool[p] for p in pids], mode, repeats=reps, temperature=r.rl_temperature, seeds=seeds,
                        max_new=r.rl_max_new, chunk=256)
        for k, x in enumerate(ro):
            groups[k // reps].append(x)
    return groups


def build_batch(tok: Any, rolls: Sequence[Rollout], pad_id: int, think_id: int) -> dict:
    """Right-padded prompt+response ids and the mask of scored positions (shifted, [B, T-1]).

    Scored: forced mode tokens after `<think>` plus every generated token."""
    seqs, starts = [], []
    for x in rolls:
        p = list(x.prompt)
        cut = len(p) - 1 - p[::-1].index(think_id)  # the <think> the suffix begins with
        seqs.append(p + list(x.tokens))
        starts.append(cut + 1)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    mask = torch.zeros((len(seqs), T - 1), dtype=torch.float32)
    for b, (s, st) in enumerate(zip(seqs, starts)):
        ids[b, :len(s)] = torch.tensor(s)
        att[b, :len(s)] = 1
        mask[b, st - 1:len(s) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": att, "mask": mask}


def group_advantages(groups: Sequence[Sequence[Rollout]]) -> list[float]:
    """(R - mean) / (std + 1e-4) over each prompt's merged group, flattened."""
    adv = []
    for grp in groups:
        rw = np.array([x.reward for x in grp], dtype=np.float64)
        adv += list((rw - rw.mean()) / (rw.std() + 1e-4))
    return adv


def run(run_dir: Path, r: Recipe, algo: str = "bpo") -> Path:
    """Stage 3 (`algo` 'bpo' or 'grpo') from the annealed model; skips when finished."""
    if algo not in ("bpo", "grpo"):
        raise TrainingError(f"algo must be 'bpo' or 'grpo', got {algo!r}")
    dev, out, done = begin_stage(run_dir, r, algo)
    if done:
        return out
    stage = run_dir / algo
    stage.mkdir(parents=True, exist_ok=True)
    counts = {f: 400 for f in PERCEPTION + REASONING + GRADED}
    recs_path = ensure_world(run_dir, "rl", r.seed + 2, counts)
    pool = items_from_records(read_jsonl(recs_path))
    tok = load_tokenizer(run_dir)
    model, cfg = load_stage_model(run_dir, "anneal", dev)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    pixels = pixel_cache(cfg)
    roller = Roller(model, tok, cfg, recs_path.parent, pixels)
    pad_id, think_id = tok.token_to_id(ENDOFTEXT), tok.token_to_id(THINK_OPEN)
    # eps 1e-6: many RL gradients are ~0 (all-equal groups); a tiny eps would turn float noise
    # into full-size Adam steps (and break N-process == 1-process agreement)
    opt = make_optimizer(model, r.rl_lr, eps=1e-6)
    start, _ = load_state(stage / "state.pt", model, opt)
    metrics = Metrics(stage / "metrics.jsonl")
    if start:
        metrics.log(event="resume", step=start)
    bar = tqdm(total=r.rl_steps, initial=start, desc=algo, disable=not is_main(), mininterval=2.0)
    for step in range(start, r.rl_steps):
        pids_all = step_prompts(r, step, pool)
        pids = shard(pids_all)
        model.eval()
        groups = rollouts_for(roller, r, algo, step, pool, pids)
        rolls = [x for gp in groups for x in gp]
        adv = torch.tensor(group_advantages(groups), dtype=torch.float32)
        b = build_batch(tok, rolls, pad_id, think_id)
        pv = torch.from_numpy(np.stack([pixels.get(recs_path.parent / pool[pids[x.item]]["image"]) for x in rolls]))
        n_tok = all_sum(torch.tensor([float(b["mask"].sum())]))[0].item()
        model.train()
        stats = torch.zeros(4)  # loss, kl, clipped, tokens
        with torch.no_grad():
            ref_lp = torch.cat([token_logprobs(ref, b["input_ids"][c:c + r.micro_batch], b["attention_mask"][c:c + r.micro_batch],
                                               pv[c:c + r.micro_batch]) for c in range(0, len(rolls), r.micro_batch)])
            old_lp = torch.cat([token_logprobs(model, b["input_ids"][c:c + r.micro_batch], b["attention_mask"][c:c + r.micro_batch],
                                               pv[c:c + r.micro_batch]) for c in range(0, len(rolls), r.micro_batch)])
        for _ in range(r.rl_ppo_epochs):
            for c in range(0, len(rolls), r.micro_batch):
                sl = slice(c, c + r.micro_batch)
                lp = token_logprobs(model, b["input_ids"][sl], b["attention_mask"][sl], pv[sl])
                m, a = b["mask"][sl], adv[sl][:, None]
                ratio = torch.exp(lp - old_lp[sl])
                pg = -torch.minimum(ratio * a, ratio.clamp(1 - r.rl_clip, 1 + r.rl_clip) * a)
                d = ref_lp[sl] - lp
                kl = torch.exp(d) - d - 1
                loss = ((pg + r.rl_beta * kl) * m).sum() / max(1.0, n_tok)
                loss.backward()
                with torch.no_grad():
                    stats += torch.tensor([float(loss) * n_tok, float((kl * m).sum()),
                                           float((((ratio - 1).abs() > r.rl_clip).float() * m).sum()), float(m.sum())])
            all_reduce_grads(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step, r.rl_steps, r.rl_lr, warmup=max(1, r.rl_steps // 10))
            opt.step()
            opt.zero_grad(set_to_none=True)
        # metrics: reward and think-rate per tier and mode, summed over ranks
        keys = [(t, md) for t in TIERS for md in ("think", "no-think", "auto")]
        acc = torch.zeros(len(keys), 3)  # n, reward, thought
        for x in rolls:
            k = keys.index((pool[pids[x.item]]["tier"], x.mode))
            acc[k] += torch.tensor([1.0, x.reward, float(x.parsed.thought)])
        all_sum(acc)
        all_sum(stats)
        row: dict[str, Any] = {"step": step, "loss": round(float(stats[0]) / max(1.0, n_tok) / r.rl_ppo_epochs, 5),
                               "kl": round(float(stats[1] / stats[3].clamp(min=1)), 5),
                               "clip_frac": round(float(stats[2] / stats[3].clamp(min=1)), 4)}
        for (t, md), v in zip(keys, acc):
            if v[0] > 0:
                row[f"reward/{t}/{md}"] = round(float(v[1] / v[0]), 4)
                row[f"think_rate/{t}/{md}"] = round(float(v[2] / v[0]), 4)
        metrics.log(**row)
        bar.update(1)
        bar.set_postfix(r_reason=row.get(f"reward/reasoning/{'think' if algo == 'bpo' else 'auto'}"))
        if (step + 1) % r.save_every == 0 or step == r.rl_steps - 1:
            save_state(stage / "state.pt", model, opt, step + 1)
    bar.close()
    barrier()
    return save_stage_model(run_dir, algo, model, cfg)


def main(argv: list[str] | None = None, algo: str = "bpo") -> int:
    """`train bpo|grpo --run DIR [--preset ...] [--set k=v ...]` (needs the anneal stage; torchrun-able);
    `train bpo --model M --data FILE.jsonl --out RUN ...`: a user's model and data (finetune.py)."""
    from .finetune import main as user_main, wants_user_path

    if algo == "bpo" and wants_user_path(argv):
        return user_main("bpo", argv)
    return stage_main(f"r4b-edge train {algo}", main.__doc__ or "", argv, lambda d, r: run(d, r, algo))


def main_grpo(argv: list[str] | None = None) -> int:
    """`train grpo ...`: the plain-GRPO baseline (free mode choice)."""
    return main(argv, "grpo")
