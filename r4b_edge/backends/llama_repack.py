"""Whether llama.cpp may repack a GGUF's weights into its CPU "extra buffer types".

llama.cpp moves quantized weights into CPU-specific layouts at load time (AMX tiles on Intel
Xeons with AMX, KleidiAI on ARM, the generic x86/ARM repack) when
`llama_model_params.use_extra_bufts` is on, its default. On AMX CPUs the AMX path dies with
SIGSEGV in `ggml_backend_amx_mul_mat` on the first decode of a Q8_0/Q4_0/Q4_K file (llama.cpp
issue 20824, unfixed upstream): a native crash no Python code can catch. This module owns the
choice (`auto` | `on` | `off`, from the caller, else `$R4B_LLAMA_REPACK`, else `auto`):

- `on` / `off`: as told.
- `auto`: on when the file has no weight type any extra buffer type repacks (F32/F16/BF16 only);
  off when llama.cpp's CPU backend was built with AMX (`AMX_INT8 = 1` in its system info), the
  known fault; off for a text file over `LARGE_MODEL_BYTES` (1 GiB: a real-size model, where the
  repacked copy costs GBs of memory and, measured at R-4B's size, a slower prefill); otherwise a
  one-time probe: a child process loads the file with repacking on and
  decodes a few tokens. A child that dies turns repacking off. The verdict is cached on disk in
  the store folder, keyed by llama.cpp's build, the CPU and the file's weight types, so the probe
  runs once per machine and kind of file.

Never imports torch; the probe child is `python -m r4b_edge.backends.llama_probe`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import BackendOptionError, describe_exit
from ..fsutil import atomic_write
from ..store import store_root

SETTINGS = ("auto", "on", "off")
ENV = "R4B_LLAMA_REPACK"
#: test hook read by the probe child only: "segv" makes a child that repacks kill itself with
#: SIGSEGV after loading, as llama.cpp does on AMX CPUs (tests/backends/test_llama_repack.py)
CRASH_HOOK_ENV = "R4B_LLAMA_PROBE_CRASH"
#: weight types no CPU extra buffer type repacks (llama.cpp's AMX, KleidiAI and repack code)
PLAIN_TYPES = frozenset({"F32", "F16", "BF16"})
UPSTREAM_ISSUE = "llama.cpp issue 20824"
FIX = f"--llama-repack off (or {ENV}=off)"
PROBE_TIMEOUT_S = 600.0
CACHE_NAME = "llama-repack.json"


# ---- what this machine is ------------------------------------------------------------------------
def llama_system_info() -> str:
    """llama.cpp's own system info line (the CPU features its kernels were built for)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def parse_features(system_info: str) -> dict[str, bool]:
    """`CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ...` -> {"SSE3": True, ...}."""
    out: dict[str, bool] = {}
    for part in system_info.replace("\n", "|").split("|"):
        if "=" not in part:
            continue
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name:
            out[name] = value.strip() not in ("0", "")
    return out


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the OS reports them (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_report() -> dict:
    """What `r4b-edge info` prints: the CPU, the OS's AMX flags and llama.cpp's view of it."""
    import llama_cpp

    sysinfo = llama_system_info()
    feats = parse_features(sysinfo)
    return {"cpu": cpu_name(), "machine": platform.machine(),
            "os_amx_flags": sorted(f for f in cpu_flags() if f.startswith("amx")),
            "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
            "llama_features": sorted(k for k, v in feats.items() if v and k.isupper()),
            "llama_amx": build_has_amx(feats)}


def build_has_amx(features: dict[str, bool]) -> bool:
    """llama.cpp's CPU backend was built with its AMX kernels (and so has the AMX buffer type)."""
    return any(v for k, v in features.items() if k.startswith("AMX"))


def weight_types(text_gguf: str | Path) -> list[str]:
    """The tensor types in a GGUF file, sorted ("F32", "Q4_K", "Q6_K", ...)."""
    import gguf

    r = gguf.GGUFReader(str(text_gguf))
    return sorted({t.tensor_type.name for t in r.tensors})


# ---- the setting -------------------------------------------------------------------------------
def repack_setting(value: str | None = None) -> str:
    """The caller's value, else `$R4B_LLAMA_REPACK`, else "auto"; anything else is an error."""
    source = "repack"
    if value is None:
        value, source = os.environ.get(ENV) or "auto", ENV
    v = str(value).strip().lower()
    v = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(v, v)
    if v not in SETTINGS:
        raise BackendOptionError(f"{source}={value!r} is not a repack setting: use one of {', '.join(SETTINGS)}")
    return v


def add_cli_arg(parser) -> None:
    """`--llama-repack {auto,on,off}` for every verb that loads or verifies a GGUF."""
    parser.add_argument("--llama-repack", default=None, choices=list(SETTINGS),
                        help=f"llama backend: let llama.cpp repack quantized weights for this CPU (default: ${ENV}, "
                             "else auto: off where it is known to crash, e.g. AMX CPUs, and for models over 1 GiB; "
                             "`r4b-edge info` says which)")


@dataclass(frozen=True)
class ProbeResult:
    """A probe child's outcome."""
    ok: bool
    returncode: int
    seconds: float
    detail: str = ""

    def describe(self) -> str:
        if self.ok:
            return "decoded normally"
        return describe_exit(self.returncode) + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class RepackChoice:
    """Whether the llama backend loads with `use_extra_bufts`, and why."""
    use_extra_bufts: bool
    setting: str
    reason: str
    probe: ProbeResult | None = None   # the probe run by this call (None: no probe, or cached)
    cached: bool = False               # the verdict came from the on-disk cache
    key: str = field(default="", repr=False)

    def line(self) -> str:
        return f"repack {'on' if self.use_extra_bufts else 'off'} ({self.setting}: {self.reason})"


def crash_hint(returncode: int) -> str:
    """The likely cause of a llama.cpp child's death, with the fix, for an error line."""
    if returncode >= 0:
        return ""
    feats = {}
    try:
        feats = parse_features(llama_system_info())
    except Exception:  # pragma: no cover - llama_cpp missing: no hint to give
        pass
    amx = " on this AMX CPU" if build_has_amx(feats) else ""
    return (f"llama.cpp crashed natively{amx}; repacked quantized weights are a known cause "
            f"({UPSTREAM_ISSUE}): retry with {FIX}")


# ---- the probe -----------------------------------------------------------------------------------
def probe(text_gguf: str | Path, use_extra_bufts: bool = True, mmproj: str | Path | None = None,
          threads: int = 1, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Load `text_gguf` in a child process and decode a few tokens (and encode one view through
    `mmproj` when given); a native crash kills the child, not the caller."""
    cmd = [sys.executable, "-m", "r4b_edge.backends.llama_probe", str(text_gguf),
           "--extra-bufts", "on" if use_extra_bufts else "off", "--threads", str(int(threads))]
    if mmproj is not None:
        cmd += ["--mmproj", str(mmproj)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, -int(signal.SIGKILL), time.perf_counter() - t0, f"no answer within {timeout:.0f} s")
    secs = time.perf_counter() - t0
    if proc.returncode == 0 and '"ok": true' in proc.stdout:
        return ProbeResult(True, 0, secs)
    tail = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()][-2:]
    return ProbeResult(False, proc.returncode or 1, secs, " | ".join(tail)[:400])


def _cache_path(root: Path | None) -> Path:
    return (root or store_root()) / CACHE_NAME


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    data = _read_cache(path)
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError:  # a read-only cache folder costs a probe next time, nothing else
        pass


def probe_key(system_info: str, types: Iterable[str]) -> str:
    """One machine x llama.cpp build x kind of file."""
    import llama_cpp

    parts = [getattr(llama_cpp, "__version__", "?"), system_info, cpu_name(), platform.machine(),
             " ".join(sorted(cpu_flags())), ",".join(sorted(types))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


#: text GGUFs above this size load without repacking under `auto`: measured at R-4B's true size
#: (2.5 GiB Q4_K_M, 2 threads, AMD EPYC Zen 5, no AMX), repacking took the peak RSS from 4,820 to
#: 6,490 MiB (1.06x -> 1.45x of files + KV) and made the prefill 1.6x slower (14.6 vs 23-25 ms a
#: position) for a 1.4x faster decode; a small model keeps llama.cpp's default (repacking on).
LARGE_MODEL_BYTES = 1 << 30


def choose(setting: str | None, text_gguf: str | Path, types: Iterable[str] | None = None, *,
           features: dict[str, bool] | None = None, cache_root: Path | None = None,
           threads: int = 1) -> RepackChoice:
    """Decide `use_extra_bufts` for loading `text_gguf` (see the module docstring).
    `types`: the file's weight types (read from the file if None); `features`: llama.cpp's
    CPU features (read from the installed build if None)."""
    setting = repack_setting(setting)
    if setting == "on":
        return RepackChoice(True, setting, "asked for")
    if setting == "off":
        return RepackChoice(False, setting, "asked for")
    types = sorted(types if types is not None else weight_types(text_gguf))
    packable = [t for t in types if t not in PLAIN_TYPES]
    if not packable:
        return RepackChoice(True, setting, f"no weights to repack ({', '.join(types)})")
    sysinfo = llama_system_info() if features is None else ""
    feats = features if features is not None else parse_features(sysinfo)
    if build_has_amx(feats):
        return RepackChoice(False, setting, f"llama.cpp's AMX repack of {', '.join(packable)} crashes on the first "
                                            f"decode ({UPSTREAM_ISSUE})")
    size = Path(text_gguf).stat().st_size if Path(text_gguf).is_file() else 0
    if size > LARGE_MODEL_BYTES:
        return RepackChoice(False, setting, f"a {size / 2**30:.1f} GiB model: repacking would add ~50% of the "
                                            "weights to resident memory and slow the prefill of an image prompt "
                                            "(docs/gguf.md; --llama-repack on for long decodes)")
    key = probe_key(sysinfo or json.dumps(feats, sort_keys=True), types)
    path = _cache_path(cache_root)
    hit = _read_cache(path).get(key)
    if isinstance(hit, dict) and "ok" in hit:
        return RepackChoice(bool(hit["ok"]), setting, str(hit.get("reason", "")), cached=True, key=key)
    res = probe(text_gguf, True, threads=threads)
    if res.ok:
        reason = f"a probe decoded {', '.join(packable)} with repacking on ({res.seconds:.1f} s, once per machine)"
    else:
        reason = f"a probe with repacking on was {res.describe()}"
    _write_cache(path, key, {"ok": res.ok, "reason": reason, "returncode": res.returncode,
                             "probe_s": round(res.seconds, 3), "types": types, "cpu": cpu_name(),
                             "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return RepackChoice(res.ok, setting, reason, probe=res, key=key)


@contextlib.contextmanager
def stock_llama_params(use_extra_bufts: bool) -> Iterator[None]:
    """While open, llama-cpp-python's high-level `Llama(...)` (which has no parameter for it) loads
    models with `use_extra_bufts` as given: for baselines compared with the llama backend."""
    import llama_cpp.llama_cpp as C

    orig = C.llama_model_default_params

    def patched():
        p = orig()
        p.use_extra_bufts = bool(use_extra_bufts)
        return p

    C.llama_model_default_params = patched
    try:
        yield
    finally:
        C.llama_model_default_params = orig


def cached_verdicts(cache_root: Path | None = None) -> Iterator[tuple[str, dict]]:
    """The probe verdicts on disk (for `info`)."""
    yield from _read_cache(_cache_path(cache_root)).items()


def choice_dict(c: RepackChoice) -> dict:
    d = asdict(c)
    d.pop("key", None)
    return d
