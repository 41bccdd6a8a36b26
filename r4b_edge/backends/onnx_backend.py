"""The onnxruntime backend: runs an `r4b-edge export --format onnx` folder. Never imports torch.

Three sessions (vision, embed, decoder; see r4b_edge/export/onnx.py for their IO). The KV cache
lives in OrtValues: each decoder step binds the previous step's `present.*` outputs as the next
`past_key_values.*` inputs (IO binding), so the cache is not copied to numpy and back every
token; on CUDA it stays on the GPU. AnyRes packing (unpadding, `image_newline` per row) is
`processing.pack_anyres` (numpy), exactly as `RForConditionalGeneration.image_features` does it in torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import BackendUnavailableError, ContextLengthError, ModelFormatError, ModelNotFoundError
from ..formats import ONNX_FORMAT_NAME, ONNX_FORMAT_VERSION
from ..formats import ONNX_GENAI_CONFIG as GENAI_CONFIG
from ..model.config import RConfig
from ..model.processing import PreparedImage
from ..model.tokenizer import Tokenizer
from .base import Backend, BackendInfo, numpy_pack
from .runtime import canonical_device, check_n_ctx, check_threads, resolve_device

PROVIDERS = {"cuda": "CUDAExecutionProvider", "coreml": "CoreMLExecutionProvider", "cpu": "CPUExecutionProvider"}
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def resolve_onnx_device(device: str = "auto", available: Sequence[str] | None = None) -> str:
    """The onnx device for `device` (the shared alias table): auto -> cuda (CUDA EP present),
    then coreml (CoreML EP, macOS), then cpu. An explicit device whose execution provider this
    onnxruntime lacks raises BackendUnavailableError."""
    avail = list(ort.get_available_providers() if available is None else available)
    have = {"cuda": PROVIDERS["cuda"] in avail,
            "mps": PROVIDERS["coreml"] in avail and (sys.platform == "darwin" or canonical_device(device) == "mps")}
    lacks = f"this onnxruntime lacks it (available: {', '.join(avail)})"
    dev = resolve_device(device, "onnx", have, {
        "cuda": f"it needs {PROVIDERS['cuda']}; {lacks}: pip uninstall onnxruntime && pip install "
                "onnxruntime-gpu (needs an NVIDIA GPU and CUDA 12)",
        "mps": f"it needs {PROVIDERS['coreml']}; {lacks}: use the standard onnxruntime wheel on macOS "
               "(pip install onnxruntime)"})
    return {"mps": "coreml"}.get(dev, dev)


def read_genai_config(folder: Path) -> dict:
    """Parse and check `genai_config.json` of an ONNX export folder."""
    p = folder / GENAI_CONFIG
    if not p.is_file():
        raise ModelNotFoundError(f"{GENAI_CONFIG} not found in {folder}: pass a folder written by "
                                 "`r4b-edge export --format onnx`")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{p}: cannot be read as JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != ONNX_FORMAT_NAME or not isinstance(doc.get("model"), dict):
        raise ModelFormatError(f"{p} is not an r4b-edge ONNX export (format field missing): re-export it")
    if int(doc.get("format_version", 0)) > ONNX_FORMAT_VERSION:
        raise ModelFormatError(f"{p} has format_version {doc['format_version']}; this r4b-edge reads "
                               f"{ONNX_FORMAT_VERSION}: upgrade r4b-edge")
    for part in ("embedding", "vision", "decoder"):
        fn = doc["model"].get(part, {}).get("filename")
        if not fn or not (folder / fn).is_file():
            raise ModelFormatError(f"{folder}: the {part} graph ({fn}) is missing; re-run the export")
    return doc


class OnnxBackend(Backend):
    """An ONNX export folder on onnxruntime (CPU, CUDA or CoreML execution provider)."""

    name = "onnx"

    def __init__(self, model_path: str | Path, *, device: str = "auto", threads: int | None = None,
                 n_ctx: int | None = None) -> None:
        """`threads`: onnxruntime's intra-op threads; None: `runtime.default_threads()`. `n_ctx`: a
        bound on the sequence (the KV cache grows as it goes; None: the model's context)."""
        threads = check_threads(threads)
        self.n_ctx_limit = check_n_ctx(n_ctx)
        folder = Path(model_path).expanduser()
        if folder.is_file():
            folder = folder.parent
        self.model_path = folder
        self.doc = read_genai_config(folder)
        m = self.doc["model"]
        self.config = RConfig.from_dict(self.doc["r4b_config"], source=str(folder / GENAI_CONFIG))
        self.config.preprocessor = {"image_mean": m["vision"]["image_mean"], "image_std": m["vision"]["image_std"]}
        self.tokenizer = Tokenizer.from_dir(folder)
        self.device = resolve_onnx_device(device)
        self.threads = threads
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        providers = [PROVIDERS[self.device]] + ([PROVIDERS["cpu"]] if self.device != "cpu" else [])
        self._embed = self._session(folder / m["embedding"]["filename"], so, providers)
        self._vision = self._session(folder / m["vision"]["filename"], so, providers)
        self._dec = self._session(folder / m["decoder"]["filename"], so, providers)
        got = self._dec.get_providers()[0]
        if got != providers[0]:  # onnxruntime fell back (e.g. onnxruntime-gpu without a usable GPU)
            if str(device or "auto").lower() != "auto":
                raise BackendUnavailableError(
                    f"{providers[0]} is installed but could not start here (onnxruntime fell back to {got}): "
                    "check the GPU driver / CUDA 12 libraries, or use --device cpu")
            self.device = "cpu"
        self._newline = np.load(folder / m["vision"]["image_newline"]).astype(np.float32)
        d = m["decoder"]
        L = int(d["num_hidden_layers"])
        self._past_names = [n % i for i in range(L) for n in (d["inputs"]["past_key_names"], d["inputs"]["past_value_names"])]
        self._present_names = [n % i for i in range(L) for n in (d["outputs"]["present_key_names"], d["outputs"]["present_value_names"])]
        types = {i.name: i.type for i in self._dec.get_inputs()}
        self._kv_dtype = _ORT_DTYPES.get(types.get(self._past_names[0], "tensor(float)"), np.float32)
        self._kv_shape = (1, int(d["num_key_value_heads"]), 0, int(d["head_size"]))
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"
        self._past: list[ort.OrtValue] = []
        self._n = 0
        self._init_sequence()
        self._reset()

    def _session(self, path: Path, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            hint = ""
            if self.doc.get("precision") == "fp16" and self.device == "cpu":
                hint = "; fp16 exports need a GPU execution provider (--device cuda/coreml): export fp32, int8 or int4 for CPU"
            raise ModelFormatError(f"onnxruntime cannot load {path.name} on {providers[0]}: {e}{hint}") from None

    # ---- state -----------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self._n

    def _reset(self) -> None:
        empty = np.zeros(self._kv_shape, dtype=self._kv_dtype)
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]
        self._n = 0

    # ---- pieces ----------------------------------------------------------------------------
    def _embed_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray([list(ids)], dtype=np.int64)
        return self._embed.run(None, {"input_ids": arr})[0]

    def _vision_view(self, image: PreparedImage, i: int) -> np.ndarray:
        pv = np.ascontiguousarray(image.pixel_values[i:i + 1], dtype=np.float32)
        return self._vision.run(None, {"pixel_values": pv})[0][0]

    def _pack(self, image: PreparedImage, feats: list) -> np.ndarray:
        return numpy_pack(image, feats, self.config, self._newline)

    def _run(self, embeds: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        """Evaluate embeddings [1, k, H] at positions n..; return float32 logits [len(index), V]."""
        k = embeds.shape[1]
        total = self._n + k
        if total > self.n_ctx:
            raise ContextLengthError(f"sequence of {total} positions exceeds the model's context of {self.n_ctx}")
        b = self._dec.io_binding()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        b.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        b.bind_cpu_input("position_ids", np.arange(self._n, total, dtype=np.int64)[None])
        b.bind_cpu_input("logits_index", logits_index.astype(np.int64))
        for name, v in zip(self._past_names, self._past):
            b.bind_ortvalue_input(name, v)
        b.bind_output("logits", "cpu")
        for name in self._present_names:
            b.bind_output(name, self._ort_device)
        self._dec.run_with_iobinding(b)
        outs = b.get_outputs()
        self._past = list(outs[1:])
        self._n = total
        return outs[0].numpy()[0].astype(np.float32, copy=False)

    # ---- hooks (see Backend) ----------------------------------------------------------------
    def _eval(self, kind: str, rows, want_logits: bool) -> np.ndarray | None:
        embeds = self._embed_ids(rows) if kind == "text" else rows[None].astype(np.float32, copy=False)
        logits = self._run(embeds, np.asarray([embeds.shape[1] - 1]))
        return logits[-1] if want_logits else None

    def _forward(self, ids: list[int]) -> np.ndarray:
        return self._run(self._embed_ids(ids), np.arange(len(ids)))

    def _forward_last(self, ids: list[int]) -> np.ndarray:
        return self._run(self._embed_ids(ids), np.asarray([len(ids) - 1]))[-1]

    def _truncate(self, n_past: int) -> None:
        """Drop cache positions >= n_past (a host-side slice of each past tensor)."""
        sliced = []
        for v in self._past:
            a = np.ascontiguousarray(v.numpy()[:, :, :n_past])
            sliced.append(ort.OrtValue.ortvalue_from_numpy(a, self._ort_device) if self._ort_device != "cpu"
                          else ort.OrtValue.ortvalue_from_numpy(a))
        self._past = sliced
        self._n = n_past

    def _snapshot(self) -> tuple[object, int]:
        """The past OrtValues themselves: every step binds new outputs, so no copy is needed."""
        item = np.dtype(self._kv_dtype).itemsize
        return (list(self._past), self._n), sum(int(np.prod(v.shape())) * item for v in self._past)

    def _restore(self, state) -> None:
        past, n = state
        self._past, self._n = list(past), int(n)

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.device, str(self.model_path), precision=str(self.doc.get("precision", "")),
                           extra={"providers": self._dec.get_providers(), "graphs": self.doc.get("graph_precision", {}),
                                  "kv_cache": "io-binding", "threads": self.threads})

    def close(self) -> None:
        self._past = []
        self._images.clear()
        for attr in ("_embed", "_vision", "_dec"):
            if hasattr(self, attr):
                delattr(self, attr)


__all__ = ["OnnxBackend", "read_genai_config", "resolve_onnx_device", "PROVIDERS"]
