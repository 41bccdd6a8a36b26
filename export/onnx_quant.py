"""Precision conversion of exported ONNX graphs with onnxruntime's own tools.

- decoder int8: `MatMulNBitsQuantizer(bits=8)`: int8 weights with one scale per block of 32,
  activations quantized per block at run time (accuracy_level 4). On a trained checkpoint this
  kept 18/24 greedy prompts identical (max logit diff 0.6) where `quantize_dynamic` (per-tensor
  activation scales) kept 12/24 (4.4), at about the same CPU speed.
- decoder int4: `MatMulNBitsQuantizer(bits=4)`, symmetric, block 32, except the LM head, which
  gets bits=8 (int4 on the head alone moved 12 of 24 greedy prompts on a trained checkpoint).
- vision int8 (both): `onnxruntime.quantization.quantize_dynamic`, per-channel int8 weights, on
  MatMul/Gemm with constant weights only (attention's activation products stay float).
- fp16: `onnxruntime.transformers.float16.convert_float_to_float16` with graph IO kept float32
  (casts at the edges), for EPs with fp16 kernels (CUDA, CoreML).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from r4b_edge import formats
from r4b_edge.errors import ExportError

INT4_BLOCK_SIZE = 32


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _save(model, dst: Path, big: bool) -> None:  # noqa: ANN001
    import onnx

    onnx.save_model(model, str(dst), save_as_external_data=big,
                    location=dst.name + ".data" if big else None)


def copy_graph(src: Path, dst: Path) -> None:
    """Copy a graph and its external data file (if any)."""
    shutil.copyfile(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        shutil.copyfile(data, dst.with_name(dst.name + ".data"))


def quantize_int8(src: Path, dst: Path, per_channel: bool = True) -> None:
    """Dynamic int8 quantization of the constant-weight MatMul/Gemm nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=_size(src) // 4 > formats.ONNX_EXTERNAL_DATA_BYTES,
                     extra_options={"MatMulConstBOnly": True})


def lm_head_node(model) -> str | None:  # noqa: ANN001
    """Name of the MatMul/Gemm (or MatMulNBits, once quantized) producing `logits`: the LM head."""
    producers = {o: n for n in model.graph.node for o in n.output}
    n = producers.get("logits")
    while n is not None and n.op_type not in ("MatMul", "Gemm", "MatMulNBits"):
        n = producers.get(n.input[0]) if n.input else None
    return n.name if n is not None else None


def _nbits(model, bits: int, block_size: int, accuracy_level: int | None, exclude=(), include=None):  # noqa: ANN001
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level, nodes_to_exclude=list(exclude),
                             nodes_to_include=include)
    q.process()
    return q.model.model


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int = INT4_BLOCK_SIZE,
                   accuracy_level: int | None = 4, head_bits: int | None = None) -> None:
    """Weight-only `bits` quantization (MatMulNBits, symmetric, `block_size`); the LM head gets
    `head_bits` when given. accuracy_level 4 lets the CPU EP compute in int8 (a fp32 fallback
    kernel for 8-bit weights is ~20x slower)."""
    import onnx

    model = onnx.load(str(src))
    head = lm_head_node(model) if head_bits and head_bits != bits else None
    model = _nbits(model, bits, block_size, accuracy_level, exclude=[head] if head else ())
    if head:
        model = _nbits(model, head_bits, block_size, accuracy_level, include=[head])
    _save(model, dst, _size(src) * bits // 32 > formats.ONNX_EXTERNAL_DATA_BYTES)


def to_fp16(src: Path, dst: Path) -> None:
    """float16 weights and compute; inputs and outputs stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    _save(m, dst, _size(src) // 2 > formats.ONNX_EXTERNAL_DATA_BYTES)


def convert(raw: Path, out: Path, precision: str, names: tuple[str, ...]) -> dict[str, str]:
    """Write each fp32 graph `raw/<name>` to `out/<name>` at `precision`; returns
    {graph stem: what it got}. int8/int4 are weight-only MatMulNBits on the decoder; the vision
    graph gets dynamic int8 for both."""
    done: dict[str, str] = {}
    for name in names:
        src, dst = raw / name, out / name
        stem = Path(name).stem
        want = "int8" if precision == "int4" and stem == "vision" else precision
        if want == "fp32":
            copy_graph(src, dst)
        elif want == "fp16":
            to_fp16(src, dst)
        elif want in ("int8", "int8-dynamic") and stem == "vision":
            quantize_int8(src, dst)
        elif want == "int8-dynamic":  # onnxruntime's quantize_dynamic on the decoder too
            quantize_int8(src, dst)
        elif want == "int8":
            quantize_nbits(src, dst, bits=8)
        elif want == "int4":
            quantize_nbits(src, dst, bits=4, head_bits=8)
        else:
            raise ExportError(f"unknown precision {precision!r}: use fp32, fp16, int8, int8-dynamic or int4")
        done[stem] = want
    return done
