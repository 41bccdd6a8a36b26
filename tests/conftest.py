"""Shared fixtures: a tiny trained tokenizer and tiny random R-4B checkpoints (exact layout)."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

# A suite started as a background job of a non-interactive shell (`bash .ci/run &`, nohup under a
# CI runner) inherits SIGINT ignored; every child would inherit that too, and Python leaves an
# ignored SIGINT ignored, so the tests that press Ctrl-C on a child (chat REPL, pull, serve)
# would test nothing but the launch. A handled signal is reset to the default in a child at exec,
# so installing Python's own handler here gives every child the terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite writes nothing to the user's store folder (~/.cache/r4b-edge): the llama backend's
# repack probe verdicts and anything else stored go to one folder per run, shared by the tests
# (so each kind of GGUF is probed once per run). Tests of the store set their own.
if "R4B_EDGE_HOME" not in os.environ:
    os.environ["R4B_EDGE_HOME"] = tempfile.mkdtemp(prefix="r4b-edge-tests-home-")
    atexit.register(shutil.rmtree, os.environ["R4B_EDGE_HOME"], True)


def tiny_corpus() -> list[str]:
    """Chat-like text with digits, punctuation and some non-ASCII, for tokenizer training."""
    words = ("the cat sat on a red mat; what colour is the square? count the dots. "
             "answer: 42. think step by step, then reply briefly. café naïve 東京 ñ €").split()
    lines = []
    for i in range(400):
        q = " ".join(words[(i * 7 + j) % len(words)] for j in range(8))
        lines.append(f"<|im_start|>user\n<image>\n{q} {i} + {i * 3 % 97} = ?<|im_end|>\n"
                     f"<|im_start|>assistant\n<think>\n{i} plus {i * 3 % 97} is {i + i * 3 % 97}.\n</think>\n\n"
                     f"The answer is {i + i * 3 % 97}.<|im_end|>\n")
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with tokenizer.json + tokenizer_config.json of a small byte-level BPE."""
    from r4b_edge.model.template import CHAT_TEMPLATE  # the template every r4b-edge folder carries
    from r4b_edge.train.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(tiny_corpus(), vocab_size=512)
    save_tokenizer(tok, out, CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from r4b_edge.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_tokenizer_dir)


def _tiny_config(tokenizer, anyres: bool):
    from r4b_edge.testing import tiny_config

    return tiny_config(anyres=anyres, vocab_size=tokenizer.vocab_size, image_token_index=tokenizer.image)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path, tiny_tokenizer) -> Path:
    """Tiny random R-4B folder: AnyRes config, SHARDED safetensors + index."""
    from r4b_edge.testing import write_random_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-r4b"
    return write_random_checkpoint(out, _tiny_config(tiny_tokenizer, True), tiny_tokenizer_dir,
                                   seed=0, max_shard_bytes=400_000)


@pytest.fixture(scope="session")
def tiny_ckpt_base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path, tiny_tokenizer) -> Path:
    """Tiny random R-4B folder: base view only (no AnyRes), single model.safetensors."""
    from r4b_edge.testing import write_random_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-r4b-base"
    return write_random_checkpoint(out, _tiny_config(tiny_tokenizer, False), tiny_tokenizer_dir, seed=1)


def export_tiny(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, backend: str) -> Path:
    """`ckpt` exported for `backend` (onnx fp32 / gguf F16) under the session's base temp,
    so tests of several modules share one export per session."""
    base = tmp_path_factory.getbasetemp()
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        from r4b_edge.export.onnx import export_onnx

        return export_onnx(ckpt, base / f"onnx-{ckpt.name}-fp32", "fp32")
    pytest.importorskip("llama_cpp")
    from r4b_edge.export.gguf import export_gguf

    return export_gguf(ckpt, base / f"apps-gguf-{ckpt.name}-f16", quant="F16").out_dir
