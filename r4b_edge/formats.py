"""File-format facts, each written once: the writers (`export/`) and the readers
(`r4b_edge.backends`) both import them from here (pure data, no imports).

GGUF pair (llama.cpp): a text model (arch `qwen3`) carrying the R-4B config and the HF tokenizer as
metadata, and an mmproj (arch `clip`) carrying `image_newline`. ONNX folder (onnxruntime): three
graphs + `image_newline.npy` + `genai_config.json` (format name and version checked on read). Both carry
the model's mean reply lengths when it has eval results (`model.reply_lengths`: deadline mode's priors).
"""
from __future__ import annotations

from dataclasses import dataclass

# ---- GGUF -------------------------------------------------------------------------------------
GGUF_R4B_CONFIG_KEY = "r4b.config"                # the R-4B config.json as one JSON string
GGUF_HF_JSON_KEY = "tokenizer.huggingface.json"   # gguf.Keys.Tokenizer.HF_JSON: the whole tokenizer.json
GGUF_IMAGE_NEWLINE = "v.image_newline"            # mmproj tensor: R-4B's model.image_newline
# the model's mean reply lengths (JSON, `model.reply_lengths.ReplyLengths.to_dict`), from its eval results
GGUF_REPLY_LENGTHS_KEY = "r4b.reply_lengths"


@dataclass(frozen=True)
class QuantSpec:
    """How one GGUF `--quant` name is produced."""

    name: str
    python_type: str | None  # GGMLQuantizationType name written by gguf-py, or None
    llama_ftype: int | None  # llama_ftype for llama_model_quantize, or None
    file_type: int           # general.file_type (LlamaFileType value)


# LlamaFileType values (gguf.constants.LlamaFileType); llama_ftype uses the same numbers.
# The order is the one `r4b-edge export --help` lists.
GGUF_QUANT_SPECS: dict[str, QuantSpec] = {
    "F16": QuantSpec("F16", "F16", None, 1),
    "Q8_0": QuantSpec("Q8_0", "Q8_0", None, 7),
    "Q4_K_M": QuantSpec("Q4_K_M", None, 15, 15),
    "Q4_K_S": QuantSpec("Q4_K_S", None, 14, 14),
    "Q5_K_M": QuantSpec("Q5_K_M", None, 17, 17),
    "Q6_K": QuantSpec("Q6_K", None, 18, 18),
    "Q4_0": QuantSpec("Q4_0", None, 2, 2),
    "Q5_0": QuantSpec("Q5_0", None, 8, 8),
    "F32": QuantSpec("F32", "F32", None, 0),
}
GGUF_QUANTS: tuple[str, ...] = tuple(GGUF_QUANT_SPECS)
GGUF_MMPROJ_QUANTS: tuple[str, ...] = ("F16", "Q8_0", "F32")

# ---- ONNX -------------------------------------------------------------------------------------
ONNX_GENAI_CONFIG = "genai_config.json"
ONNX_FORMAT_NAME = "r4b-edge-onnx"
ONNX_FORMAT_VERSION = 1                           # readers refuse a newer version
ONNX_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-dynamic", "int4")
ONNX_VISION_FILE, ONNX_EMBED_FILE, ONNX_DECODER_FILE = "vision.onnx", "embed.onnx", "decoder.onnx"
ONNX_NEWLINE_FILE = "image_newline.npy"
ONNX_REPLY_LENGTHS_FILE = "reply_lengths.json"    # as GGUF_REPLY_LENGTHS_KEY; absent without eval results
# protobuf's hard limit is 2 GiB: graphs over this are saved as <graph>.onnx + <graph>.onnx.data
ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000

__all__ = [
    "GGUF_HF_JSON_KEY", "GGUF_IMAGE_NEWLINE", "GGUF_MMPROJ_QUANTS", "GGUF_QUANTS", "GGUF_QUANT_SPECS",
    "GGUF_R4B_CONFIG_KEY", "GGUF_REPLY_LENGTHS_KEY", "ONNX_DECODER_FILE", "ONNX_EMBED_FILE", "ONNX_EXTERNAL_DATA_BYTES",
    "ONNX_FORMAT_NAME", "ONNX_FORMAT_VERSION", "ONNX_GENAI_CONFIG", "ONNX_NEWLINE_FILE",
    "ONNX_PRECISIONS", "ONNX_REPLY_LENGTHS_FILE", "ONNX_VISION_FILE", "QuantSpec",
]
