"""The onnx backend: parity with torch (greedy tokens + logits), KV
cache (IO binding, truncate), image cache, devices/providers, the engine and CLI on top."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r4b_edge.backends import create_backend, detect_format
from r4b_edge.backends.onnx_backend import OnnxBackend, resolve_onnx_device as resolve_device
from r4b_edge.backends.torch_backend import TorchBackend
from r4b_edge.engine.generate import Engine, GenerationOptions
from r4b_edge.errors import BackendUnavailableError, ModelFormatError, ModelNotFoundError
from r4b_edge.export.onnx import export_onnx
from r4b_edge.model.config import RConfig
from r4b_edge.model.modeling import RForConditionalGeneration
from r4b_edge.model.processing import prepare_image
from r4b_edge.model.template import Message
from r4b_edge.testing import tiny_config

#: fp32 ONNX vs torch fp32: max |logit difference| allowed (measured ~1e-6 on the tiny models)
LOGIT_BOUND = 1e-4
QUESTIONS = ["what colour is the square?", "count the dots", "12 + 7 = ?", "describe the image",
             "what digit is in the top-left cell?", "how many shapes are there?", "think step by step",
             "sum of all digits?", "which row is larger?", "answer: 42?"]
SIZES = [(40, 24), (24, 40), (64, 64), (33, 50), (80, 20), (32, 32), (50, 33), (20, 70), (45, 45), (64, 30)]


def _img(seed: int, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _export(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, precision: str = "fp32") -> Path:
    return export_onnx(ckpt, tmp_path_factory.getbasetemp() / f"onnx-{ckpt.name}-{precision}", precision)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny_ckpt) -> Path:
    return _export(tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="module")
def pair(onnx_dir, tiny_ckpt):
    return OnnxBackend(onnx_dir, device="cpu"), TorchBackend(tiny_ckpt, device="cpu")


def _greedy(be, segs, n: int) -> tuple[list[int], list[np.ndarray]]:
    logits = be.prefill(segs)
    toks, rows = [], [logits]
    for _ in range(n):
        toks.append(int(np.argmax(logits)))
        logits = be.forward([toks[-1]])[-1]
        rows.append(logits)
    return toks, rows


@pytest.mark.slow
def test_greedy_32_tokens_match_torch_on_20_image_prompts(pair):
    ob, tb = pair
    tok = tb.tokenizer
    worst = 0.0
    for i in range(20):
        img = prepare_image(_img(i, SIZES[i % len(SIZES)]), tb.config)
        segs = [tok.encode("<|im_start|>user\n"), img,
                tok.encode(f"\n{QUESTIONS[i % len(QUESTIONS)]}<|im_end|>\n<|im_start|>assistant\n<think>")]
        ta, ra = _greedy(ob, segs, 32)
        tt, rt = _greedy(tb, segs, 32)
        assert ta == tt, f"prompt {i}: greedy tokens differ"
        worst = max(worst, max(float(np.abs(a - b).max()) for a, b in zip(ra, rt)))
    assert worst < LOGIT_BOUND, worst


def test_forward_truncate_and_counts(pair):
    ob, tb = pair
    img = prepare_image(_img(3), tb.config)
    segs = [tb.tokenizer.encode("<|im_start|>user\n"), img, tb.tokenizer.encode("hi<|im_end|>")]
    assert np.abs(ob.prefill(segs) - tb.prefill(segs)).max() < LOGIT_BOUND
    assert ob.n_past == tb.n_past == len(segs[0]) + img.n_tokens + len(segs[2])
    assert ob.image_token_count(img) == img.n_tokens
    ids = tb.tokenizer.encode("one two three")
    fa = ob.forward(ids)
    assert fa.shape == (len(ids), tb.config.vocab_size) and fa.dtype == np.float32
    assert np.abs(fa - tb.forward(ids)).max() < LOGIT_BOUND
    for be in pair:
        be.truncate(be.n_past - 2)
        be.truncate(be.n_past + 5)  # beyond the end: no-op
    assert ob.n_past == tb.n_past
    assert np.abs(ob.forward(ids[-2:]) - tb.forward(ids[-2:])).max() < LOGIT_BOUND
    ob.truncate(0)
    assert ob.n_past == 0


def test_image_cache_and_timings(pair):
    ob, _ = pair
    img = prepare_image(_img(7), ob.config)
    segs = [[1, 2], img, [3]]
    a = ob.prefill(segs)
    assert ob.timings.image_tokens == img.n_tokens and ob.timings.cached_images == 0
    assert ob.timings.vision_encode_ms > 0 and ob.timings.prefill_ms > 0
    b = ob.prefill(segs)
    assert ob.timings.cached_images == 1
    assert np.array_equal(a, b)



@pytest.mark.parametrize("budget,grid", [(None, (2, 2)), (50, (1, 2)), (30, (2, 1)), (20, (0, 0))])
def test_budgeted_image_matches_torch(pair, budget, grid):
    """An image prepared under an image-token budget (issue 28): the numpy packing of the chosen grid,
    the positions it takes and the logits equal torch's; each grid is its own cache entry."""
    ob, tb = pair
    img = prepare_image(_img(11, (70, 50)), tb.config, budget)
    assert img.grid == grid
    segs = [tb.tokenizer.encode("<|im_start|>user\n"), img, tb.tokenizer.encode("hi<|im_end|>")]
    assert np.abs(ob.prefill(segs) - tb.prefill(segs)).max() < LOGIT_BOUND
    assert ob.timings.image_tokens == ob.image_token_count(img) == img.n_tokens
    assert ob.n_past == tb.n_past == len(segs[0]) + img.n_tokens + len(segs[2])
    assert ob.timings.cached_images == 0  # not the features of another grid of the same pixels


