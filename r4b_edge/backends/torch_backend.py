"""The torch backend: the reference path and parity oracle for the fast ones.

`use_cache=False` gives the naive path (every step recomputes the whole
sequence from its embeddings); it exists only to check the cached path.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model.checkpoint import load_checkpoint
from ..model.config import RConfig
from ..model.modeling import truncate_cache
from ..model.processing import PreparedImage
from .base import Backend, BackendInfo, numpy_pack
from .runtime import check_n_ctx, check_threads, resolve_device
from .torch_dtype import check_dtype, dtype_label, resolve_dtype


def resolve_torch_device(device: str = "auto") -> str:
    """The torch device for `device` (the shared alias table): auto -> cuda, then mps, then cpu;
    an explicit device must exist."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return resolve_device(device, "torch", {"cuda": torch.cuda.is_available(), "mps": mps},
                          {"cuda": "install a CUDA build of torch", "mps": "torch's MPS needs macOS on Apple silicon"})


def _hidden_size(model_path: str | Path) -> int:
    """The decoder width in a folder's config.json (R-4B's 2560 where it has none: loading fails next)."""
    f = Path(model_path).expanduser() / "config.json"
    return RConfig.from_file(f).hidden_size if f.is_file() else 2560


class TorchBackend(Backend):
    """R-4B in torch from a checkpoint folder in the R-4B layout."""

    name = "torch"

    def __init__(self, model_path: str | Path, *, device: str = "auto", threads: int | None = None,
                 n_ctx: int | None = None, dtype: str | None = None, use_cache: bool = True):
        """`threads`: torch's intra-op threads on CPU (torch.set_num_threads, which
        is process-wide); None: `runtime.default_threads()`. `n_ctx`: a bound on the sequence
        (the cache grows as it goes; None: the model's context). `dtype`: auto, bf16, fp16, fp32
        (or bfloat16, float16, float32; `torch_dtype.resolve_dtype`); None: fp32 on CPU, fp16 on a GPU."""
        self.device = resolve_torch_device(device)
        self.threads = check_threads(threads)
        self.n_ctx_limit = check_n_ctx(n_ctx)
        check_dtype(dtype)
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        torch_dtype, self.dtype_reason = resolve_dtype(dtype, self.device, lambda: _hidden_size(model_path))
        self.model, self.config, self.tokenizer = load_checkpoint(model_path, device=self.device, dtype=torch_dtype)
        self.model.eval()
        self.dtype = torch_dtype
        self.model_path = Path(model_path)
        self.use_cache = use_cache
        self._cache = None
        self._embeds: torch.Tensor | None = None  # naive path: the whole sequence
        self._n = 0
        self._init_sequence()

    @property
    def n_past(self) -> int:
        return self._n

    # ---- hooks (see Backend) ----------------------------------------------------------------
    @torch.inference_mode()
    def _vision_view(self, image: PreparedImage, i: int) -> np.ndarray:
        pv = torch.from_numpy(image.pixel_values[i:i + 1]).to(self.device, self.dtype)
        feats = self.model.model.multi_modal_projector(self.model.vision_hidden_states(pv))[0]
        return feats.float().cpu().numpy()

    def _pack(self, image: PreparedImage, feats: list) -> torch.Tensor:
        newline = self.model.model.image_newline.detach().float().cpu().numpy()
        return torch.from_numpy(numpy_pack(image, feats, self.config, newline)).to(self.device, self.dtype)

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model.embed_tokens(t)

    def _run(self, embeds: torch.Tensor, logits: str = "all") -> torch.Tensor | None:
        """Evaluate new embeddings [1, k, H] at positions n..; float32 logits [k, V] ("all"),
        [1, V] ("last") or None ("none")."""
        k = embeds.shape[1]
        if self.use_cache:
            pos = torch.arange(self._n, self._n + k, device=self.device)[None]
            out, self._cache = self.model(inputs_embeds=embeds, past_key_values=self._cache,
                                          position_ids=pos, use_cache=True, logits=logits)
            self._n += k
            return None if out is None else out[0].float()
        self._embeds = embeds if self._embeds is None else torch.cat([self._embeds, embeds], dim=1)
        self._n += k
        out, _ = self.model(inputs_embeds=self._embeds, use_cache=False, logits=logits)
        if out is None:
            return None
        return out[0, -k:].float() if logits == "all" else out[0].float()

    @torch.inference_mode()
    def _eval(self, kind: str, rows, want_logits: bool) -> np.ndarray | None:
        embeds = self._embed_ids(rows) if kind == "text" else rows[None].to(self.dtype)
        out = self._run(embeds, "last" if want_logits else "none")
        if self.device == "cuda":
            torch.cuda.synchronize()
        return None if out is None else out[-1].cpu().numpy()

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> np.ndarray:
        return self._run(self._embed_ids(ids)).cpu().numpy()

    @torch.inference_mode()
    def _forward_last(self, ids: list[int]) -> np.ndarray:
        return self._run(self._embed_ids(ids), "last")[-1].cpu().numpy()

    def _reset(self) -> None:
        self._cache, self._embeds, self._n = None, None, 0

    def _truncate(self, n_past: int) -> None:
        if self.use_cache and self._cache is not None:
            truncate_cache(self._cache, n_past)
        if self._embeds is not None:
            self._embeds = self._embeds[:, :n_past]
        self._n = n_past

    def _snapshot(self) -> tuple[object, int]:
        if not self.use_cache:
            emb = None if self._embeds is None else self._embeds.clone()
            return (self._n, emb), 0 if emb is None else emb.numel() * emb.element_size()
        cache = copy.deepcopy(self._cache) if self._cache is not None else None
        nbytes = 0
        for layer in getattr(cache, "layers", []) or []:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    nbytes += t.numel() * t.element_size()
        return (self._n, cache), nbytes

    def _restore(self, state) -> None:
        n, saved = state
        if self.use_cache:
            self._cache = copy.deepcopy(saved) if saved is not None else None
        else:
            self._embeds = None if saved is None else saved.clone()
        self._n = n

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.device, str(self.model_path), precision=str(self.dtype).replace("torch.", ""),
                           extra={"parameters": sum(p.numel() for p in self.model.parameters()),
                                  "kv_cache": self.use_cache, "threads": self.threads,
                                  "dtype": f"{dtype_label(self.dtype)} ({self.dtype_reason})"})
