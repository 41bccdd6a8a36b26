"""The scaled trainer's model side (issue 24, docs/training.md "Memory plan"): a real-layout R-4B
wrapped as `Policy`, the one root module FSDP2 shards (`fully_shard` on every decoder layer, every
SigLIP layer, `embed_tokens`, `lm_head`, then the root) with `MixedPrecisionPolicy(param bf16,
reduce fp32)` over fp32 sharded master parameters, activation checkpointing per layer in both
towers, an optional peft LoRA, the loss's log-probabilities in chunks of `CHUNK` answer positions
(`lm_head` + log-softmax recomputed per chunk in backward, so no [positions x vocab] matrix of the
whole batch ever exists), lockstep KV-cached sampling for rollouts, and sharded resumable train
states (torch.distributed.checkpoint).

Every rank calls every FSDP unit the same number of times per forward (the collectives must pair):
the vision tower runs once per forward on all of a micro-batch's views (a dummy view, weighted 0,
when a rank has none), `lm_head` once (`ChunkedHead`), and a generation runs until every rank's
rows are done."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from r4b_edge.errors import TrainingError

#: Answer positions per loss chunk (the plan's logits row: one chunk of bf16 logits live at a time).
CHUNK = 1024
#: peft `target_modules` of `--lora` (the plan counts the same names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- process group -----------------------------------------------------------------------------

def init_group() -> tuple[int, int, torch.device]:
    """(rank, world, device). FSDP2 runs on every process count: a 1-process run joins a 1-rank
    group too (so 1 and N processes run the same code and the same numerics)."""
    from .dist import setup_dist

    return setup_dist(always_group=True)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_max(v: int) -> int:
    t = torch.tensor([v], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0])


# ---- the policy module ---------------------------------------------------------------------------

@dataclass
class Img:
    """One image of a sequence: its views [V, 3, S, S] (float32), grid and (height, width)."""

    pixels: np.ndarray
    grid: tuple[int, int]
    orig_size: tuple[int, int]


class ChunkedHead(nn.Linear):
    """`lm_head`'s class while training (swapped in place: same parameters, same state-dict
    keys). `forward(h)` is the plain head; `forward(h, targets)` the log-probabilities of
    `targets` at the rows of h [N, H], `CHUNK` rows at a time, each chunk checkpointed: backward
    recomputes its logits, so one chunk's logits are live at once. One call per forward, so FSDP2
    gathers the head once whatever the chunk count."""

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if targets is None:
            return super().forward(h)
        out = []
        for c in range(0, max(1, h.shape[0]), CHUNK):
            out.append(checkpoint(self._chunk_lp, h[c:c + CHUNK], targets[c:c + CHUNK], use_reentrant=False))
        return torch.cat(out)

    def _chunk_lp(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = super().forward(h).float()
        return logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)


def core_of(net: nn.Module) -> Any:
    """The RForConditionalGeneration inside a (peft-wrapped) model."""
    from r4b_edge.model.modeling import RForConditionalGeneration

    for m in net.modules():
        if isinstance(m, RForConditionalGeneration):
            return m
    raise TrainingError("no RForConditionalGeneration in the model")


class Policy(nn.Module):
    """The root module: `net` is the R-4B model (or the peft LoraModel around it). One `forward`
    entry (FSDP2's root hooks fire on it) for the three uses: `logprobs` (training), `prefill` and
    `decode` (rollouts)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        core = core_of(net)
        core.lm_head.__class__ = ChunkedHead

    @property
    def core(self) -> Any:
        return core_of(self.net)

    def forward(self, kind: str, ids: torch.Tensor, images: Sequence[Sequence[Img]] = (), **kw: Any) -> Any:
        if kind == "logprobs":
            return self._logprobs(ids, images, **kw)
        if kind == "prefill":
            return self._prefill(ids, images, **kw)
        if kind == "decode":
            return self._decode(ids, **kw)
        raise ValueError(kind)

    def embed(self, ids: torch.Tensor, images: Sequence[Sequence[Img]]) -> torch.Tensor:
        """Token embeddings with each sequence's image placeholders replaced, in order, by its images'
        packed AnyRes features. Every view of the batch goes through the tower in one call."""
        core = self.core
        dev = core.lm_head.weight.device
        emb = core.embed_tokens(ids)
        flat = [im for seq in images for im in seq]
        S = core.config.image_size
        if flat:
            pv = torch.from_numpy(np.concatenate([im.pixels for im in flat]))
        else:  # every rank runs the tower once per forward (FSDP2's collectives pair up)
            pv = torch.zeros((1, 3, S, S))
        feats = core.model.multi_modal_projector(core.vision_hidden_states(pv.to(dev)))
        mask = ids == core.config.image_token_index
        n = int(mask.sum())
        if not flat:
            if n:
                raise TrainingError(f"batch has {n} image tokens but no images")
            return emb + 0.0 * feats.sum().to(emb.dtype)
        packed, o = [], 0
        for im in flat:
            v = im.pixels.shape[0]
            packed.append(core.pack_image_features(feats[o:o + v], im.grid, im.orig_size))
            o += v
        cat = torch.cat(packed)
        if cat.shape[0] != n:
            raise TrainingError(f"batch has {n} image tokens but its images give {cat.shape[0]} features")
        return emb.masked_scatter(mask[..., None], cat.to(emb.dtype))

    def _decoder(self, emb: torch.Tensor, att: torch.Tensor | None, pos: torch.Tensor | None,
                 cache: Any = None) -> Any:
        core = self.core
        return core.model.language_model(inputs_embeds=emb, attention_mask=att, position_ids=pos,
                                         cache=cache, use_cache=cache is not None)

    def _logprobs(self, ids: torch.Tensor, images: Sequence[Sequence[Img]], targets: torch.Tensor,
                  att: torch.Tensor | None = None) -> torch.Tensor:
        """log p(targets[b, t+1] | ids[b, :t+1]) at the positions whose target is not -100, flat in
        row-major order [N] (fp32)."""
        emb = self.embed(ids, images)
        h = self._decoder(emb, att, None).last_hidden_state
        tgt = targets[:, 1:]
        sel = tgt != -100
        return self.core.lm_head(h[:, :-1][sel], tgt[sel])

    def _prefill(self, ids: torch.Tensor, images: Sequence[Sequence[Img]], att: torch.Tensor,
                 pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        emb = self.embed(ids, images)
        core = self.core
        cache = core.new_cache()
        out = self._decoder(emb, att, pos, cache)
        return core.lm_head(out.last_hidden_state[:, -1]).float(), out.cache

    def _decode(self, ids: torch.Tensor, cache: Any, att: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        core = self.core
        out = self._decoder(core.embed_tokens(ids), att, pos, cache)
        return core.lm_head(out.last_hidden_state[:, -1]).float(), out.cache


# ---- building: LoRA, checkpointing, FSDP2 ----------------------------------------------------------

def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """peft LoRA on every Linear named like `LORA_TARGETS` (SigLIP's q/k/v too): rank `rank`,
    alpha 2 x rank, no dropout; the base frozen. Returns the peft LoraModel (`merge_and_unload`
    gives the plain model back)."""
    try:
        from peft import LoraConfig, LoraModel
    except ImportError:
        raise TrainingError("--lora needs peft: pip install 'r4b-edge[train]' (peft==0.22.0)") from None
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                     bias="none")
    return LoraModel(model, cfg, "default")


def enable_checkpointing(core: Any) -> None:
    """Activation checkpointing per layer in both towers (transformers' non-reentrant checkpoint)."""
    kw = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    core.model.language_model.activation_checkpointing_enable(**kw)
    core.model.vision_tower.vision_model.activation_checkpointing_enable(**kw)


def shard_units(policy: Policy) -> list[nn.Module]:
    """The FSDP2 units below the root, in the plan's order."""
    core = policy.core
    lm = core.model.language_model
    vis = core.model.vision_tower.vision_model
    return [*vis.encoder.layers, *lm.layers, lm.embed_tokens, core.lm_head]


def build_policy(folder: str | Path, *, lora: int = 0, device: torch.device, frozen: bool = False,
                 checkpointing: bool = True) -> Policy:
    """Load a folder with r4b-edge's loader (fp32 master weights; a frozen model or a LoRA base in
    bf16), add LoRA, checkpointing, and shard it with FSDP2 over the current group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    from r4b_edge.model.checkpoint import load_checkpoint

    model, _cfg, _ = load_checkpoint(folder, device="cpu", dtype=torch.float32)
    if frozen or lora:
        model = model.to(torch.bfloat16)
        model.requires_grad_(False)
    net: nn.Module = model
    if lora and not frozen:
        net = add_lora(model, lora)
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
    if checkpointing and not frozen:
        enable_checkpointing(model)
    pol = Policy(net)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for u in shard_units(pol):
        fully_shard(u, mesh=mesh, mp_policy=mp)
    fully_shard(pol, mesh=mesh, mp_policy=mp)
    pol.to(device)
    if frozen:
        pol.eval()
    return pol


def make_optimizer(pol: Policy, lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW on the trainable (sharded) parameters, no decay on 1-D tensors."""
    ps = [p for p in pol.parameters() if p.requires_grad]
    if not ps:
        raise TrainingError("no trainable parameters")
    return torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.01},
                              {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=eps)


def clip_grad_norm(pol: Policy, max_norm: float) -> float:
    """Global grad-norm clipping over DTensor shards."""
    ps = [p for p in pol.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(ps, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---- train states (sharded, resumable) ------------------------------------------------------------

def save_train_state(stage: Path, pol: Policy, opt: torch.optim.Optimizer, step: int, extra: dict | None = None) -> None:
    """Sharded checkpoint (torch.distributed.checkpoint) of model + optimizer into
    stage/state/step-N (written to a temp folder, renamed by rank 0), then `state/latest.json`
    atomically; older states are removed. A kill at any point leaves the last complete one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from r4b_edge.fsutil import atomic_write

    root = stage / "state"
    tmp, final = root / f"tmp-{step}", root / f"step-{step}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(pol, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        with atomic_write(root / "latest.json") as t:
            t.write_text(json.dumps({"step": step, "dir": final.name, "extra": extra or {}}))
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_train_state(stage: Path, pol: Policy, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore the latest complete state: (step, extra); (0, {}) when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    p = stage / "state" / "latest.json"
    if not p.exists():
        return 0, {}
    meta = json.loads(p.read_text())
    msd, osd = get_state_dict(pol, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(stage / "state" / meta["dir"]))
    set_state_dict(pol, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return int(meta["step"]), meta.get("extra", {})


# ---- shipping ---------------------------------------------------------------------------------------

def full_state(pol: Policy) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on rank 0's CPU (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(pol, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def ship(pol: Policy, src: str | Path, out: Path, lora: int, dtype: torch.dtype = torch.bfloat16,
         lora_out: Path | None = None) -> Path:
    """Rank 0 writes a full R-4B folder (config + tokenizer of `src`, weights in `dtype`), LoRA
    merged with peft's `merge_and_unload`; atomic (save_checkpoint's temp folder + rename). With
    LoRA, `lora_out` gets the adapters (fp32, the unmerged model's `lora_*` tensors)."""
    from r4b_edge.model.checkpoint import load_checkpoint, save_checkpoint

    sd = full_state(pol)
    if dist.get_rank() == 0:
        model, cfg, _ = load_checkpoint(src, device="cpu", dtype=torch.float32)
        net: nn.Module = add_lora(model, lora) if lora else model
        missing, unexpected = Policy(net).load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        if unexpected or [k for k in missing if "lora_" in k]:
            raise TrainingError(f"ship: state dict mismatch (missing {missing[:4]}, unexpected {unexpected[:4]})")
        core = core_of(net)
        core.lm_head.__class__ = nn.Linear
        if lora:
            if lora_out is not None:
                from r4b_edge.fsutil import atomic_write

                with atomic_write(lora_out) as t:
                    torch.save({"rank": lora, "tensors": {k: v.detach().clone() for k, v in net.state_dict().items()
                                                          if "lora_" in k}}, t)
            net = net.merge_and_unload()
        final = core_of(net).to(dtype)
        save_checkpoint(final, cfg, src, out)
    dist.barrier()
    return out


# ---- lockstep sampling (rollouts) --------------------------------------------------------------------

@torch.no_grad()
def generate(pol: Policy, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[Img]], *, max_new: int,
             eos_ids: set[int], pad_id: int, ban_id: int, temperature: float, seeds: Sequence[int]) -> list[list[int]]:
    """Sample up to `max_new` tokens for each prompt (left-padded batch, KV cache), row r with its
    own generator `seeds[r]` (greedy at temperature 0). All ranks step together until every
    rank's rows are done (each step is one FSDP2 forward)."""
    dev = pol.core.lm_head.weight.device
    B = len(prompts)
    T = max([len(p) for p in prompts] or [1])
    ids = torch.full((max(B, 1), T), pad_id, dtype=torch.long)
    att = torch.zeros((max(B, 1), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(list(p))
        att[b, T - len(p):] = 1
    if B == 0:
        att[0, -1] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    last, cache = pol("prefill", ids.to(dev), images if B else [[]], att=att.to(dev), pos=pos.to(dev))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(max(B, 1), dtype=torch.bool)
    if B == 0:
        done[:] = True
    nxt_pos = pos[:, -1] + 1
    for _ in range(max_new):
        lg = last.cpu()
        lg[:, ban_id] = float("-inf")
        if temperature > 0:
            lp = torch.log_softmax(lg / temperature, -1)
            g = torch.stack([-torch.log(-torch.log(torch.rand(lg.shape[-1], generator=gen).clamp_min(1e-20)))
                             for gen in gens]) if B else torch.zeros_like(lp)
            nxt = (lp + g).argmax(-1)
        else:
            nxt = lg.argmax(-1)
        for r in range(B):
            if not done[r]:
                out[r].append(int(nxt[r]))
                if int(nxt[r]) in eos_ids:
                    done[r] = True
        if all_max(int(not bool(done.all()))) == 0:
            break
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        att = torch.cat([att, torch.ones((att.shape[0], 1), dtype=att.dtype)], 1)
        last, cache = pol("decode", nxt[:, None].to(dev), cache=cache, att=att.to(dev), pos=nxt_pos[:, None].to(dev))
        nxt_pos = nxt_pos + 1
    return out


def lr_at(step: int, total: int, peak: float, warmup: int | None = None) -> float:
    """Linear warmup then cosine decay to 10% (as the world recipe's `lr_at`)."""
    w = max(1, total // 20) if warmup is None else max(1, warmup)
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
