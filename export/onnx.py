"""Export an R-4B checkpoint to ONNX for onnxruntime (`r4b-edge export --format onnx`).

The export folder holds three graphs and what the runtime needs to run them without torch:

- ``vision.onnx``: pixel_values [views, 3, S, S] -> image_features [views, S/p * S/p, hidden]
  (SigLIP hidden state of `vision_feature_layer` + LayerNorm/MLP projector, per view). The
  AnyRes packing (unpadding, ``image_newline`` per row) is done by the backend in numpy.
- ``embed.onnx``: input_ids [batch, seq] int64 -> inputs_embeds [batch, seq, hidden] float32.
- ``decoder.onnx``: inputs_embeds, attention_mask [batch, total], position_ids [batch, seq],
  logits_index [k] (positions whose logits are wanted), past_key_values.{i}.key/value
  [batch, kv_heads, past, head_dim] -> logits [batch, k, vocab], present.{i}.key/value
  [batch, kv_heads, past + seq, head_dim]. Batch and all lengths are dynamic.
- ``image_newline.npy``, the tokenizer files, ``genai_config.json`` (shapes, IO names, special
  tokens, chat template, image token counts, the R-4B config) and ``manifest.json`` (sha256);
  ``reply_lengths.json`` when the source folder has eval results (the model's mean reply lengths,
  deadline mode's priors: `r4b_edge.model.reply_lengths`).

Precisions: fp32; fp16 (CUDA EP; graph IO stays float32); int8 (decoder: 8-bit MatMulNBits,
block 32); int4 (decoder: 4-bit MatMulNBits, block 32, LM head 8-bit); the vision graph gets
dynamic int8 for both (see export/onnx_quant.py).
Graphs over 2 GB are written with external data (``<graph>.onnx.data``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from r4b_edge import formats
from r4b_edge.errors import ExportError, ModelFormatError
from r4b_edge.formats import ONNX_DECODER_FILE as DECODER_FILE, ONNX_EMBED_FILE as EMBED_FILE
from r4b_edge.formats import ONNX_FORMAT_NAME as FORMAT_NAME, ONNX_FORMAT_VERSION as FORMAT_VERSION
from r4b_edge.formats import ONNX_GENAI_CONFIG as GENAI_CONFIG, ONNX_NEWLINE_FILE as NEWLINE_FILE
from r4b_edge.formats import ONNX_PRECISIONS as PRECISIONS, ONNX_VISION_FILE as VISION_FILE
from r4b_edge.formats import ONNX_REPLY_LENGTHS_FILE as REPLY_LENGTHS_FILE
from r4b_edge.fsutil import replace_dir
from r4b_edge.model.reply import ENDOFTEXT
from r4b_edge.model.reply_lengths import eval_reply_lengths

OPSET = 18
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence the exporter's progress prints and the quantizer's root-logger warnings."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---- validation (nothing is written before this passes) ------------------------------------
def _check_inputs(src: Path, out: Path, precision: str) -> tuple[Any, Any]:
    from r4b_edge.model.config import RConfig
    from r4b_edge.model.tokenizer import Tokenizer

    if precision not in PRECISIONS:
        raise ExportError(f"unknown ONNX precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not src.is_dir() or not (src / "config.json").is_file():
        raise ExportError(f"{src} is not an R-4B checkpoint folder (config.json missing): "
                          "pass the folder written by training or a downloaded R-4B folder")
    try:
        config = RConfig.from_file(src)
        tokenizer = Tokenizer.from_dir(src)
    except ModelFormatError as e:
        raise ExportError(f"cannot export {src}: {e}") from None
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ExportError(f"output folder {out} is inside the checkpoint {src}: pick a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is a file: pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / GENAI_CONFIG).exists():
        raise ExportError(f"output folder {out} is not empty and holds no ONNX export: "
                          "pass an empty or new folder (it is replaced only when it is an earlier export)")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs {e.name!r}: pip install 'r4b-edge[export]'") from None
    return config, tokenizer


# ---- graphs ---------------------------------------------------------------------------------
def _wrappers(model: Any) -> tuple[Any, Any]:
    """Small nn.Modules with flat tensor IO around the model's parts."""
    import torch
    from torch import nn
    from transformers.cache_utils import DynamicCache

    class Vision(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.m.model.multi_modal_projector(self.m.vision_hidden_states(pixel_values))

    n_layers = model.text_hf_config.num_hidden_layers

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm, self.head, self.hf = model.model.language_model, model.lm_head, model.text_hf_config

        def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n_layers)], config=self.hf)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, cache=cache, use_cache=True)
            logits = self.head(out.last_hidden_state.index_select(1, logits_index))
            present = []
            for layer in out.cache.layers:
                present += [layer.keys, layer.values]
            return (logits, *present)

    return Vision().eval(), Decoder().eval()


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _save_program(prog: Any, path: Path, nbytes: int) -> None:
    """Save an ONNXProgram; external data (`<name>.data`) when the weights pass ~1.8 GB."""
    prog.save(str(path), external_data=nbytes > formats.ONNX_EXTERNAL_DATA_BYTES)


