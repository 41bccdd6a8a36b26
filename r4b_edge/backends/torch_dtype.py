"""The torch backend's dtype: the accepted names (no torch: the command line checks them) and
what `auto` picks (imports torch when asked).

`auto`: bf16 on CUDA (fp16 where the GPU has no bf16), fp16 on Apple MPS, and on a CPU bf16 only
where this CPU runs bf16 matmuls faster than fp32, else fp32. The CPU question is answered by
timing a matmul at the model's hidden size, once per process (per hidden size and thread count),
at two shapes: one row (a decode step) and `PREFILL_ROWS` rows (a prefill), fp32 and bf16
interleaved, the fastest of 7 samples each. bf16 is chosen where it is clearly faster for the
prefill (`BF16_PREFILL_MAX_RATIO`) and not clearly slower for a decode step
(`BF16_DECODE_MAX_RATIO`); it also halves the weights' memory. On the shared 2-core AMD EPYC this
was written on (AVX512_BF16, no AMX) at hidden 2560: 0.27-0.32x fp32's time for 64 rows, 0.90-1.10x
for one row (4.9x in one run with 2 threads while another job held a core, which keeps fp32:
the check is one process's, and a loaded machine can tip it; `--dtype` pins it). torch's
capability string cannot tell (`torch.backends.cpu.get_cpu_capability()` says "AVX512" there).
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
#: bf16 on a CPU: its prefill-shaped matmul must take at most this share of fp32's time ...
BF16_PREFILL_MAX_RATIO = 0.9
#: ... and its one-row (decode) matmul at most this share: a tie within the check's noise (measured
#: 0.90-1.10x run to run on the machine below) does not keep fp32, a clear loss does
BF16_DECODE_MAX_RATIO = 1.25


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
    """One CPU check: the fastest ms of a [rows, H] x [H, H] matmul in fp32 and bf16, per shape."""

    hidden: int
    threads: int
    fp32_ms: tuple[float, float]  # (1 row, PREFILL_ROWS rows)
    bf16_ms: tuple[float, float]

    @property
    def ratios(self) -> tuple[float, float]:
        """bf16 time / fp32 time for 1 row and for PREFILL_ROWS rows."""
        r = [b / f if f > 0 else float("inf") for b, f in zip(self.bf16_ms, self.fp32_ms)]
        return r[0], r[1]

    @property
    def faster(self) -> bool:
        """bf16 clearly faster for a prefill and not clearly slower for a decode step."""
        decode, prefill = self.ratios
        return prefill <= BF16_PREFILL_MAX_RATIO and decode <= BF16_DECODE_MAX_RATIO

    def line(self) -> str:
        ratios = self.ratios
        return (f"CPU bf16 matmul at hidden {self.hidden}, {self.threads} thread(s): {ratios[0]:.2f}x the fp32 time "
                f"for 1 row, {ratios[1]:.2f}x for {PREFILL_ROWS} rows")


def _time_pair(x: "torch.Tensor", w: "torch.Tensor", samples: int = 7) -> tuple[float, float]:
    """(fp32 ms, bf16 ms) of x @ w: the fastest of `samples` interleaved samples each (each sample
    repeats the product to last ~1 ms), so a neighbour's load slows both sides alike and the
    fastest sample is the CPU's own speed."""
    import torch

    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    reps = max(1, int(2e6 // (x.shape[0] * w.shape[0] * w.shape[1])))
    best = [float("inf"), float("inf")]
    for a, b in ((x, w), (xb, wb)):
        a @ b  # warm-up (first-call dispatch, page faults)
    for _ in range(samples):
        for i, (a, b) in enumerate(((x, w), (xb, wb))):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best[i] = min(best[i], (time.perf_counter() - t0) * 1000.0 / reps)
    return best[0], best[1]


@functools.lru_cache(maxsize=None)
def _cpu_bf16_timing(hidden: int, threads: int) -> CpuBf16Timing:
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, hidden, generator=g)
    with torch.inference_mode():
        pairs = [_time_pair(torch.randn(rows, hidden, generator=g), w) for rows in (1, PREFILL_ROWS)]
    return CpuBf16Timing(hidden, threads, (pairs[0][0], pairs[1][0]), (pairs[0][1], pairs[1][1]))


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
