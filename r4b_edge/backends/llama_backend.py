"""The llama.cpp backend: a GGUF pair (text `qwen3` + mmproj `clip`) through
llama-cpp-python's low-level API, images through mtmd. Never imports torch.

- Text: `llama_decode` on token batches (logits for every token of `forward`)
  or on embedding batches (images); `truncate` is `llama_memory_seq_rm`.
- Images: every view (base view, then AnyRes tiles) is given to mtmd as an
  S x S RGB bitmap (the exact uint8 pixels `prepare_image` normalised), so
  mtmd does no resizing; the views' projected features are packed in numpy
  by `processing.pack_anyres` like the torch model (unpadding + `image_newline` per row), fed
  at the image's positions. Embeddings are cached by `PreparedImage.key`.
- Tokenizer and R-4B config come from the text GGUF (`tokenizer.huggingface.json`,
  `r4b.config`), so one .gguf file (+ its mmproj beside it) is a whole model.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ContextLengthError, ModelFormatError
from ..formats import GGUF_HF_JSON_KEY as HF_JSON_KEY
from ..formats import GGUF_IMAGE_NEWLINE
from ..formats import GGUF_R4B_CONFIG_KEY as R4B_CONFIG_KEY
from ..model.config import RConfig
from ..model.processing import PreparedImage
from ..model.reply import IM_END
from ..model.tokenizer import Tokenizer
from .base import Backend, BackendInfo, numpy_pack
from .gguf_pair import find_gguf_pair
from .llama_repack import RepackChoice, repack_setting
from .llama_repack import choose as choose_repack
from .runtime import canonical_device, check_threads, resolve_device

DEFAULT_N_CTX = 8192
GPU_BUILD_HINT = ("reinstall llama-cpp-python with GPU support: "
                  "CMAKE_ARGS=\"-DGGML_CUDA=on\" (NVIDIA) or CMAKE_ARGS=\"-DGGML_METAL=on\" (Apple) "
                  "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")


def _llama():
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError as e:  # pragma: no cover - the registry checks first
        raise BackendUnavailableError(f"the llama backend needs llama-cpp-python: pip install 'r4b-edge[llama]' ({e})") from None
    return llama_cpp, mtmd_cpp


def quiet_llama(verbose: bool = False) -> None:
    """Route llama.cpp/mtmd logs through llama-cpp-python's logger (errors only unless verbose)."""
    llama_cpp, mtmd_cpp = _llama()
    from llama_cpp import _logger

    _logger.set_verbose(verbose)
    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def build_info() -> dict[str, Any]:
    """The installed llama.cpp build: version, GPU offload support, system info line."""
    llama_cpp, _ = _llama()
    sysinfo = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    kind = "CUDA" if "CUDA" in sysinfo else "Metal" if "METAL" in sysinfo.upper() else ("GPU" if gpu else "CPU")
    return {"llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "gpu_offload": gpu,
            "build": kind, "system_info": sysinfo}


# ---- files ------------------------------------------------------------------------------------
def _read_meta(text: Path, mmproj: Path) -> tuple[dict, str, str | None, np.ndarray | None, str, list[str]]:
    import gguf

    r = gguf.GGUFReader(str(text))
    types = sorted({t.tensor_type.name for t in r.tensors})
    cfg_f, tok_f = r.get_field(R4B_CONFIG_KEY), r.get_field(HF_JSON_KEY)
    if cfg_f is None or tok_f is None:
        raise ModelFormatError(f"{text} has no {R4B_CONFIG_KEY!r}/{HF_JSON_KEY!r} metadata: it was not written by "
                               "`r4b-edge export --format gguf`; re-export it")
    tmpl_f = r.get_field("tokenizer.chat_template")
    ft_f = r.get_field("general.file_type")
    ftype = ""
    if ft_f is not None:
        try:
            ftype = gguf.LlamaFileType(int(ft_f.contents())).name.replace("MOSTLY_", "")
        except ValueError:
            ftype = str(int(ft_f.contents()))
    cfg = json.loads(str(cfg_f.contents()))
    m = gguf.GGUFReader(str(mmproj))
    newline = None
    for t in m.tensors:
        if t.name == GGUF_IMAGE_NEWLINE:
            newline = np.array(t.data, dtype=np.float32).reshape(-1)
    return (cfg, str(tok_f.contents()), (str(tmpl_f.contents()) if tmpl_f is not None else None), newline, ftype,
            types)


