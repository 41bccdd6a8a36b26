"""torch.distributed for the training stages: the process group from torchrun's environment,
this process's rank, barriers, sums over ranks and each rank's slice of a global batch. Every
helper is a no-op (or the trivial answer) on one process without a process group."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist


def setup_dist(always_group: bool = False) -> tuple[int, int, torch.device]:
    """Init torch.distributed from torchrun's env (gloo on CPU, NCCL on GPU); (rank, world, device).
    `always_group`: a 1-process run joins a 1-rank group too (FSDP2 needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device("cpu")
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        elif always_group:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, dev


def world_size() -> int:
    """1 without torch.distributed."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """0 without torch.distributed."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0."""
    return rank() == 0


def barrier() -> None:
    """dist.barrier when distributed."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce (no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum gradients over ranks (losses are already divided by the global count)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        o = 0
        for g in grads:
            g.copy_(flat[o:o + g.numel()].view_as(g))
            o += g.numel()


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's slice (strided) of a global batch."""
    return list(items[rank()::world_size()])