def test_n_ctx_bounds_the_onnx_sequence(onnx_dir):
    be = create_backend(onnx_dir, backend="onnx", device="cpu", threads=1, n_ctx=24)
    try:
        assert be.n_ctx == 24
        r = Engine(be).generate([Message("user", "hi")], [], GenerationOptions(mode="think", max_tokens=500))
        assert r.stats.finish_reason == "length" and be.n_past <= 24
    finally:
        be.close()

def test_kv_cache_stays_in_ortvalues(pair):
    """Decode feeds the bound present outputs back as OrtValues (no numpy round trip)."""
    import onnxruntime as ort

    ob, _ = pair
    ob.prefill([[1, 2, 3]])
    first = ob._past[0]
    assert isinstance(first, ort.OrtValue) and first.shape()[2] == 3
    ob.forward([4])
    assert all(isinstance(v, ort.OrtValue) for v in ob._past) and ob._past[0].shape()[2] == 4
    assert ob._past[0] is not first


@pytest.mark.slow
def test_base_only_checkpoint(tmp_path_factory, tiny_ckpt_base):
    d = _export(tmp_path_factory, tiny_ckpt_base)
    ob, tb = OnnxBackend(d, device="cpu"), TorchBackend(tiny_ckpt_base, device="cpu")
    img = prepare_image(_img(1, (50, 30)), tb.config)
    assert img.grid == (0, 0)
    segs = [[5, 6], img, [7, 8]]
    ta, ra = _greedy(ob, segs, 32)
    tt, rt = _greedy(tb, segs, 32)
    assert ta == tt
    assert max(float(np.abs(a - b).max()) for a, b in zip(ra, rt)) < LOGIT_BOUND


