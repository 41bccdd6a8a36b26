"""Batched KV-cached generation on the torch model for curation, RL rollouts and eval
(left padding; per-row seeded sampling so results do not depend on batching or ranks)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import END_TOKENS, ENDOFTEXT, IMAGE_PLACEHOLDER, THINK_CLOSE, forced_opening, split_reply
from r4b_edge.model.template import Message, render_prompt, template_mode

from .checks import check
from .losses import embed_inputs
from .world import CHECK


@dataclass
class Generation:
    """Generated ids per row (eos included when reached) and cumulative wall times per step."""

    tokens: list[list[int]]
    step_times: list[float]
    answer_step: list[int | None]  # index into step_times when the answer phase began


def encode_prompt(tok: Any, question: str, mode: str, image_id: int, n_image_tokens: int,
                  history: Sequence[tuple[str, str]] = (), system: str | None = None) -> list[int]:
    """Prompt ids for `mode` (auto | think | no-think), image placeholder expanded. With
    `history` ((question, answer) turns before this one), the image goes with the first
    question and earlier answers sit behind empty think blocks, as the runtime renders them
    (both are `render_prompt`); `system` first when given."""
    msgs: list[Message] = []
    for k, (q, a) in enumerate(history):
        msgs += [Message("user", q, images=int(k == 0)), Message("assistant", a)]
    msgs.append(Message("user", question, images=int(not history)))
    out: list[int] = []
    for t in tok.encode(render_prompt(msgs, mode, system), add_special_tokens=False).ids:
        out += [t] * (n_image_tokens if t == image_id else 1)
    return out


@torch.no_grad()
def generate(model: Any, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor | None, *,
             max_new: int, eos_ids: set[int], pad_id: int, end_think_id: int, temperature: float = 0.0,
             seeds: Sequence[int] | None = None, repeats: int = 1, answer_open: Sequence[bool] | None = None) -> Generation:
    """Generate for B prompts (x `repeats` rows each, sharing one prefill).

    temperature 0 is greedy; otherwise row r samples with its own generator seeded
    `seeds[r]` (r over the B*repeats expanded rows). `answer_open[b]` says the prompt
    already closed the think block (no-think), so the answer begins at the first token."""
    B = len(prompts)
    dev = model.device
    T = max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    att = torch.zeros((B, T), dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        att[b, T - len(p):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    emb = embed_inputs(model, ids, pixel_values)
    logits, cache = model.forward(emb, attention_mask=att, position_ids=pos, use_cache=True)
    last = logits[:, -1].float()
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        last = last.repeat_interleave(repeats, 0)
        att = att.repeat_interleave(repeats, 0)
        pos = pos.repeat_interleave(repeats, 0)
    R = B * repeats
    opened = [bool(answer_open[r // repeats]) if answer_open is not None else False for r in range(R)]
    gens = None
    if temperature > 0:
        if seeds is None or len(seeds) != R:
            raise TrainingError(f"sampling needs {R} row seeds, got {0 if seeds is None else len(seeds)}")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out: list[list[int]] = [[] for _ in range(R)]
    done = torch.zeros(R, dtype=torch.bool)
    times = [time.perf_counter() - t0]
    ans_step: list[int | None] = [0 if o else None for o in opened]
    next_pos = pos[:, -1] + 1
    eos_t = torch.tensor(sorted(eos_ids))
    ban = int(model.config.image_token_index)
    for step in range(max_new):
        last[:, ban] = float("-inf")  # never generate an image placeholder
        if gens is None:
            nxt = last.argmax(-1)
        else:
            g = torch.stack([-torch.log(-torch.log(torch.rand(last.shape[-1], generator=gen).clamp_min(1e-20)))
                             for gen in gens])
            nxt = (torch.log_softmax(last / temperature, -1).cpu() + g).argmax(-1).to(dev)
        nxt_c = nxt.cpu()
        for r in range(R):
            if not done[r]:
                t = int(nxt_c[r])
                out[r].append(t)
                if ans_step[r] is None and t == end_think_id:
                    ans_step[r] = step + 1
        done |= torch.isin(nxt_c, eos_t)
        if bool(done.all()):
            times.append(time.perf_counter() - t0)
            break
        nxt = torch.where(done.to(dev), torch.full_like(nxt, pad_id), nxt)
        att = torch.cat([att, torch.ones((R, 1), dtype=att.dtype, device=dev)], 1)
        emb = model.embed_tokens(nxt[:, None])
        logits, cache = model.forward(emb, past_key_values=cache, attention_mask=att,
                                      position_ids=next_pos[:, None], use_cache=True)
        next_pos = next_pos + 1
        last = logits[:, -1].float()
        times.append(time.perf_counter() - t0)
    return Generation(out, times, ans_step)


@dataclass
class Parsed:
    """A response split into reasoning and answer."""

    thought: bool  # non-empty reasoning between <think> and </think>
    answer: str | None  # None when the think block never closed
    n_tokens: int  # output tokens after the <think> tag (forced suffix + generated)


def forced_ids(tok: Any, mode: str) -> list[int]:
    """Ids of the opening `mode` (auto | think | no-think, any alias) forces after the prompt's
    `<think>` (`r4b_edge.model.reply.forced_opening`): reply tokens the model did not generate."""
    return tok.encode(forced_opening(template_mode(mode)), add_special_tokens=False).ids


def parse_response(tok: Any, mode: str, gen: Sequence[int], eos_ids: set[int]) -> Parsed:
    """Split (forced suffix + generated) text after `<think>` into reasoning / answer
    (`r4b_edge.model.reply.split_reply`)."""
    ids = list(gen)
    body_ids = ids[:-1] if ids and ids[-1] in eos_ids else ids
    text = forced_opening(template_mode(mode)) + tok.decode(body_ids, skip_special_tokens=False)
    reasoning, answer = split_reply(text)
    return Parsed(bool(reasoning), answer, len(forced_ids(tok, mode)) + len(ids))


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    item: int  # index of the prompt item
    mode: str
    prompt: list[int]
    tokens: list[int]
    parsed: Parsed
    reward: float
    answer_time: float | None  # seconds from start to the first answer token (same batch)


class Roller:
    """Runs prompts (question + image path + gold answer) through `generate` in chunks; each
    rollout's reward is `checks.check(item's record, answer)` (an item without a `record` is a world
    question: the world's check)."""

    def __init__(self, model: Any, tok: Any, cfg: Any, root: Any, pixels: Any) -> None:
        self.model, self.tok, self.cfg, self.root, self.pixels = model, tok, cfg, root, pixels
        self.eos = {tok.token_to_id(t) for t in END_TOKENS}
        self.pad = tok.token_to_id(ENDOFTEXT)
        self.end_think = tok.token_to_id(THINK_CLOSE)

    def run(self, items: Sequence[dict], mode: str, *, repeats: int = 1, temperature: float = 0.0,
            seeds: Sequence[int] | None = None, max_new: int = 64, chunk: int = 256) -> list[Rollout]:
        """Rollouts for every item x repeats (row order: item-major). `seeds` per row when sampling."""
        out: list[Rollout] = []
        per = max(1, chunk // repeats)
        for c in range(0, len(items), per):
            its = items[c:c + per]
            prompts = [encode_prompt(self.tok, it["question"], mode, self.cfg.image_token_index,
                                     self.cfg.tokens_per_view, it.get("history", ()), it.get("system")) for it in its]
            pv = torch.from_numpy(np.stack([self.pixels.get(self.root / it["image"]) for it in its]))
            rs = None if seeds is None else seeds[c * repeats:(c + len(its)) * repeats]
            g = generate(self.model, prompts, pv, max_new=max_new, eos_ids=self.eos, pad_id=self.pad,
                         end_think_id=self.end_think, temperature=temperature, seeds=rs, repeats=repeats,
                         answer_open=[mode == "no-think"] * len(its))
            for r, toks in enumerate(g.tokens):
                i = r // repeats
                p = parse_response(self.tok, mode, toks, self.eos)
                rec = its[i].get("record") or {"id": its[i].get("id"), "answer": its[i]["answer"], "check": CHECK}
                st = g.answer_step[r]
                out.append(Rollout(c + i, mode, prompts[i], toks, p, check(rec, p.answer),
                                   g.step_times[min(st, len(g.step_times) - 1)] if st is not None else None))
        return out


def items_from_records(recs: Sequence[dict]) -> list[dict]:
    """{question, image, answer, tier, family, scene, system, record} of single-turn one-image
    records ('<image>\\n{question}'); `record` is what `checks.check` scores against (a world
    record written before records named their check gets the world's)."""
    out = []
    for r in recs:
        q = r["messages"][0]["content"]
        if len(r["messages"]) != 2 or len(r["images"]) != 1 or not q.startswith(IMAGE_PLACEHOLDER + "\n") \
                or IMAGE_PLACEHOLDER in q[len(IMAGE_PLACEHOLDER):]:
            raise TrainingError(f"record {r['id']!r}: rollouts take single-turn records with one image at the "
                                f"start of the question today; it has {len(r['messages'])} turns and "
                                f"{len(r['images'])} images")
        meta = r.get("meta") or {}
        rec = r if "check" in r or not meta.get("scene") else {**r, "check": CHECK}
        out.append({"question": q.split("\n", 1)[-1], "image": r["images"][0], "answer": r["answer"],
                    "tier": meta.get("tier"), "family": meta.get("family"), "id": r["id"], "scene": meta.get("scene"),
                    "system": r.get("system"), "record": rec})
    return out
