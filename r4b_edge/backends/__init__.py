"""Backend registry: which backends exist, which are installed, and which one
a model path needs. Importing this module imports no backend library."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import BackendOptionError, BackendUnavailableError, ModelFormatError, ModelNotFoundError
from ..formats import ONNX_GENAI_CONFIG
from .base import Backend
from .runtime import check_n_ctx

# name -> (module that must be importable, extra that installs it, implementation)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("torch", "r4b-edge[torch]", "r4b_edge.backends.torch_backend:TorchBackend"),
    "llama": ("llama_cpp", "r4b-edge[llama]", "r4b_edge.backends.llama_backend:LlamaBackend"),
    "onnx": ("onnxruntime", "r4b-edge[onnx]", "r4b_edge.backends.onnx_backend:OnnxBackend"),
}


def is_installed(name: str) -> bool:
    """True when the library behind backend `name` can be imported."""
    module = BACKENDS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> dict[str, bool]:
    return {name: is_installed(name) for name in BACKENDS}


def detect_format(path: str | Path) -> str:
    """The backend a model path needs: a .gguf file or a folder of them ->
    llama; a folder with genai_config.json -> onnx; an R-4B folder -> torch."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist: pass a model folder or a .gguf file")
    if p.is_file():
        if p.suffix == ".gguf":
            return "llama"
        if p.suffix == ".onnx" or p.name == ONNX_GENAI_CONFIG:
            return "onnx"
        raise ModelFormatError(f"{p} is not a model: pass an R-4B folder, a .gguf file or an ONNX export folder")
    if (p / "config.json").exists():
        return "torch"
    if (p / ONNX_GENAI_CONFIG).exists():
        return "onnx"
    if any(p.glob("*.gguf")):
        return "llama"
    raise ModelFormatError(
        f"{p} holds no config.json (R-4B checkpoint), genai_config.json (ONNX export) or .gguf file"
    )


#: what every backend is loaded with (backends/runtime.py; `n_ctx`: llama allocates that KV cache,
#: torch and onnx take it as a bound), then each one's own keyword arguments
COMMON_LOAD_OPTIONS = ("device", "threads", "n_ctx")
LOAD_OPTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("dtype", "use_cache"),
    "llama": ("n_batch", "mmproj", "verbose", "repack"),
    "onnx": (),
}


def create_backend(path: str | Path, backend: str = "auto", device: str = "auto", **kwargs) -> Backend:
    """Load the model at `path` with `backend` (auto: by the files found). Every backend
    takes `device` and `threads`; the others are in LOAD_OPTIONS, and any other name
    raises BackendOptionError."""
    fmt = detect_format(path)
    name = fmt if backend in ("auto", None) else backend
    if name == "llama" and Path(path).is_dir() and any(Path(path).glob("*.gguf")):
        fmt = "llama"  # a checkpoint folder that also holds a GGUF export
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}: use one of auto, {', '.join(BACKENDS)}")
    if name != fmt:
        raise ModelFormatError(
            f"backend {name!r} cannot run {path}: that is a {fmt!r} model "
            f"(export it first with `r4b-edge export --format {'gguf' if name == 'llama' else 'onnx'}`)"
        )
    unknown = sorted(set(kwargs) - set(COMMON_LOAD_OPTIONS) - set(LOAD_OPTIONS[name]))
    if unknown == ["repack"]:
        raise BackendOptionError(f"repack (--llama-repack) is a llama backend option (GGUF models); {path} runs on "
                                 f"the {name} backend: leave it out, or pass a GGUF model")
    if unknown == ["dtype"]:
        raise BackendOptionError(f"dtype (--dtype) is a torch backend option (R-4B folders); {path} runs on the "
                                 f"{name} backend, whose precision is the exported file's ("
                                 f"{'the GGUF quant' if name == 'llama' else 'the ONNX export precision'}): "
                                 "leave it out, or pass an R-4B folder")
    check_n_ctx(kwargs.get("n_ctx"))
    if unknown:
        raise BackendOptionError(
            f"unknown argument(s) {', '.join(unknown)} for the {name} backend: it takes "
            f"{', '.join(COMMON_LOAD_OPTIONS + LOAD_OPTIONS[name])}")
    module, extra, target = BACKENDS[name]
    if not is_installed(name):
        raise BackendUnavailableError(
            f"backend {name!r} needs the Python package {module!r}, which is not installed: "
            f"pip install '{extra}'"
        )
    mod_name, cls_name = target.split(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except ModuleNotFoundError as e:
        raise BackendUnavailableError(f"backend {name!r} is not available in this build: {e}") from None
    return cls(path, device=device, **kwargs)


def backend_devices(name: str) -> list[str]:
    """Devices backend `name` can use here (imports the backend's library)."""
    if not is_installed(name):
        return []
    if name == "torch":
        import torch

        devs = ["cpu"]
        if torch.cuda.is_available():
            devs.insert(0, f"cuda ({torch.cuda.get_device_name(0)})")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devs.insert(0, "mps")
        return devs
    if name == "llama":
        from .llama_backend import build_info

        b = build_info()
        return ([f"gpu offload ({b['build']} build)"] if b["gpu_offload"] else []) + [
            f"cpu (llama-cpp-python {b['llama_cpp_python']}, {b['build']} build)"]
    if name == "onnx":
        import onnxruntime as ort

        return list(ort.get_available_providers())
    return []
