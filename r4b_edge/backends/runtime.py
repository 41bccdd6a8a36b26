"""What every backend is loaded with: one device vocabulary (one alias table, one
resolver) and one thread count (`threads`, with a default that does not
oversubscribe a busy machine). Imports no backend library."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

from ..errors import BackendOptionError, BackendUnavailableError

#: what users may pass as `device` -> the canonical device. "mps" is any Apple GPU
#: (torch MPS, llama.cpp Metal, onnxruntime CoreML); "gpu" is whichever GPU is there.
DEVICE_ALIASES: dict[str, str] = {
    "auto": "auto", "cpu": "cpu", "cuda": "cuda", "gpu": "gpu",
    "mps": "mps", "metal": "mps", "apple": "mps", "coreml": "mps",
}
#: the order `auto` and `gpu` try the accelerators in
GPU_ORDER = ("cuda", "mps")
#: the most threads the default picks (more rarely helps a model this size, and it keeps a laptop usable)
MAX_DEFAULT_THREADS = 4
THREADS_ENV = "R4B_THREADS"


def canonical_device(device: Any) -> str:
    """The canonical name of a `device` argument (None means auto)."""
    key = "auto" if device is None else device
    if not isinstance(key, str) or key.strip().lower() not in DEVICE_ALIASES:
        raise BackendUnavailableError(
            f"unknown device {device!r}: use one of {', '.join(DEVICE_ALIASES)}")
    return DEVICE_ALIASES[key.strip().lower()]


def resolve_device(device: Any, backend: str, available: Mapping[str, bool],
                   fixes: Mapping[str, str] | None = None) -> str:
    """The canonical device to run on: `auto` takes the first available of
    cuda, mps, else cpu; `gpu` the first available accelerator; an explicit
    device that `available` says is missing raises BackendUnavailableError
    with the backend's fix (`fixes[device]`)."""
    dev = canonical_device(device)
    if dev == "cpu":
        return dev
    if dev in ("auto", "gpu"):
        for d in GPU_ORDER:
            if available.get(d):
                return d
        if dev == "auto":
            return "cpu"
        dev_missing = "gpu"
    else:
        if available.get(dev):
            return dev
        dev_missing = dev
    fix = (fixes or {}).get(dev_missing) or (fixes or {}).get("gpu") or ""
    raise BackendUnavailableError(
        f"device {device!r} is not available to the {backend} backend here"
        + (f": {fix}" if fix else "") + "; or use --device cpu")


def physical_cores() -> int:
    """Physical CPU cores (psutil when installed, else the Linux topology, else half the logical CPUs)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    if cores:
        return len(cores)
    return max(1, (os.cpu_count() or 2) // 2)


def default_threads() -> int:
    """Threads when the caller gives none: $R4B_THREADS if set, else the physical
    cores that the 1-minute load average says are idle, at most
    MAX_DEFAULT_THREADS, at least 1. Compute threads that share a core with
    another busy process stall at every op's barrier (measured on a 2-core box:
    see docs/design.md, "Threads")."""
    env = os.environ.get(THREADS_ENV)
    if env:
        return check_threads(_env_int(env))
    try:
        busy = int(round(os.getloadavg()[0]))
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(MAX_DEFAULT_THREADS, physical_cores() - busy))


def _env_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        raise BackendOptionError(f"${THREADS_ENV} must be a whole number >= 1, got {text!r}") from None


def check_threads(threads: Any) -> int:
    """`threads` as an int >= 1 (None -> `default_threads()`)."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BackendOptionError(f"threads must be a whole number >= 1 (or None for the default), got {threads!r}")
    return threads


def check_n_ctx(n_ctx: Any) -> Any:
    """`n_ctx` (the context a backend is loaded with) as an int >= 1, or None for the backend's
    default; every backend caps it at the model's own context (`max_position_embeddings`)."""
    if n_ctx is None:
        return None
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise BackendOptionError(f"n_ctx (--n-ctx) must be a whole number of positions >= 1 (or None for the "
                                 f"backend's default), got {n_ctx!r}")
    return n_ctx


def is_macos() -> bool:
    return sys.platform == "darwin"
