"""The llama.cpp probe child: `python -m r4b_edge.backends.llama_probe TEXT.gguf [--extra-bufts on|off]
[--mmproj MMPROJ.gguf] [--threads N]`.

Loads the text GGUF on the CPU with llama.cpp's extra buffer types on or off, decodes one batch
of 32 tokens and 4 single tokens (the prefill and decode kernels), checks the logits are finite,
and with `--mmproj` encodes one view through mtmd. Prints `{"ok": true, ...}` and exits 0; any
failure exits non-zero, and a native crash kills only this process (llama_repack.probe reads the
signal). Imports llama_cpp only.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time

import numpy as np


def _fail(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r4b_edge.backends.llama_probe")
    ap.add_argument("text")
    ap.add_argument("--extra-bufts", choices=("on", "off"), default="on")
    ap.add_argument("--mmproj", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import llama_cpp

    from .llama_backend import quiet_llama
    from .llama_repack import CRASH_HOOK_ENV

    t0 = time.perf_counter()
    quiet_llama()
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = a.extra_bufts == "on"
    model = llama_cpp.llama_model_load_from_file(a.text.encode(), mp)
    if not model:
        return _fail(f"llama.cpp could not load {a.text}")
    if a.extra_bufts == "on" and os.environ.get(CRASH_HOOK_ENV) == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)  # the test hook: die as llama.cpp's AMX path does
    n_batch = 32
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 64, n_batch, n_batch
    cp.n_threads = cp.n_threads_batch = max(1, a.threads)
    cp.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        return _fail("llama.cpp could not create a context")
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    ids = [(7 * i + 1) % n_vocab for i in range(n_batch)]
    for i, tok in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, int(i == n_batch - 1)
        batch.seq_id[i][0] = 0
    batch.n_tokens = n_batch
    if llama_cpp.llama_decode(ctx, batch) != 0:
        return _fail("llama_decode failed on a batch of 32 tokens")
    for k in range(4):
        batch.token[0], batch.pos[0], batch.logits[0], batch.n_tokens = ids[k], n_batch + k, 1, 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            return _fail(f"llama_decode failed on single token {k}")
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n_vocab,))
    if not np.isfinite(logits).all():
        return _fail("the logits are not finite")
    out = {"ok": True, "extra_bufts": a.extra_bufts, "decode_s": round(time.perf_counter() - t0, 3)}
    if a.mmproj:
        from llama_cpp import mtmd_cpp

        mcp = mtmd_cpp.mtmd_context_params_default()
        mcp.use_gpu, mcp.n_threads, mcp.warmup, mcp.print_timings = False, max(1, a.threads), False, False
        mt = mtmd_cpp.mtmd_init_from_file(a.mmproj.encode(), model, mcp)
        if not mt:
            return _fail(f"mtmd could not load the mmproj {a.mmproj} with {a.text}")
        px = np.full((32, 32, 3), 128, dtype=np.uint8)
        bmp = mtmd_cpp.mtmd_bitmap_init(32, 32, px.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        txt = mtmd_cpp.mtmd_input_text()
        marker = mtmd_cpp.mtmd_default_marker()
        txt.text, txt.text_len, txt.add_special, txt.parse_special = marker, len(marker), False, False
        arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bmp)
        if mtmd_cpp.mtmd_tokenize(mt, chunks, ctypes.byref(txt), arr, 1) != 0:
            return _fail("mtmd_tokenize failed on a 32x32 image")
        encoded = 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            ch = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(ch) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                if mtmd_cpp.mtmd_encode_chunk(mt, ch) != 0:
                    return _fail("mtmd_encode_chunk failed")
                encoded += 1
        if not encoded:
            return _fail("mtmd produced no image chunk for a 32x32 image")
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bmp)
        mtmd_cpp.mtmd_free(mt)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    out["total_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