def _export_vision(vision: Any, config: Any, path: Path) -> None:
    import torch

    S = config.image_size
    x = torch.randn(2, 3, S, S)
    views = torch.export.Dim("views", min=1, max=4096)
    prog = torch.onnx.export(vision, (x,), input_names=["pixel_values"], output_names=["image_features"],
                             dynamic_shapes=({0: views},), dynamo=True, optimize=True,
                             opset_version=OPSET, verbose=False)
    _save_program(prog, path, _param_bytes(vision))


def _export_decoder(decoder: Any, config: Any, path: Path) -> None:
    import torch

    tc = config.text_config
    L, kvh, hd = tc["num_hidden_layers"], tc["num_key_value_heads"], tc["head_dim"]
    B, T, P = 2, 4, 3
    past = tuple(torch.randn(B, kvh, P, hd) for _ in range(2 * L))
    args = (torch.randn(B, T, config.hidden_size), torch.ones(B, P + T, dtype=torch.long),
            torch.arange(P, P + T)[None].expand(B, T).contiguous(), torch.arange(T), past)
    D = torch.export.Dim
    batch, seq, n_past, total, k = D("batch", max=1024), D("seq"), D("past"), D("total"), D("k")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, {0: k},
              tuple({0: batch, 2: n_past} for _ in range(2 * L)))
    past_names = [n % i for i in range(L) for n in (PAST_KEY, PAST_VALUE)]
    present_names = [n % i for i in range(L) for n in (PRESENT_KEY, PRESENT_VALUE)]
    prog = torch.onnx.export(
        decoder, args, input_names=["inputs_embeds", "attention_mask", "position_ids", "logits_index", *past_names],
        output_names=["logits", *present_names], dynamic_shapes=shapes, dynamo=True, optimize=True,
        opset_version=OPSET, verbose=False)
    _save_program(prog, path, _param_bytes(decoder))


