"""The torch backend's dtype: the accepted names (no torch: the command line checks them) and
what `auto` picks (imports torch when asked).

`auto`: bf16 on CUDA (fp16 where the GPU has no bf16), fp16 on Apple MPS, and on a CPU bf16 only
where this CPU runs bf16 matmuls faster than fp32, else fp32. The CPU question is answered by
timing a matmul at the model's hidden size, once per process (per hidden size and thread count),
at two shapes: one row (a decode step) and `PREFILL_ROWS` rows (a prefill). bf16 must win at
both, so decoding never gets slower: the AMD EPYC this was written on (AVX512_BF16, no AMX) ran
bf16 3.1x faster for 32 rows at hidden 2560 but 1.5x slower for one row, and stays fp32; torch's
capability string could not have told (`torch.backends.cpu.get_cpu_capability()` says "AVX512"
there). Where bf16 wins at both (AMX: Intel Sapphire Rapids and later, untested here) it also
halves the weights' memory.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import BackendOptionError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: accepted names -> the canonical one (None: the backend's default, fp32 on CPU and fp16 on GPUs)
DTYPE_NAMES = {"auto": "auto", "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
#: what the command line offers (`--dtype`)
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
SHORT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
#: rows of the prefill-shaped matmul the CPU check times (a decode step is one row)
PREFILL_ROWS = 64


def check_dtype(dtype: Any) -> Optional[str]:
    """`dtype` as its canonical name ("auto", "float32", "float16", "bfloat16") or None (the default);
    anything else raises BackendOptionError naming the value and the accepted names."""
    if dtype is None:
        return None
    if type(dtype).__name__ == "dtype" and str(dtype).startswith("torch."):  # a torch.dtype
        dtype = str(dtype).replace("torch.", "")
    name = DTYPE_NAMES.get(dtype.strip().lower()) if isinstance(dtype, str) else None
    if name is None:
        raise BackendOptionError(f"dtype (--dtype) must be auto, bf16, fp16 or fp32 (or bfloat16, float16, float32; "
                                 f"None for the default: fp32 on CPU, fp16 on a GPU), got {dtype!r}")
    return name


@dataclass(frozen=True)
class CpuBf16Timing:
    """One CPU check: median ms of a [rows, H] x [H, H] matmul in fp32 and bf16, per shape."""

    hidden: int
    threads: int
    fp32_ms: tuple[float, float]  # (1 row, PREFILL_ROWS rows)
    bf16_ms: tuple[float, float]

    @property
    def faster(self) -> bool:
        """bf16 beats fp32 at both shapes."""
        return all(b < f for b, f in zip(self.bf16_ms, self.fp32_ms))

    def line(self) -> str:
        ratios = [b / f if f > 0 else float("inf") for b, f in zip(self.bf16_ms, self.fp32_ms)]
        return (f"CPU bf16 matmul at hidden {self.hidden}, {self.threads} thread(s): {ratios[0]:.2f}x the fp32 time "
                f"for 1 row, {ratios[1]:.2f}x for {PREFILL_ROWS} rows")


def _time_matmul(x: "torch.Tensor", w: "torch.Tensor", samples: int = 5) -> float:
    """Median ms of x @ w (each sample repeats it enough to last ~1 ms on a fast CPU)."""
    reps = max(1, int(2e6 // (x.shape[0] * w.shape[0] * w.shape[1])))
    x @ w  # warm-up (first-call dispatch, page faults)
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ w
        out.append((time.perf_counter() - t0) * 1000.0 / reps)
    return sorted(out)[len(out) // 2]


@functools.lru_cache(maxsize=None)
def _cpu_bf16_timing(hidden: int, threads: int) -> CpuBf16Timing:
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, hidden, generator=g)
    xs = [torch.randn(rows, hidden, generator=g) for rows in (1, PREFILL_ROWS)]
    with torch.inference_mode():
        f32 = tuple(_time_matmul(x, w) for x in xs)
        wb = w.to(torch.bfloat16)
        b16 = tuple(_time_matmul(x.to(torch.bfloat16), wb) for x in xs)
    return CpuBf16Timing(hidden, threads, f32, b16)  # type: ignore[arg-type]


def cpu_bf16_timing(hidden: int) -> CpuBf16Timing:
    """The CPU check at `hidden` with torch's current thread count (timed once per process)."""
    import torch

    return _cpu_bf16_timing(int(hidden), torch.get_num_threads())


def cuda_bf16() -> bool:
    """A CUDA GPU with bf16 is here."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_dtype(dtype: Any, device: str, hidden: Callable[[], int],
                  cpu_check: Optional[Callable[[int], CpuBf16Timing]] = None) -> tuple["torch.dtype", str]:
    """(torch dtype, why) for `dtype` on the torch `device` ("cpu", "cuda", "mps"). `hidden()`
    gives the model's hidden size, asked only when auto must time the CPU; `cpu_check` replaces
    `cpu_bf16_timing` (tests)."""
    import torch

    name = check_dtype(dtype)
    if name is None:
        return (torch.float32 if device == "cpu" else torch.float16), f"default on {device}"
    if name != "auto":
        return getattr(torch, name), "asked"
    if device == "cuda":
        return (torch.bfloat16, "auto: CUDA with bf16") if cuda_bf16() else \
            (torch.float16, "auto: this CUDA GPU has no bf16")
    if device == "mps":
        return torch.float16, "auto: Apple MPS"
    t = (cpu_check or cpu_bf16_timing)(hidden())
    return (torch.bfloat16 if t.faster else torch.float32), f"auto: {t.line()}"


def dtype_label(dtype: Any) -> str:
    """fp32 / fp16 / bf16."""
    name = str(dtype).replace("torch.", "")
    return SHORT_NAMES.get(name, name)


__all__ = ["DTYPE_CHOICES", "DTYPE_NAMES", "PREFILL_ROWS", "CpuBf16Timing", "check_dtype", "cpu_bf16_timing",
           "dtype_label", "resolve_dtype"]
