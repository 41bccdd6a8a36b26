"""The supervised loop shared by pre-training and annealing: global batches drawn by
(seed, step), sharded over ranks, loss divided by the global label count, gradients
summed over ranks, atomic resumable train state."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from r4b_edge.errors import TrainingError

from .data import Encoded, PixelCache, collate
from .dist import all_reduce_grads, all_sum, barrier, is_main, shard
from .losses import sft_loss_sum
from .metrics import Metrics
from .recipe import Recipe, lr_at
from .state import load_state, save_state


def batch_indices(seed: int, salt: int, step: int, n: int, batch: int, weights: np.ndarray | None) -> list[int]:
    """The global batch of `step` (a pure function of seed, salt, step)."""
    rng = np.random.default_rng([seed, salt, step])
    return [int(i) for i in rng.choice(n, size=batch, replace=True, p=weights)]


def make_optimizer(model: torch.nn.Module, lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW, no decay on 1-D tensors (norms, biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=eps)


def run_sft(stage_dir: Path, model: Any, data: Sequence[Encoded], root: Path, pixels: PixelCache, pad_id: int,
            r: Recipe, *, steps: int, batch: int, lr: float, salt: int, desc: str,
            weights: np.ndarray | None = None) -> list[float]:
    """Train `steps` steps (resuming from stage_dir/state.pt); returns the logged losses."""
    if not data:
        raise TrainingError(f"{desc}: 0 training examples")
    stage_dir.mkdir(parents=True, exist_ok=True)
    state_path = stage_dir / "state.pt"
    opt = make_optimizer(model, lr)
    start, _ = load_state(state_path, model, opt)
    metrics = Metrics(stage_dir / "metrics.jsonl")
    if start:
        metrics.log(event="resume", step=start)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not is_main(), mininterval=2.0)
    for step in range(start, steps):
        idx = batch_indices(r.seed, salt, step, len(data), batch, weights)
        mine = shard(idx)
        n_local = sum(sum(1 for x in data[i].labels[1:] if x != -100) for i in mine)
        n_global = int(all_sum(torch.tensor([n_local], dtype=torch.long))[0])
        loss_local = torch.zeros(1)
        for c in range(0, len(mine), r.micro_batch):
            chunk = [data[i] for i in mine[c:c + r.micro_batch]]
            b = collate(chunk, pixels, root, pad_id)
            b = {k: (v.to(model.device) if v is not None else None) for k, v in b.items()}
            ls, _ = sft_loss_sum(model, b)
            (ls / n_global).backward()
            loss_local += ls.detach().cpu()
        all_reduce_grads(model)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(all_sum(loss_local)[0]) / max(1, n_global)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % r.log_every == 0 or step == steps - 1:
            metrics.log(step=step, loss=round(loss, 5), lr=lr_at(step, steps, lr), grad_norm=round(gnorm, 4),
                        tokens=n_global)
        if (step + 1) % r.save_every == 0 or step == steps - 1:
            save_state(state_path, model, opt, step + 1)
    bar.close()
    barrier()
    return losses