def _write_embed(weight: np.ndarray, path: Path, fp16: bool) -> None:
    """Token embedding graph: Gather (+ Cast to float32 when the table is stored in fp16)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = weight.astype(np.float16 if fp16 else np.float32)
    nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["gathered" if fp16 else "inputs_embeds"], axis=0)]
    if fp16:
        nodes.append(helper.make_node("Cast", ["gathered"], ["inputs_embeds"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "r4b_embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])],
        [numpy_helper.from_array(table, "embed_tokens.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="r4b-edge")
    model.ir_version = min(model.ir_version, 10)
    big = table.nbytes > formats.ONNX_EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)


# ---- config ---------------------------------------------------------------------------------
def _io(names: dict[str, list]) -> dict[str, Any]:
    return {k: {"name": k, "shape": v} for k, v in names.items()}


def genai_config(config: Any, tokenizer: Any, precision: str, graph_precision: dict[str, str]) -> dict:
    """The `genai_config.json` document: everything the torch-free runtime needs."""
    tc = config.text_config
    L, kvh, hd = tc["num_hidden_layers"], tc["num_key_value_heads"], tc["head_dim"]
    r4b = config.to_dict()
    r4b["vision_config"]["image_mean"], r4b["vision_config"]["image_std"] = config.image_mean, config.image_std
    specials = {name: getattr(tokenizer, name) for name in ("im_start", "im_end", "think", "end_think", "image")}
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "precision": precision,
        "graph_precision": graph_precision,
        "model": {
            "type": "r4b", "context_length": config.max_position_embeddings, "vocab_size": config.vocab_size,
            "eos_token_id": sorted(tokenizer.eos_ids), "bos_token_id": None,
            "pad_token_id": tokenizer.token_to_id(ENDOFTEXT),
            "image_token_id": config.image_token_index, "special_tokens": specials,
            "chat_template": tokenizer.chat_template,
            "embedding": {"filename": EMBED_FILE, "inputs": _io({"input_ids": ["batch", "seq"]}),
                          "outputs": _io({"inputs_embeds": ["batch", "seq", config.hidden_size]})},
            "vision": {
                "filename": VISION_FILE, "image_size": config.image_size, "patch_size": config.patch_size,
                "tokens_per_view": config.tokens_per_view, "image_mean": config.image_mean,
                "image_std": config.image_std, "image_grid_pinpoints": config.image_grid_pinpoints,
                "vision_aspect_ratio": config.vision_aspect_ratio, "image_newline": NEWLINE_FILE,
                "image_token_count": ("tokens_per_view for base-only configs; else tokens_per_view + "
                                      "rows*cols + rows of the unpadded AnyRes feature map "
                                      "(r4b_edge.model.processing.count_image_tokens)"),
                "inputs": _io({"pixel_values": ["views", 3, config.image_size, config.image_size]}),
                "outputs": _io({"image_features": ["views", config.tokens_per_view, config.hidden_size]}),
            },
            "decoder": {
                "filename": DECODER_FILE, "hidden_size": config.hidden_size, "num_hidden_layers": L,
                "num_attention_heads": tc["num_attention_heads"], "num_key_value_heads": kvh, "head_size": hd,
                "inputs": {**_io({"inputs_embeds": ["batch", "seq", config.hidden_size],
                                  "attention_mask": ["batch", "total"], "position_ids": ["batch", "seq"],
                                  "logits_index": ["k"]}),
                           "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE,
                           "past_shape": ["batch", kvh, "past", hd]},
                "outputs": {**_io({"logits": ["batch", "k", config.vocab_size]}),
                            "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE,
                            "present_shape": ["batch", kvh, "total", hd]},
            },
        },
        "search": {"max_length": config.max_position_embeddings, "do_sample": False},
        "r4b_config": r4b,
    }


# ---- entry point ----------------------------------------------------------------------------
def _graph_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def export_onnx(src: str | Path, out: str | Path, precision: str = "fp32", force: bool = False) -> Path:
    """Export the R-4B checkpoint folder `src` to the ONNX folder `out` at `precision`
    (fp32 | fp16 | int8 | int4); returns `out`. Bad inputs raise ExportError before anything is
    written; the folder appears complete (temp folder + rename) or not at all; an earlier
    export with the same source, precision and tool versions is left as is (unless `force`)."""
    from .manifest import is_up_to_date, write_manifest

    src, out = Path(src).expanduser(), Path(out).expanduser()
    config, tokenizer = _check_inputs(src, out, precision)
    lengths = eval_reply_lengths(src, tokenizer)
    extra = {"reply_lengths": None if lengths is None else lengths.to_dict()}  # an export without them is redone
    if not force and is_up_to_date(out, src, fmt="onnx", quant=precision, extra=extra):
        return out
    import torch

    from r4b_edge.model.checkpoint import load_checkpoint
    from r4b_edge.model.tokenizer import mark_tokenizer_files

    from . import onnx_quant

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        model, _, _ = load_checkpoint(src, dtype=torch.float32)
        vision, decoder = _wrappers(model)
        raw = tmp / ".raw"
        raw.mkdir()
        with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")  # exporter chatter (axis renames, deprecations)
            _export_vision(vision, config, raw / VISION_FILE)
            _export_decoder(decoder, config, raw / DECODER_FILE)
        emb = model.model.language_model.embed_tokens.weight.detach().float().numpy()
        np.save(tmp / NEWLINE_FILE, model.model.image_newline.detach().float().numpy())
        del model, vision, decoder
        _write_embed(emb, tmp / EMBED_FILE, fp16=precision != "fp32")
        with _quiet_stdout():
            graph_precision = onnx_quant.convert(raw, tmp, precision, (VISION_FILE, DECODER_FILE))
        graph_precision["embed"] = "fp32" if precision == "fp32" else "fp16"
        shutil.rmtree(raw)
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        mark_tokenizer_files(tmp)  # think tags non-special, as in Qwen3, whatever the source says
        if lengths is not None:  # the eval folder does not travel with the export: its length summary does
            (tmp / REPLY_LENGTHS_FILE).write_text(json.dumps(lengths.to_dict(), indent=1) + "\n", encoding="utf-8")
        doc = genai_config(config, tokenizer, precision, graph_precision)
        doc["export_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / GENAI_CONFIG).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_manifest(tmp, _graph_files(tmp), src, "onnx", precision, extra)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp folder to `out` (usual permissions), replacing an earlier export."""
    for p in tmp.iterdir():  # mkdtemp/mkstemp create 0700/0600; an export is meant to be shared
        os.chmod(p, 0o644)
    os.chmod(tmp, 0o755)
    replace_dir(tmp, out)