# ---- backend ----------------------------------------------------------------------------------
class LlamaBackend(Backend):
    """R-4B from a GGUF pair through llama.cpp."""

    name = "llama"

    def __init__(self, model_path: str | Path, *, device: str = "auto", threads: int | None = None,
                 n_ctx: int | None = None, n_batch: int = 512, mmproj: str | Path | None = None,
                 verbose: bool = False, repack: str | None = None) -> None:
        """`threads`: llama.cpp's decode and batch threads (and mtmd's); None:
        `runtime.default_threads()`. `repack`: auto | on | off, whether llama.cpp may repack the
        weights into its CPU extra buffer types (None: `$R4B_LLAMA_REPACK`, else auto; see
        `llama_repack`)."""
        self._ll, self._mt = _llama()
        llama_cpp, mtmd_cpp = self._ll, self._mt
        self._closed = True
        threads = check_threads(threads)
        text, mm = find_gguf_pair(model_path, mmproj)
        cfg_d, tok_json, tmpl, self._newline, self.precision, types = _read_meta(text, mm)
        self.config = RConfig.from_dict(cfg_d, source=f"{text} ({R4B_CONFIG_KEY})")
        from tokenizers import Tokenizer as _HF

        self.tokenizer = Tokenizer(_HF.from_str(tok_json), chat_template=tmpl, eos_token=IM_END, source=str(text))
        self.model_path, self.mmproj_path = text, mm
        quiet_llama(verbose)
        llama_cpp.llama_backend_init()
        gpu_ok = bool(llama_cpp.llama_supports_gpu_offload())
        dev = resolve_device(device, "llama", {"cuda": gpu_ok, "mps": gpu_ok},
                             {"gpu": "this llama-cpp-python build has no GPU offload: " + GPU_BUILD_HINT})
        n_gpu = 0 if dev == "cpu" else -1
        asked = canonical_device(device)
        self.device = {"cpu": "cpu", "cuda": "cuda", "mps": "metal"}[asked] if asked in ("cpu", "cuda", "mps") else \
            ("cpu" if n_gpu == 0 else "gpu")
        self.threads = threads
        # weights offloaded to a GPU are not repacked: the choice (and its probe) is the CPU's
        self.repack = choose_repack(repack, text, types, threads=threads) if n_gpu == 0 else \
            RepackChoice(True, repack_setting(repack), "weights on the GPU")
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu
        mp.use_extra_bufts = self.repack.use_extra_bufts
        self._model = llama_cpp.llama_model_load_from_file(str(text).encode(), mp)
        if not self._model:
            raise ModelFormatError(f"llama.cpp could not load {text} (re-export it, or run with verbose=True)")
        self._closed = False
        self._n_ctx = int(min(self.config.max_position_embeddings, n_ctx or DEFAULT_N_CTX))
        self._n_batch = int(n_batch)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self._n_ctx, self._n_batch, self._n_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise ModelFormatError(f"llama.cpp could not create a context of {self._n_ctx} tokens for {text}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        self._n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        mcp = mtmd_cpp.mtmd_context_params_default()
        mcp.use_gpu, mcp.n_threads, mcp.warmup, mcp.print_timings = n_gpu != 0, threads, False, False
        self._mtmd = mtmd_cpp.mtmd_init_from_file(str(mm).encode(), self._model, mcp)
        if not self._mtmd:
            raise ModelFormatError(f"mtmd could not load the mmproj {mm} with {text} (do they belong together?)")
        self._tok_batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._emb_batch = llama_cpp.llama_batch_init(self._n_batch, self._n_embd, 1)
        for b in (self._tok_batch, self._emb_batch):
            for i in range(self._n_batch):
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
        self._n = 0
        self._logits_addr: int | None = None  # where llama.cpp's logits buffer was last seen
        self._logits_view: np.ndarray | None = None
        self._init_sequence()
        self.prefill_chunk = self._n_batch
        self.vision_encodes = 0  # views encoded since load (tests check the cache)

    # ---- contract -----------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self._n

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    # ---- hooks (see Backend) ----------------------------------------------------------------
    def _reset(self) -> None:
        self._ll.llama_memory_clear(self._mem, True)
        self._n = 0

    def _truncate(self, n_past: int) -> None:
        if not self._ll.llama_memory_seq_rm(self._mem, 0, int(n_past), -1):
            raise RuntimeError(f"llama.cpp could not drop cache positions >= {n_past}")
        self._n = int(n_past)

    def _eval(self, kind: str, rows: Any, want_logits: bool) -> np.ndarray | None:
        x = np.asarray(rows, dtype=np.int32) if kind == "text" else rows
        out = self._decode(x, embd=kind == "image", all_logits=False, want_last=want_logits)
        return out[-1] if want_logits else None

    def _forward(self, ids: list[int]) -> np.ndarray:
        if len(ids) == 1 and self._n < self._n_ctx:
            return self._decode_one(ids[0])[None, :].copy()
        if not ids:
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        return self._decode(np.asarray(ids, dtype=np.int32), embd=False, all_logits=True, want_last=True)

    def _forward_last(self, ids: list[int]) -> np.ndarray:
        """llama.cpp computes and returns the last position's logits only; for one token the
        result is a read-only view of llama.cpp's logits buffer (no copy), valid until the next
        decode."""
        if len(ids) == 1 and self._n < self._n_ctx:
            return self._decode_one(ids[0])
        if not ids:
            raise ContextLengthError("forward_last needs at least one token, got 0")
        return self._decode(np.asarray(ids, dtype=np.int32), embd=False, all_logits=False, want_last=True)[-1]

    def _snapshot(self) -> tuple[bytes, int]:
        """The sequence's KV cells as llama.cpp serialises them (llama_state_seq_get_data)."""
        ll = self._ll
        size = int(ll.llama_state_seq_get_size(self._ctx, 0))
        buf = (ctypes.c_uint8 * size)()
        got = int(ll.llama_state_seq_get_data(self._ctx, buf, size, 0))
        if got != size:
            raise RuntimeError(f"llama.cpp saved {got} of {size} bytes of the KV cache")
        return (buf, self._n), size

    def _restore(self, state: Any) -> None:
        buf, n = state
        ll = self._ll
        ll.llama_memory_clear(self._mem, True)
        if int(ll.llama_state_seq_set_data(self._ctx, buf, len(buf), 0)) == 0:
            self._n = 0
            raise RuntimeError("llama.cpp could not restore a saved KV cache (llama_state_seq_set_data)")
        self._n = int(n)

    # ---- internals ----------------------------------------------------------------------------
    def _decode_one(self, token: int) -> np.ndarray:
        """Decode step fast path (one token): fill the batch in place, no numpy temporaries;
        returns a read-only view [vocab] of llama.cpp's logits buffer (cached while the buffer
        stays where it is), so handing the logits to the sampler copies nothing."""
        ll, b = self._ll, self._tok_batch
        b.token[0], b.pos[0], b.logits[0], b.n_tokens = token, self._n, 1, 1
        rc = ll.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {self._n}")
        self._n += 1
        ptr = ll.llama_get_logits(self._ctx)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if addr != self._logits_addr:
            view = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))[:self.config.vocab_size]
            view.flags.writeable = False
            self._logits_view, self._logits_addr = view, addr
        return self._logits_view

    def _decode(self, x: np.ndarray, embd: bool, all_logits: bool, want_last: bool) -> np.ndarray:
        """Decode tokens (int32 [n]) or embeddings (float32 [n, H]) at positions n_past..;
        returns logits [rows, vocab] for every position (all_logits) or just the last."""
        ll = self._ll
        n = len(x)
        if self._n + n > self._n_ctx:
            raise ContextLengthError(f"sequence of {self._n + n} positions exceeds the llama context of {self._n_ctx}")
        b = self._emb_batch if embd else self._tok_batch
        outs = []
        for s in range(0, n, self._n_batch):
            part = x[s:s + self._n_batch]
            k = len(part)
            if embd:
                ctypes.memmove(b.embd, np.ascontiguousarray(part, dtype=np.float32).ctypes.data, part.size * 4)
            else:
                ctypes.memmove(b.token, part.ctypes.data, k * 4)
            pos = np.arange(self._n, self._n + k, dtype=np.int32)
            ctypes.memmove(b.pos, pos.ctypes.data, k * 4)
            flags = np.zeros(k, dtype=np.int8)
            if all_logits:
                flags[:] = 1
            elif want_last and s + k == n:
                flags[-1] = 1
            ctypes.memmove(b.logits, flags.ctypes.data, k)
            b.n_tokens = k
            rc = ll.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at position {self._n}")
            self._n += k
            n_out = int(flags.sum())
            if n_out:
                ptr = ll.llama_get_logits(self._ctx)
                arr = np.ctypeslib.as_array(ptr, shape=(n_out, self._n_vocab))
                outs.append(np.array(arr[:, :self.config.vocab_size], dtype=np.float32))
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, self.config.vocab_size), np.float32)

    def _views_u8(self, image: PreparedImage, i: int) -> np.ndarray:
        """The uint8 RGB view `i` [S, S, 3] that `prepare_image` normalised (exact inverse)."""
        mean = np.asarray(self.config.image_mean, dtype=np.float32)
        std = np.asarray(self.config.image_std, dtype=np.float32)
        a = (image.pixel_values[i].transpose(1, 2, 0) * std + mean) * 255.0
        return np.ascontiguousarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))

    def _encode_view(self, view: np.ndarray) -> np.ndarray:
        mt = self._mt
        S = view.shape[0]
        bmp = mt.mtmd_bitmap_init(S, S, view.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mt.mtmd_input_chunks_init()
        try:
            txt = mt.mtmd_input_text()
            marker = mt.mtmd_default_marker()
            txt.text, txt.text_len, txt.add_special, txt.parse_special = marker, len(marker), False, False
            arr = (mt.mtmd_bitmap_p_ctypes * 1)(bmp)
            rc = mt.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(txt), arr, 1)
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize failed with code {rc}")
            out = None
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                ch = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(ch) != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                if out is not None:
                    raise ModelFormatError("mtmd split one view into several images: the mmproj has image "
                                           "slicing settings r4b-edge does not expect; re-export it")
                n_tok = int(mt.mtmd_input_chunk_get_n_tokens(ch))
                if n_tok != self.config.tokens_per_view:
                    raise ModelFormatError(f"mtmd produced {n_tok} tokens for one view but the model expects "
                                           f"{self.config.tokens_per_view}: the mmproj does not match the text model")
                rc = mt.mtmd_encode_chunk(self._mtmd, ch)
                if rc != 0:
                    raise RuntimeError(f"mtmd_encode_chunk failed with code {rc}")
                ptr = mt.mtmd_get_output_embd(self._mtmd)
                out = np.array(np.ctypeslib.as_array(ptr, shape=(n_tok, self._n_embd)), dtype=np.float32)
            if out is None:
                raise RuntimeError("mtmd returned no image chunk")
            self.vision_encodes += 1
            return out
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bmp)

    def _vision_view(self, image: PreparedImage, i: int) -> np.ndarray:
        return self._encode_view(self._views_u8(image, i))

    def _pack(self, image: PreparedImage, feats: list) -> np.ndarray:
        return numpy_pack(image, feats, self.config, self._newline)

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.device, str(self.model_path), precision=self.precision,
                           extra={"mmproj": str(self.mmproj_path), "n_ctx": self._n_ctx, "threads": self.threads,
                                  "build": build_info()["build"], "repack": self.repack.line()})

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        ll, mt = self._ll, self._mt
        if getattr(self, "_mtmd", None):
            mt.mtmd_free(self._mtmd)
            self._mtmd = None
        for attr in ("_tok_batch", "_emb_batch"):
            b = getattr(self, attr, None)
            if b is not None:
                ll.llama_batch_free(b)
                setattr(self, attr, None)
        if getattr(self, "_ctx", None):
            ll.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
