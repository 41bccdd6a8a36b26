"""Train-state checkpoints of a stage (model, optimizer, step, RNG): written atomically on rank 0
every `save_every` steps, read back to resume a stage where it stopped."""
from __future__ import annotations

from pathlib import Path

import torch

from r4b_edge.errors import TrainingError
from r4b_edge.fsutil import atomic_write

from .dist import barrier, is_main


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict | None = None) -> None:
    """Atomic train-state checkpoint (model, optimizer, step, RNG) on rank 0."""
    if is_main():
        with atomic_write(path) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "rng": torch.get_rng_state(), "extra": extra or {}}, tmp)
    barrier()


def load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore a train state if present: (step, extra); (0, {}) when there is none."""
    if not path.exists():
        return 0, {}
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainingError(f"train state {path} cannot be read ({e}); delete it to restart the stage") from None
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    torch.set_rng_state(st["rng"])
    return int(st["step"]), st.get("extra", {})
