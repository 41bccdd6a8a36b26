"""Quantization types of the GGUF export and the two ways they are made.

- Python side (`gguf.quants`, streamed row chunk by row chunk while writing):
  F32, F16, Q8_0 — used for the text model when it fits and for the mmproj.
- llama.cpp side (`llama_cpp.llama_model_quantize` on an F16 intermediate):
  the K-quants (Q4_K_M, Q4_K_S, Q5_K_M, Q6_K) and Q4_0/Q5_0. llama.cpp keeps
  its own per-tensor recipe (e.g. Q4_K_M puts some attn_v/ffn_down in Q6_K);
  rows that are not a multiple of 256 fall back to Q5_0/Q8_0 there.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from r4b_edge.errors import ExportError
from r4b_edge.formats import GGUF_MMPROJ_QUANTS, GGUF_QUANT_SPECS, GGUF_QUANTS, QuantSpec


def quant_spec(name: str, mmproj: bool = False) -> QuantSpec:
    """The spec of `name` (case-insensitive); ExportError lists the valid names."""
    key = str(name).upper().replace("-", "_")
    valid = GGUF_MMPROJ_QUANTS if mmproj else GGUF_QUANTS
    if key not in valid:
        what = "mmproj quant" if mmproj else "quant type"
        raise ExportError(f"unknown {what} {name!r}: use one of {', '.join(valid)}")
    return GGUF_QUANT_SPECS[key]


def ggml_type(name: str):
    """gguf.GGMLQuantizationType by name."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def tensor_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes a tensor of `shape` (torch order) takes as `type_name`."""
    from gguf import GGML_QUANT_SIZES

    n = int(np.prod(shape)) if shape else 1
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    if shape[-1] % block:
        raise ExportError(f"tensor row of {shape[-1]} values is not a multiple of the {type_name} block ({block})")
    return n // block * size


def fits(shape: tuple[int, ...], type_name: str) -> bool:
    """True when rows of `shape` can be stored as `type_name` (block-aligned)."""
    from gguf import GGML_QUANT_SIZES

    return shape[-1] % GGML_QUANT_SIZES[ggml_type(type_name)][0] == 0


def convert_chunk(chunk: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows -> the bytes (or float array) to write for `type_name`."""
    if type_name == "F32":
        return np.ascontiguousarray(chunk, dtype=np.float32)
    if type_name == "F16":
        if chunk.size and float(np.abs(chunk).max()) > 65504.0:
            raise ExportError(f"a weight of {float(np.abs(chunk).max()):.4g} overflows float16: "
                              "export with --quant F32 (or Q8_0)")
        return np.ascontiguousarray(chunk.astype(np.float16))
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(chunk, dtype=np.float32), ggml_type(type_name))


def llama_quantize(src: str | os.PathLike, dst: str | os.PathLike, spec: QuantSpec,
                   nthread: int = 0) -> None:
    """Quantize the text GGUF `src` into `dst` with llama.cpp (K-quants etc.).

    Metadata (tokenizer, chat template, r4b.* keys) is copied by llama.cpp."""
    if spec.llama_ftype is None:
        raise ExportError(f"{spec.name} is written directly, not through llama_model_quantize")
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"{spec.name} needs llama-cpp-python (pip install 'r4b-edge[export]'): {e}") from None
    from r4b_edge.backends.llama_backend import quiet_llama

    quiet_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec.llama_ftype
    params.nthread = nthread or (os.cpu_count() or 1)
    import ctypes

    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise ExportError(f"llama_model_quantize to {spec.name} failed (code {rc}) on {src}")
