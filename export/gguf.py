"""GGUF export of an R-4B checkpoint: the text model as arch `qwen3` and the
vision tower + projector as an mmproj of arch `clip` (projector type `mlp`),
both loadable by the stock llama.cpp vendored in llama-cpp-python.

Tensors are streamed: each one is read from the safetensors shards in row
chunks (<= 64 MiB of float32 at a time), converted, and written straight into
the output file, so peak memory stays near one chunk plus the tokenizer.

Mapping (see docs/gguf.md for the full table):
- Qwen3: no Q/K permutation (that is only for arch `llama`); q_norm/k_norm ->
  attn_q_norm/attn_k_norm; untied `lm_head` -> `output`.
- SigLIP: fc1/fc2 -> ffn_up/ffn_down, layer_norm1/2 -> ln1/ln2; no CLS.
- Projector: `pre_norm` LayerNorm -> `v.post_ln` (llama.cpp applies it after
  the last block, exactly where R-4B's projector applies it), linear_1 ->
  mm.0, linear_2 -> mm.2; `clip.vision.feature_layer` = [n_layers] so all
  blocks run. llama.cpp's `mlp` projector uses tanh-GELU where R-4B uses erf
  (measured error in docs/gguf.md).
- AnyRes: `image_newline` -> `v.image_newline`; pinpoints are kept in the
  `r4b.config` JSON (the r4b-edge backend packs tiles exactly); they go into
  `clip.vision.image_grid_pinpoints` only with `stock_pinpoints=True`,
  because stock llama.cpp's slicing for `mlp` (tiles before the overview, no
  unpadding, no newlines) is a layout the model never saw.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from r4b_edge.errors import ExportError, R4BError
from r4b_edge.formats import GGUF_HF_JSON_KEY, GGUF_IMAGE_NEWLINE
from r4b_edge.formats import GGUF_R4B_CONFIG_KEY as R4B_CONFIG_KEY
from r4b_edge.formats import GGUF_REPLY_LENGTHS_KEY as REPLY_LENGTHS_KEY
from r4b_edge.fsutil import atomic_write
from r4b_edge.model.reply import ENDOFTEXT
from r4b_edge.model.reply_lengths import eval_reply_lengths
from r4b_edge.model.template import CHAT_TEMPLATE

from .manifest import is_up_to_date, write_manifest
from .quantize import QuantSpec, convert_chunk, fits, llama_quantize, quant_spec, tensor_nbytes

CHUNK_BYTES = 64 << 20  # float32 bytes converted at a time
_LM = "model.language_model."
_VT = "model.vision_tower.vision_model."
_PJ = "model.multi_modal_projector."

_TEXT_MAP = [
    (r"embed_tokens\.weight", "token_embd.weight"),
    (r"norm\.weight", "output_norm.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "blk.{0}.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{0}.ffn_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{0}.attn_q.{1}"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{0}.attn_k.{1}"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{0}.attn_v.{1}"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "blk.{0}.attn_output.{1}"),
    (r"layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{0}.attn_q_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{0}.attn_k_norm.weight"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight"),
]
_VISION_MAP = [
    (r"embeddings\.patch_embedding\.(weight|bias)", "v.patch_embd.{0}"),
    (r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", "v.blk.{0}.ln1.{1}"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", "v.blk.{0}.ln2.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "v.blk.{0}.attn_q.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "v.blk.{0}.attn_k.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "v.blk.{0}.attn_v.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "v.blk.{0}.attn_out.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "v.blk.{0}.ffn_up.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "v.blk.{0}.ffn_down.{1}"),
]
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_PROJ_MAP = {"pre_norm": "v.post_ln", "linear_1": "mm.0", "linear_2": "mm.2"}


@dataclass
class _Tensor:
    gguf: str
    hf: str
    shape: tuple[int, ...]
    type: str = "F32"


@dataclass
class ExportResult:
    """What `export_gguf` wrote (or found up to date)."""

    out_dir: Path
    text: Path
    mmproj: Path
    manifest: Path
    quant: str
    mmproj_quant: str
    skipped: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    verified: str = ""  # the llama.cpp test decode's repack choice ("" when not verified)


def gguf_name(hf: str) -> str | None:
    """GGUF tensor name of an R-4B tensor name; None for tensors not exported."""
    for prefix, table in ((_LM, _TEXT_MAP), (_VT, _VISION_MAP)):
        if hf.startswith(prefix):
            rest = hf[len(prefix):]
            for pat, tmpl in table:
                m = re.fullmatch(pat, rest)
                if m:
                    return tmpl.format(*m.groups())
            if prefix == _VT and re.match(r"(post_layernorm|head)\.", rest):
                return None  # unused by R-4B (the projector's pre_norm takes its place)
            raise ExportError(f"tensor {hf!r} has no GGUF mapping: not an R-4B checkpoint layout")
    if hf.startswith(_PJ):
        part, _, kind = hf[len(_PJ):].partition(".")
        if part in _PROJ_MAP and kind in ("weight", "bias"):
            return f"{_PROJ_MAP[part]}.{kind}"
    if hf == "model.image_newline":
        return GGUF_IMAGE_NEWLINE
    if hf == "lm_head.weight":
        return "output.weight"
    raise ExportError(f"tensor {hf!r} has no GGUF mapping: not an R-4B checkpoint layout")


# ---- source -------------------------------------------------------------------------------
class _Source:
    """A validated R-4B checkpoint folder, read tensor by tensor."""

    def __init__(self, path: Path) -> None:
        from r4b_edge.model.checkpoint import read_headers, validate_tensors, weight_files
        from r4b_edge.model.config import RConfig
        from r4b_edge.model.tokenizer import Tokenizer

        if not path.is_dir() or not (path / "config.json").is_file():
            raise ExportError(f"{path} is not an R-4B checkpoint folder (no config.json): pass the folder "
                              "holding config.json, tokenizer.json and the safetensors shards")
        try:
            self.config = RConfig.from_file(path)
            self.tokenizer = Tokenizer.from_dir(path)
            files, wm = weight_files(path)
            self.headers = read_headers(files, wm)
            validate_tensors(self.config, self.headers)
        except ExportError:
            raise
        except R4BError as e:
            raise ExportError(f"cannot export {path}: {e}") from None
        self.path = path
        tc = self.config.text_config
        rp = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        if rp.get("rope_type", "default") not in ("default", None):
            raise ExportError(f"rope type {rp.get('rope_type')!r} is not supported by the GGUF export "
                              "(only default RoPE)")
        self._handles: dict[str, Any] = {}

    def _open(self, file: str) -> tuple[Any, int, dict]:
        """(file object, data start, header) of a safetensors file, parsed once."""
        if file not in self._handles:
            f = open(file, "rb")
            n = int.from_bytes(f.read(8), "little")
            self._handles[file] = (f, 8 + n, json.loads(f.read(n)))
        return self._handles[file]

    def chunks(self, hf: str) -> Iterator[np.ndarray]:
        """float32 row chunks of tensor `hf` (along its first axis), read with plain file reads
        (no mmap), so memory holds one chunk at a time."""
        file, shape, stored = self.headers[hf]
        f, start, header = self._open(file)
        ent = header[stored]
        dt = _ST_DTYPES.get(ent["dtype"])
        if dt is None:
            raise ExportError(f"{hf}: safetensors dtype {ent['dtype']} is not supported (F32, F16, BF16)")
        begin = start + int(ent["data_offsets"][0])
        rows = shape[0] if len(shape) > 1 else 1
        row_items = int(np.prod(shape[1:])) if len(shape) > 1 else int(np.prod(shape))
        step = max(1, CHUNK_BYTES // max(row_items * 4, 1))
        isz = np.dtype(dt).itemsize
        for i in range(0, rows, step):
            k = min(step, rows - i)
            f.seek(begin + i * row_items * isz)
            a = np.frombuffer(f.read(k * row_items * isz), dtype=dt)
            if ent["dtype"] == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            else:
                a = a.astype(np.float32)
            yield a.reshape((k, *shape[1:]) if len(shape) > 1 else tuple(shape))

    def close(self) -> None:
        for f, _, _ in self._handles.values():
            f.close()
        self._handles.clear()


# ---- metadata -----------------------------------------------------------------------------
def _config_json(src: _Source) -> str:
    d = src.config.to_dict()
    d["vision_config"]["image_mean"] = src.config.image_mean
    d["vision_config"]["image_std"] = src.config.image_std
    return json.dumps(d, sort_keys=True)


def tokenizer_data(src: _Source) -> dict:
    """Token list, types, merges and tokenizer.json for the GGUF vocabulary; ExportError when
    the tokenizer cannot be written (checked before any file is opened). Special added tokens
    are CONTROL, the others USER_DEFINED (as llama.cpp's convert_hf_to_gguf types them); the
    think tags are plain added tokens whatever the source folder says (`mark_text_tokens`), so
    llama.cpp renders them in a reply's text as it does for Qwen3."""
    import gguf

    from r4b_edge.model.tokenizer import mark_text_tokens

    n_vocab = src.config.vocab_size
    hf = mark_text_tokens(src.tokenizer.backend)
    vocab = hf.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise ExportError(f"tokenizer has ids up to {max(vocab.values())} but text_config.vocab_size is {n_vocab}")
    added = hf.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
        at = added.get(i)
        types[i] = (gguf.TokenType.NORMAL if at is None else
                    gguf.TokenType.CONTROL if at.special else gguf.TokenType.USER_DEFINED)
    doc = hf.to_str()
    model = json.loads(doc)["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model is {model.get('type')!r}; the GGUF export needs a byte-level BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "json": doc}


def _tokenizer_kv(w: Any, src: _Source, data: dict) -> None:
    import gguf

    tok = src.tokenizer
    tokens, types, merges = data["tokens"], data["types"], data["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.im_end)
    pad = tok.token_to_id(ENDOFTEXT)
    if pad is not None:
        w.add_pad_token_id(pad)
        w.add_bos_token_id(pad)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_string(GGUF_HF_JSON_KEY, data["json"])


def _text_plan(src: _Source, spec: QuantSpec) -> list[_Tensor]:
    out = []
    wtype = spec.python_type or "F16"  # llama.cpp quantizes from an F16 intermediate
    for hf, (_, shape, _) in src.headers.items():
        name = gguf_name(hf)
        if name is None or name.startswith("v.") or name.startswith("mm."):
            continue
        if src.config.tie_word_embeddings and name == "output.weight":
            continue
        shape = tuple(shape)
        t = "F32" if len(shape) < 2 else (wtype if fits(shape, wtype) else "F16")
        out.append(_Tensor(name, hf, shape, t))
    return sorted(out, key=lambda t: _order(t.gguf))


def _vision_plan(src: _Source, mtype: str) -> list[_Tensor]:
    out = []
    for hf, (_, shape, _) in src.headers.items():
        name = gguf_name(hf)
        if name is None or not (name.startswith("v.") or name.startswith("mm.")):
            continue
        shape = tuple(shape)
        if len(shape) < 2 or name == GGUF_IMAGE_NEWLINE:
            t = "F32"
        elif name.startswith(("v.patch_embd", "v.position_embd")):
            t = "F16"
        else:
            t = mtype if fits(shape, mtype) else "F16"
        out.append(_Tensor(name, hf, shape, t))
    return sorted(out, key=lambda t: _order(t.gguf))


def _order(name: str) -> tuple:
    m = re.search(r"blk\.(\d+)\.", name)
    return (0 if m is None and "embd" in name else 1 if m else 2, int(m.group(1)) if m else 0, name)


class _StreamedTensor:
    """A tensor GGUFWriter writes through its own API without holding it in memory: the writer
    takes `shape`/`dtype`/`nbytes` for the tensor info and calls `tofile(fout)` once in
    `write_tensors_to_file` (as it does for gguf-py's own LazyNumpyTensor); `tofile` streams
    the checkpoint tensor in row chunks, converted to the GGUF type."""

    def __init__(self, t: _Tensor, src: _Source) -> None:
        self.t, self.src = t, src
        self.shape = t.shape  # logical shape (quantized types too)
        self.dtype = np.dtype(np.float16 if t.type == "F16" else np.float32)
        self.nbytes = tensor_nbytes(t.shape, t.type)

    def tofile(self, fout: Any) -> None:
        n = 0
        for chunk in self.src.chunks(self.t.hf):
            data = convert_chunk(chunk, self.t.type)
            data.tofile(fout)
            n += data.nbytes
            del chunk, data
        if n != self.nbytes:
            raise ExportError(f"{self.t.hf}: wrote {n} bytes, expected {self.nbytes}")


def _write(path: Path, arch: str, plan: list[_Tensor], src: _Source, kv: Any) -> None:
    """Write a GGUF with metadata from `kv(writer)` and tensors streamed from `src`."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    try:
        kv(w)
        for t in plan:
            raw = None if t.type in ("F32", "F16") else gguf.GGMLQuantizationType[t.type]
            w.add_tensor(t.gguf, _StreamedTensor(t, src), raw_shape=t.shape, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.flush()
    finally:
        w.close()


def _text_kv(src: _Source, spec: QuantSpec, name: str, tok_data: dict):
    def kv(w: Any) -> None:
        tc = src.config.text_config
        w.add_name(name)
        w.add_file_type(spec.file_type if spec.python_type else 1)
        w.add_context_length(src.config.max_position_embeddings)
        w.add_embedding_length(tc["hidden_size"])
        w.add_block_count(tc["num_hidden_layers"])
        w.add_feed_forward_length(tc["intermediate_size"])
        w.add_head_count(tc["num_attention_heads"])
        w.add_head_count_kv(tc["num_key_value_heads"])
        w.add_key_length(tc["head_dim"])
        w.add_value_length(tc["head_dim"])
        w.add_rope_freq_base(src.config.rope_theta)
        w.add_layer_norm_rms_eps(float(tc.get("rms_norm_eps", 1e-6)))
        if spec.python_type == "Q8_0":
            w.add_quantization_version(2)
        _tokenizer_kv(w, src, tok_data)
        w.add_string(R4B_CONFIG_KEY, _config_json(src))
        lengths = eval_reply_lengths(src.path, src.tokenizer)
        if lengths is not None:  # the eval folder does not travel with the GGUF: its length summary does
            w.add_string(REPLY_LENGTHS_KEY, json.dumps(lengths.to_dict(), sort_keys=True))
    return kv


def _vision_kv(src: _Source, mspec: QuantSpec, name: str, stock_pinpoints: bool):
    def kv(w: Any) -> None:
        cfg, vc = src.config, src.config.vision_config
        n_layer = int(vc["num_hidden_layers"])
        vfl = cfg.vision_feature_layer
        w.add_name(f"mmproj-{name}")
        w.add_file_type(mspec.file_type)
        w.add_string("clip.projector_type", "mlp")
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.image_size", cfg.image_size)
        w.add_uint32("clip.vision.patch_size", cfg.patch_size)
        w.add_uint32("clip.vision.embedding_length", int(vc["hidden_size"]))
        w.add_uint32("clip.vision.feed_forward_length", int(vc["intermediate_size"]))
        w.add_uint32("clip.vision.block_count", n_layer)
        w.add_uint32("clip.vision.projection_dim", cfg.hidden_size)
        w.add_uint32("clip.vision.attention.head_count", int(vc["num_attention_heads"]))
        w.add_float32("clip.vision.attention.layer_norm_epsilon", float(vc.get("layer_norm_eps", 1e-6)))
        w.add_array("clip.vision.image_mean", [float(x) for x in cfg.image_mean])
        w.add_array("clip.vision.image_std", [float(x) for x in cfg.image_std])
        # HF hidden_states[k] = output of k blocks; llama.cpp feature layer k = the same.
        w.add_array("clip.vision.feature_layer", [n_layer + 1 + vfl if vfl < 0 else vfl])
        if stock_pinpoints and cfg.anyres:
            flat = [v for h, wd in cfg.image_grid_pinpoints for v in (wd, h)]  # (width, height) pairs
            w.add_array("clip.vision.image_grid_pinpoints", flat)
        w.add_string(R4B_CONFIG_KEY, _config_json(src))
    return kv


# ---- verification ---------------------------------------------------------------------------
def read_back(path: Path, plan: list[_Tensor]) -> None:
    """Read `path` with gguf-py and check every planned tensor's name, shape and type."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on bad files
        raise ExportError(f"{path}: written file cannot be read back by gguf-py ({e})") from None
    got = {t.name: t for t in r.tensors}
    for t in plan:
        rt = got.get(t.gguf)
        if rt is None:
            raise ExportError(f"{path}: tensor {t.gguf} missing on read-back")
        if tuple(int(x) for x in reversed(rt.shape.tolist())) != t.shape:
            raise ExportError(f"{path}: tensor {t.gguf} has shape {rt.shape.tolist()} on read-back, expected {t.shape}")
    if len(got) != len(plan):
        raise ExportError(f"{path}: {len(got)} tensors on read-back, expected {len(plan)}")
    if r.get_field(R4B_CONFIG_KEY) is None:
        raise ExportError(f"{path}: key {R4B_CONFIG_KEY} missing on read-back")


def load_check(text: Path, mmproj: Path, repack: str | None = None, threads: int = 1):
    """Decode a few tokens of the pair in llama.cpp, in a child process, with the repack choice the
    llama backend would make here (`llama_repack.choose`), and encode one view through the mmproj:
    a file that would crash the runtime fails the export with one line naming the cause and the
    override. Returns the RepackChoice."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise ExportError(f"verification needs llama-cpp-python (pip install 'r4b-edge[export]'): {e}") from None
    from r4b_edge.backends.llama_repack import FIX, choose, crash_hint, probe

    choice = choose(repack, text, threads=threads)
    res = probe(text, choice.use_extra_bufts, mmproj=mmproj, threads=threads)
    if not res.ok:
        state = "on" if choice.use_extra_bufts else "off"
        hint = crash_hint(res.returncode) if choice.use_extra_bufts else ""
        raise ExportError(f"{text.name} does not run in llama.cpp here: a test decode with repacking {state} "
                          f"({choice.reason}) was {res.describe()}"
                          + (f"; {hint}" if hint else f" (not a repacking fault: {FIX} does not apply)"))
    return choice


# ---- entry point ----------------------------------------------------------------------------
def export_gguf(src: str | os.PathLike, out: str | os.PathLike, quant: str = "Q4_K_M",
                mmproj_quant: str | None = None, name: str = "model", verify: bool = True,
                stock_pinpoints: bool = False, force: bool = False, repack: str | None = None) -> ExportResult:
    """Export the R-4B checkpoint `src` to `out/{name}-{quant}.gguf` + `out/mmproj-{name}-{mq}.gguf`
    + `out/manifest.json`. `mmproj_quant` defaults to Q8_0 for Q8_0 and F16 otherwise. Bad inputs
    fail before anything is written; an up-to-date output is left alone (unless `force`). `verify`
    decodes the files in a llama.cpp child process with the `repack` choice (auto | on | off)."""
    spec = quant_spec(quant)
    mspec = quant_spec(mmproj_quant or ("Q8_0" if spec.name == "Q8_0" else "F16"), mmproj=True)
    src_p, out_p = Path(src).expanduser(), Path(out).expanduser()
    if out_p.exists() and not out_p.is_dir():
        raise ExportError(f"--out {out_p} is a file; pass a folder")
    source = _Source(src_p)
    if out_p.resolve() == src_p.resolve() or src_p.resolve() in out_p.resolve().parents:
        raise ExportError(f"--out {out_p} is inside the checkpoint folder {src_p}: pass a separate folder")
    text_p = out_p / f"{name}-{spec.name}.gguf"
    mm_p = out_p / f"mmproj-{name}-{mspec.name}.gguf"
    lengths = eval_reply_lengths(src_p, source.tokenizer)
    extra = {"name": name, "mmproj_quant": mspec.name, "stock_pinpoints": bool(stock_pinpoints),
             "reply_lengths": None if lengths is None else lengths.to_dict()}  # an export without them is redone
    if not force and is_up_to_date(out_p, src_p, "gguf", spec.name, extra):
        return ExportResult(out_p, text_p, mm_p, out_p / "manifest.json", spec.name, mspec.name, skipped=True,
                            sizes={p.name: p.stat().st_size for p in (text_p, mm_p)})
    text_plan, vis_plan = _text_plan(source, spec), _vision_plan(source, mspec.python_type)
    tok_data = tokenizer_data(source)
    out_p.mkdir(parents=True, exist_ok=True)
    checked = None
    try:
        with atomic_write(text_p) as t_tmp, atomic_write(mm_p) as m_tmp:
            if spec.python_type:
                _write(t_tmp, "qwen3", text_plan, source, _text_kv(source, spec, name, tok_data))
            else:
                inter = out_p / f".{name}-F16.intermediate.gguf"
                try:
                    _write(inter, "qwen3", text_plan, source, _text_kv(source, spec, name, tok_data))
                    llama_quantize(inter, t_tmp, spec)
                finally:
                    inter.unlink(missing_ok=True)
            _write(m_tmp, "clip", vis_plan, source, _vision_kv(source, mspec, name, stock_pinpoints))
            if verify:
                read_back(m_tmp, vis_plan)
                read_back(t_tmp, text_plan)
                checked = load_check(t_tmp, m_tmp, repack)
    finally:
        source.close()
    man = write_manifest(out_p, [text_p, mm_p], src_p, "gguf", spec.name, extra)
    return ExportResult(out_p, text_p, mm_p, man, spec.name, mspec.name,
                        sizes={p.name: p.stat().st_size for p in (text_p, mm_p)},
                        verified=checked.line() if checked else "")
