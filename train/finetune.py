"""`r4b-edge train anneal|bpo --model M --data FILE.jsonl --out RUN`: bi-mode annealing and BPO of
any R-4B folder on a user's JSONL (issue 24; docs/training.md "Your model, your data").

Order of work: the data file is read and validated (`data.load_data`), every record rendered by
the one renderer with its images at their AnyRes positions (`prepare_image`) and `max_len` taken
from the longest (a `--max-len` ceiling names the record that does not fit) -- all before any
model loads. Annealing then curates by the paper's rule through r4b-edge's engine (N no-think
samples per objective record from the model or `--teacher`; all wrong -> a thinking sample with
the record's trace, or a think-mode trace the teacher (else the model) writes that reaches the
gold answer, K tries, else the item is dropped and counted), and trains on the mix; BPO samples
g forced-think and g forced-no-think rollouts per prompt with the policy itself. Both train the
FSDP2 `scale.Policy` and ship RUN/<stage>/model, a full R-4B folder (LoRA merged)."""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import ENDOFTEXT, forced_opening, split_reply
from r4b_edge.model.template import Message, render_prompt, template_mode

from .checks import PASS, check
from .data import IGNORE, load_data, read_jsonl, record_pieces, write_jsonl
from .metrics import Metrics

STAGES = ("anneal", "bpo")


# ---- arguments ---------------------------------------------------------------------------------