def test_resolve_device():
    assert resolve_device("auto", ["CPUExecutionProvider"]) == "cpu"
    assert resolve_device("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert resolve_device("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert resolve_device("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cpu"
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        resolve_device("cuda", ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="CoreMLExecutionProvider"):
        resolve_device("mps", ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="unknown device"):
        resolve_device("tpu", ["CPUExecutionProvider"])


def test_threads_and_unknown_arguments(onnx_dir):
    from r4b_edge.errors import BackendOptionError

    be = create_backend(onnx_dir, backend="onnx", device="cpu", threads=1)
    try:
        assert be.threads == 1 and be.info().extra["threads"] == 1
        assert be._dec.get_session_options().intra_op_num_threads == 1
    finally:
        be.close()
    with pytest.raises(BackendOptionError, match="unknown argument.s. n_batch for the onnx backend: it takes device, "
                                                 "threads, n_ctx"):
        create_backend(onnx_dir, backend="onnx", device="cpu", n_batch=512)  # was swallowed by **_
    with pytest.raises(BackendOptionError, match=r"dtype \(--dtype\) is a torch backend option .*the ONNX export "
                                                 "precision"):
        create_backend(onnx_dir, backend="onnx", device="cpu", dtype="bf16")
    with pytest.raises(BackendOptionError, match="threads must be a whole number >= 1"):
        OnnxBackend(onnx_dir, device="cpu", threads=0)


def test_registry_and_errors(onnx_dir, tmp_path):
    assert detect_format(onnx_dir) == "onnx"
    be = create_backend(onnx_dir, backend="onnx", device="cpu")
    info = be.info()
    assert info.name == "onnx" and info.precision == "fp32" and "CPUExecutionProvider" in info.extra["providers"]
    be.close()
    with pytest.raises(ModelNotFoundError, match="genai_config.json"):
        OnnxBackend(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ModelFormatError, match="not an r4b-edge ONNX export"):
        OnnxBackend(tmp_path)


@pytest.mark.parametrize("mode", ["auto", "think", "no-think"])
def test_engine_results_match_torch(pair, mode):
    ob, tb = pair
    img = prepare_image(_img(11, (48, 32)), tb.config)
    msgs = [Message("user", "what is in the image?", images=1)]
    opts = GenerationOptions(mode=mode, max_tokens=16, max_think_tokens=6, measure_p_think=True)
    a, b = Engine(ob).generate(msgs, [img], opts), Engine(tb).generate(msgs, [img], opts)
    assert a.token_ids == b.token_ids and a.answer == b.answer and a.reasoning == b.reasoning
    assert a.p_think == pytest.approx(b.p_think, abs=1e-5)
    assert a.stats.image_tokens == img.n_tokens


def test_cli_chat_with_onnx_backend(onnx_dir, tmp_path, capsys):
    from r4b_edge.apps.cli import main

    png = tmp_path / "x.png"
    _img(4, (40, 30)).save(png)
    rc = main(["chat", str(png), "what?", "--backend", "onnx", "--model", str(onnx_dir), "--device", "cpu",
               "--max-tokens", "6", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stats"]["image_tokens"] > 0 and "p_think" in r


@pytest.mark.slow
def test_real_r4b_geometry(tmp_path_factory, tiny_tokenizer_dir, tiny_tokenizer):
    """R-4B's image geometry (384 px, patch 14 -> 729 tokens per view, its 3x3 pinpoints) and
    vocabulary size on narrow random weights: numpy AnyRes packing + decoder == torch."""
    from r4b_edge.testing import write_random_checkpoint

    d = tiny_config(anyres=True, vocab_size=151936, image_token_index=tiny_tokenizer.image,
                    num_hidden_layers=1, max_position_embeddings=16384).to_dict()
    d["vision_config"].update(image_size=384, patch_size=14, num_hidden_layers=1)
    d["image_grid_pinpoints"] = [[384 * r, 384 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("real") / "geo", RConfig.from_dict(d), tiny_tokenizer_dir)
    ob, tb = OnnxBackend(_export(tmp_path_factory, ckpt), device="cpu"), TorchBackend(ckpt, device="cpu")
    assert ob.config.tokens_per_view == 729
    for size in [(800, 600), (300, 1000)]:
        img = prepare_image(_img(9, size), tb.config)
        assert img.grid != (0, 0) and img.n_tokens > 729
        segs = [[1, 2], img, [3, 4]]
        ta, ra = _greedy(ob, segs, 8)
        tt, rt = _greedy(tb, segs, 8)
        assert ta == tt
        assert max(float(np.abs(a - b).max()) for a, b in zip(ra, rt)) < LOGIT_BOUND