def parse(stage: str, argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"r4b-edge train {stage}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an R-4B folder, a stored model name or a pulled repo id")
    ap.add_argument("--data", required=True, help="a JSONL data file (docs/data-format.md)")
    ap.add_argument("--out", required=True, help="the run folder (resumable: rerun the same command)")
    ap.add_argument("--max-len", type=int, default=None, help="ceiling on a rendered record's positions")
    ap.add_argument("--max-new-tokens", type=int, default=1024 if stage == "anneal" else 512,
                    help="new tokens per curation sample / rollout")
    ap.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank (peft)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per forward per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (curation / rollouts)")
    ap.add_argument("--save-every", type=int, default=50, help="steps between train states")
    ap.add_argument("--save-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    ap.add_argument("--log-every", type=int, default=1)
    if stage == "anneal":
        ap.add_argument("--teacher", default=None, help="model that curates and writes missing traces")
        ap.add_argument("--samples", type=int, default=8, help="N no-think samples per record")
        ap.add_argument("--trace-tries", type=int, default=4, help="K think-mode tries for a missing trace")
    else:
        ap.add_argument("--group", type=int, default=4, help="g: rollouts per mode per prompt (2g per prompt)")
        ap.add_argument("--prompts", type=int, default=None,
                        help="prompts per step (default micro-batch x grad-accum x processes)")
        ap.add_argument("--kl", type=float, default=0.02, help="beta of the KL to the reference (0: none)")
        ap.add_argument("--clip", type=float, default=0.2)
    a = ap.parse_args(argv)
    if a.lr is None:
        a.lr = (1e-4 if a.lora else 1e-5) if stage == "anneal" else (5e-5 if a.lora else 1e-6)
    for k in ("micro_batch", "grad_accum", "max_new_tokens"):
        if getattr(a, k) < 1:
            raise TrainingError(f"--{k.replace('_', '-')} must be >= 1")
    return a


# ---- data: rendering with AnyRes images --------------------------------------------------------

class Images:
    """Each image file prepared by the runtime's `prepare_image` (full AnyRes grid); positions
    cached per path, pixels in a small LRU."""

    def __init__(self, cfg: Any, root: Path, keep: int = 64) -> None:
        self.cfg, self.root, self.keep = cfg, root, keep
        self._n: dict[str, int] = {}
        self._px: OrderedDict[str, Any] = OrderedDict()

    def path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.root / p

    def get(self, name: str) -> Any:
        from r4b_edge.model.processing import prepare_image

        from .scale import Img

        if name in self._px:
            self._px.move_to_end(name)
            return self._px[name]
        pi = prepare_image(self.path(name), self.cfg, None)
        im = Img(pi.pixel_values, tuple(pi.grid), tuple(pi.orig_size))
        self._n[name] = int(pi.n_tokens)
        self._px[name] = im
        if len(self._px) > self.keep:
            self._px.popitem(last=False)
        return im

    def n_tokens(self, name: str) -> int:
        if name not in self._n:
            self.get(name)
        return self._n[name]


def expand(tok: Any, pieces: Sequence[tuple[str, bool]], image_id: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """Encode (text, trained) pieces; the k-th image id becomes counts[k] positions (no loss)."""
    ids: list[int] = []
    labels: list[int] = []
    k = 0
    for text, trained in pieces:
        for t in tok.encode(text):
            if t == image_id:
                if k >= len(counts):
                    raise TrainingError("more <image> tokens than images")
                ids += [t] * counts[k]
                labels += [IGNORE] * counts[k]
                k += 1
            else:
                ids.append(t)
                labels.append(t if trained else IGNORE)
    if k != len(counts):
        raise TrainingError(f"{k} <image> tokens but {len(counts)} images")
    return ids, labels


def encode_train(tok: Any, cfg: Any, imgs: Images, rec: dict, mode: str) -> tuple[list[int], list[int]]:
    return expand(tok, record_pieces(rec, mode), cfg.image_token_index, [imgs.n_tokens(p) for p in rec["images"]])


def prompt_messages(rec: dict) -> list[Message]:
    """The turns up to the last user turn (the question the record's answer replies to)."""
    msgs = rec["messages"]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    return [Message(m["role"], m["content"]) for m in msgs[:last_user + 1]]


def encode_prompt(tok: Any, cfg: Any, imgs: Images, rec: dict, mode: str) -> list[int]:
    text = render_prompt(prompt_messages(rec), template_mode(mode), rec.get("system"))
    ids, _ = expand(tok, [(text, False)], cfg.image_token_index, [imgs.n_tokens(p) for p in rec["images"]])
    return ids


def data_lengths(recs: Sequence[dict], tok: Any, cfg: Any, imgs: Images, stage: str, max_new: int) -> dict[str, int]:
    """Positions per record as training will see them: annealing its longest rendering (with its
    trace in think mode when it has one, else direct); BPO its prompt plus --max-new-tokens."""
    out = {}
    for r in recs:
        if stage == "anneal":
            modes = ["direct"] + (["think"] if r.get("trace") else [])
            out[r["id"]] = max(len(encode_train(tok, cfg, imgs, r, m)[0]) for m in modes)
        else:
            out[r["id"]] = len(encode_prompt(tok, cfg, imgs, r, "think")) + max_new
    return out


def check_lengths(lengths: dict[str, int], ceiling: int | None, context: int, data: Path, what: str) -> int:
    """max_len = the longest record, within --max-len and the model's context; else an error naming
    the record that does not fit."""
    rid, n = max(lengths.items(), key=lambda kv: kv[1])
    for cap, name in ((ceiling, "--max-len"), (context, "the model's context (max_position_embeddings)")):
        if cap is not None and n > cap:
            over = sorted((v, k) for k, v in lengths.items() if v > cap)
            raise TrainingError(
                f"{data}: record {rid!r} takes {n} positions ({what}, images at their AnyRes sizes), over {name} "
                f"{cap}; {len(over)} record(s) do not fit ({', '.join(repr(k) for _, k in over[-5:])}): raise "
                f"{'--max-len' if name == '--max-len' else 'nothing: shorten'} or drop them")
    return n


def resolve_model(name: str) -> Path:
    from .plan import resolve_folder

    return resolve_folder(name)


# ---- curation (annealing) ---------------------------------------------------------------------

def curate(a: argparse.Namespace, recs: list[dict], folder: Path, device: torch.device, root: Path) -> tuple[list[dict], dict]:
    """The paper's rule through r4b-edge's engine; rank-strided, gathered. Returns (training
    records with `mode` set, counts)."""
    import r4b_edge

    src = resolve_model(a.teacher) if a.teacher else folder
    eng = r4b_edge.load(str(src), backend="torch", device=device.type, image_tokens=None,
                        **({"threads": a.threads} if a.threads else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict[int, dict] = {}
    for k in range(rank, len(recs), world):
        r = recs[k]
        if r.get("mode") or r.get("answer") is None:
            res[k] = {"outcome": "given" if r.get("mode") else "subjective"}
            continue
        msgs, images = prompt_messages(r), [str(root / p) if not Path(p).is_absolute() else p for p in r["images"]]
        right_at = None
        for j in range(a.samples):
            out = eng.chat_messages(msgs, images, system=r.get("system"), mode="no-think", temperature=a.temperature,
                                    seed=int(np.random.default_rng([a.seed, 7, k, j]).integers(2**31)),
                                    max_tokens=a.max_new_tokens)
            if check(r, out.answer) >= PASS:
                right_at = j
                break
        if right_at is not None:
            res[k] = {"outcome": "direct", "right_at_sample": right_at}
        elif r.get("trace"):
            res[k] = {"outcome": "think"}
        else:
            trace = None
            for j in range(a.trace_tries):
                out = eng.chat_messages(msgs, images, system=r.get("system"), mode="think", temperature=a.temperature,
                                        seed=int(np.random.default_rng([a.seed, 11, k, j]).integers(2**31)),
                                        max_tokens=a.max_new_tokens)
                if out.reasoning.strip() and check(r, out.answer) >= PASS:
                    trace = out.reasoning.strip()
                    break
            res[k] = {"outcome": "think-teacher", "trace": trace} if trace else {"outcome": "dropped"}
    eng.close()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, res)
    allres = {k: v for p in parts for k, v in p.items()}
    out_recs, counts = [], {"records": len(recs), "samples": a.samples, "direct": 0, "think": 0,
                            "think_from_record": 0, "think_from_teacher": 0, "dropped_no_trace": 0,
                            "subjective": 0, "mode_given": 0, "teacher": str(src)}
    for k, r in enumerate(recs):
        v = allres[k]
        o = v["outcome"]
        rec = dict(r, meta=dict(r.get("meta") or {}, curation=o))
        if o == "dropped":
            counts["dropped_no_trace"] += 1
            continue
        if o == "given":
            counts["mode_given"] += 1
        elif o == "subjective":
            counts["subjective"] += 1
            rec["mode"] = "direct"
        elif o == "direct":
            rec["mode"] = "direct"
        else:
            rec["mode"] = "think"
            if o == "think-teacher":
                rec["trace"] = v["trace"]
                counts["think_from_teacher"] += 1
            else:
                counts["think_from_record"] += 1
        counts[rec["mode"]] += 1
        out_recs.append(rec)
    return out_recs, counts


# ---- batches -------------------------------------------------------------------------------------

def collate(rows: Sequence[tuple[list[int], list[int], list[Any]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list]:
    """Right-padded ids, labels; attention mask only when rows differ in length (a micro-batch of
    one runs without a mask)."""
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (i, l, _) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i)
        lab[b, :len(l)] = torch.tensor(l)
        att[b, :len(i)] = 1
    return ids, lab, (None if bool(att.all()) else att), [r[2] for r in rows]


def global_batch(seed: int, step: int, n: int, size: int) -> list[int]:
    """Items of `step`'s global batch: epochs of seeded permutations, read in order."""
    out = []
    for i in range(step * size, (step + 1) * size):
        ep, j = divmod(i, n)
        out.append(int(np.random.default_rng([seed, 3, ep]).permutation(n)[j]))
    return out


def to_dev(x: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(dev)


# ---- the loops -----------------------------------------------------------------------------------

class Run:
    """What both stages share: the group, the data, the policy and its optimizer state."""

    def __init__(self, stage: str, a: argparse.Namespace) -> None:
        from r4b_edge.model.config import RConfig
        from r4b_edge.model.tokenizer import Tokenizer

        from .scale import init_group

        self.stage, self.a = stage, a
        self.data = Path(a.data)
        self.recs = load_data(self.data)  # before anything else: a bad file fails here
        self.folder = resolve_model(a.model)
        self.cfg = RConfig.from_file(self.folder / "config.json")
        self.tok = Tokenizer.from_dir(self.folder)
        self.imgs = Images(self.cfg, self.data.parent)
        self.lengths = data_lengths(self.recs, self.tok, self.cfg, self.imgs, stage, a.max_new_tokens)
        self.max_len = check_lengths(self.lengths, a.max_len, self.cfg.max_position_embeddings, self.data,
                                     "rendered for training" if stage == "anneal" else "prompt + --max-new-tokens")
        if a.threads:
            torch.set_num_threads(a.threads)
        self.rank, self.world, self.dev = init_group()
        self.dir = Path(a.out) / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(self.dir / "metrics.jsonl")
        self.pad = self.tok.token_to_id(ENDOFTEXT)
        if self.pad is None:
            self.pad = self.tok.im_end
        self.mb, self.accum = a.micro_batch, a.grad_accum
        self.gbs = self.mb * self.accum * self.world

    def policy(self) -> Any:
        from .scale import build_policy, make_optimizer

        torch.manual_seed(self.a.seed)
        pol = build_policy(self.folder, lora=self.a.lora, device=self.dev)
        opt = make_optimizer(pol, self.a.lr, eps=1e-8 if self.stage == "anneal" else 1e-6)
        return pol, opt

    def finish(self, pol: Any) -> Path:
        from .scale import ship

        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.a.save_dtype]
        out = ship(pol, self.folder, self.dir / "model", self.a.lora, dt, lora_out=self.dir / "lora.pt")
        if self.rank == 0:
            (self.dir / "args.json").write_text(json.dumps(vars(self.a), indent=2, default=str))
        return out


def run_anneal(a: argparse.Namespace) -> Path:


    R = Run("anneal", a)
    out_dir = R.dir / "model"
    if (out_dir / "config.json").exists():
        return out_dir
    cur_path = R.dir / "curated.jsonl"
    if not cur_path.exists():
        cur, counts = curate(a, R.recs, R.folder, R.dev, R.data.parent)
        if R.rank == 0:
            write_jsonl(cur_path, cur)
            (R.dir / "curation.json").write_text(json.dumps(counts, indent=2))
            R.metrics.log(event="curation", **{k: v for k, v in counts.items() if k != "teacher"})
        dist.barrier()
    cur = read_jsonl(cur_path)
    if not cur:
        raise TrainingError(f"curation kept no record of {R.data} (every item dropped): see {R.dir / 'curation.json'}")
    enc = []
    for r in cur:
        ids, lab = encode_train(R.tok, R.cfg, R.imgs, r, r["mode"])
        if len(ids) > R.max_len:  # a teacher's trace made it longer than the data's longest
            raise TrainingError(f"record {r['id']!r} with the teacher's trace takes {len(ids)} positions, over "
                                f"max_len {R.max_len}: raise --max-len")
        enc.append((ids, lab, r["images"]))
    steps = a.steps or max(1, math.ceil(a.epochs * len(enc) / R.gbs))
    pol, opt = R.policy()
    return _sft(R, pol, opt, enc, steps)


def _sft(R: Run, pol: Any, opt: Any, enc: list, steps: int) -> Path:
    from .scale import all_sum, clip_grad_norm, load_train_state, lr_at, save_train_state

    a = R.a
    start, _ = load_train_state(R.dir, pol, opt)
    if start:
        R.metrics.log(event="resume", step=start)
    pol.train()
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = global_batch(a.seed, step, len(enc), R.gbs)[R.rank::R.world]
        n_local = sum(sum(1 for x in enc[i][1][1:] if x != IGNORE) for i in idx)
        n_global = int(all_sum(torch.tensor([n_local], dtype=torch.long))[0])
        nll = torch.zeros(1)
        toks = 0
        for c in range(0, len(idx), R.mb):
            rows = [(enc[i][0], enc[i][1], [R.imgs.get(p) for p in enc[i][2]]) for i in idx[c:c + R.mb]]
            ids, lab, att, ims = collate(rows, R.pad)
            toks += int(ids.numel())
            lp = pol("logprobs", ids.to(R.dev), ims, targets=lab.to(R.dev), att=to_dev(att, R.dev))
            loss = -lp.sum()
            (loss * R.world / max(1, n_global)).backward()
            nll += loss.detach().float().cpu()
        gn = clip_grad_norm(pol, 1.0)
        lr = lr_at(step, steps, a.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = float(all_sum(nll)[0]) / max(1, n_global)
        dt = time.perf_counter() - t0
        if step % a.log_every == 0 or step == steps - 1:
            R.metrics.log(step=step, loss=round(loss_v, 6), lr=lr, grad_norm=round(gn, 5), answer_tokens=n_global,
                          tokens_per_process=toks, seconds=round(dt, 4), tokens_per_s_per_process=round(toks / dt, 2))
        if R.rank == 0:
            print(f"[{R.stage}] step {step + 1}/{steps} loss {loss_v:.4f}", flush=True)
        if (step + 1) % a.save_every == 0 or step == steps - 1:
            save_train_state(R.dir, pol, opt, step + 1)
    return R.finish(pol)


# ---- BPO ------------------------------------------------------------------------------------------

def run_bpo(a: argparse.Namespace) -> Path:
    from .scale import all_sum, build_policy, clip_grad_norm, generate, load_train_state, lr_at, save_train_state

    R = Run("bpo", a)
    out_dir = R.dir / "model"
    if (out_dir / "config.json").exists():
        return out_dir
    pool = [r for r in R.recs if r.get("answer") is not None]
    if not pool:
        raise TrainingError(f"{R.data}: BPO needs records with a gold answer (all are subjective)")
    P = a.prompts or R.gbs
    if P % R.world:
        raise TrainingError(f"--prompts {P} must be a multiple of the process count {R.world}")
    steps = a.steps or max(1, math.ceil(a.epochs * len(pool) / P))
    pol, opt = R.policy()
    ref = None
    if a.kl > 0 and not a.lora:
        ref = build_policy(R.folder, device=R.dev, frozen=True)  # bf16, sharded
    start, _ = load_train_state(R.dir, pol, opt)
    if start:
        R.metrics.log(event="resume", step=start)
    think_id = R.tok.think
    g = a.group
    for step in range(start, steps):
        t0 = time.perf_counter()
        rng = np.random.default_rng([a.seed, 31, step])
        pids = [int(x) for x in rng.choice(len(pool), size=P, replace=P > len(pool))][R.rank::R.world]
        rows, images, seeds, meta = [], [], [], []
        for k, p in enumerate(pids):
            for mode in ("think", "no-think"):
                pr = encode_prompt(R.tok, R.cfg, R.imgs, pool[p], mode)
                for j in range(g):
                    rows.append(pr)
                    images.append([R.imgs.get(x) for x in pool[p]["images"]])
                    seeds.append(int(np.random.default_rng([a.seed, 41, step, p, mode == "think", j]).integers(2**62)))
                    meta.append((k, p, mode))
        pol.eval()
        gens = generate(pol, rows, images, max_new=a.max_new_tokens, eos_ids=R.tok.eos_ids, pad_id=R.pad,
                        ban_id=R.cfg.image_token_index, temperature=a.temperature, seeds=seeds)
        rewards, thought = [], []
        for (k, p, mode), toks in zip(meta, gens):
            body = toks[:-1] if toks and toks[-1] in R.tok.eos_ids else toks
            reasoning, answer = split_reply(forced_opening(template_mode(mode)) + R.tok.decode(body))
            rewards.append(check(pool[p], answer))
            thought.append(bool(reasoning))
        adv = np.zeros(len(rows))
        for k in range(len(pids)):
            sel = [i for i, m in enumerate(meta) if m[0] == k]
            rw = np.array([rewards[i] for i in sel])
            adv[sel] = (rw - rw.mean()) / (rw.std() + 1e-4)
        seqs = []
        for pr, toks, ims in zip(rows, gens, images):
            cut = len(pr) - 1 - pr[::-1].index(think_id)
            ids = list(pr) + list(toks)
            lab = [IGNORE] * (cut + 1) + ids[cut + 1:]
            seqs.append((ids, lab, ims))
        n_local = sum(sum(1 for x in s[1][1:] if x != IGNORE) for s in seqs)
        n_tok = float(all_sum(torch.tensor([float(n_local)]))[0])
        mbs = [seqs[c:c + a.micro_batch] for c in range(0, len(seqs), a.micro_batch)]
        n_mb = max(1, len(mbs))
        with torch.no_grad():
            old, refl = [], []
            for mb in mbs:
                ids, lab, att, ims = collate(mb, R.pad)
                args = (ids.to(R.dev), ims)
                kw = dict(targets=lab.to(R.dev), att=to_dev(att, R.dev))
                old.append(pol("logprobs", *args, **kw).float())
                if a.kl > 0:
                    if ref is not None:
                        refl.append(ref("logprobs", *args, **kw).float())
                    else:  # LoRA: the base with the adapters off is the reference
                        pol.net.disable_adapter_layers()
                        refl.append(pol("logprobs", *args, **kw).float())
                        pol.net.enable_adapter_layers()
        pol.train()
        stats = torch.zeros(3)
        for c, mb in enumerate(mbs):
            ids, lab, att, ims = collate(mb, R.pad)
            lp = pol("logprobs", ids.to(R.dev), ims, targets=lab.to(R.dev), att=to_dev(att, R.dev))
            per = [sum(1 for x in s[1][1:] if x != IGNORE) for s in mb]
            av = torch.tensor(np.repeat(adv[c * a.micro_batch:c * a.micro_batch + len(mb)], per), dtype=torch.float32)
            ratio = torch.exp(lp - old[c])
            pg = -torch.minimum(ratio * av, ratio.clamp(1 - a.clip, 1 + a.clip) * av)
            kl = torch.zeros_like(lp)
            if a.kl > 0:
                d = refl[c] - lp
                kl = torch.exp(d) - d - 1
            loss = (pg + a.kl * kl).sum()
            (loss * R.world / max(1.0, n_tok)).backward()
            stats += torch.tensor([float(loss.detach()), float(kl.detach().sum()), 0.0])
        gn = clip_grad_norm(pol, 1.0)
        lr = lr_at(step, steps, a.lr, warmup=max(1, steps // 10))
        for gr in opt.param_groups:
            gr["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = torch.tensor([[sum(rewards[i] for i, m in enumerate(meta) if m[2] == md),
                             sum(1 for m in meta if m[2] == md),
                             sum(thought[i] for i, m in enumerate(meta) if m[2] == md)] for md in ("think", "no-think")],
                           dtype=torch.float64)
        all_sum(acc)
        all_sum(stats)
        dt = time.perf_counter() - t0
        R.metrics.log(step=step, loss=round(float(stats[0]) / max(1.0, n_tok), 6),
                      kl=round(float(stats[1]) / max(1.0, n_tok), 6), grad_norm=round(gn, 5), lr=lr,
                      **{f"reward/{md}": round(float(acc[i, 0] / max(1, acc[i, 1])), 4) for i, md in enumerate(("think", "no-think"))},
                      **{f"think_rate/{md}": round(float(acc[i, 2] / max(1, acc[i, 1])), 4) for i, md in enumerate(("think", "no-think"))},
                      scored_tokens=n_tok, seconds=round(dt, 3), micro_batches=n_mb)
        if R.rank == 0:
            print(f"[bpo] step {step + 1}/{steps} reward think {float(acc[0, 0] / max(1, acc[0, 1])):.3f} "
                  f"no-think {float(acc[1, 0] / max(1, acc[1, 1])):.3f}", flush=True)
        if (step + 1) % a.save_every == 0 or step == steps - 1:
            save_train_state(R.dir, pol, opt, step + 1)
    return R.finish(pol)


def main(stage: str, argv: Sequence[str] | None) -> int:
    """`train anneal|bpo --model M --data FILE --out RUN ...` (torchrun-able)."""
    a = parse(stage, argv)
    out = (run_anneal if stage == "anneal" else run_bpo)(a)
    if dist.is_initialized():
        if dist.get_rank() == 0:
            print(out)
        dist.destroy_process_group()
    return 0


def wants_user_path(argv: Sequence[str] | None) -> bool:
    """A stage's argv that names a model or a data file goes to this trainer."""
    return any(x.split("=", 1)[0] in ("--model", "--data", "--out") for x in (argv or []))
