"""The torch backend: cached engine == naive no-cache oracle, images, stats."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from r4b_edge.backends.torch_backend import TorchBackend
from r4b_edge.engine.generate import Engine, GenerationOptions
from r4b_edge.model.processing import prepare_image
from r4b_edge.model.template import Message

PROMPTS = ["what colour is the square?", "count the dots", "12 + 7 = ?", "describe"]


def _img(seed: int, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    return TorchBackend(tiny_ckpt, device="cpu"), TorchBackend(tiny_ckpt, device="cpu", use_cache=False)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("mode", ["auto", "think", "no-think"])
def test_cached_equals_naive(pair, i, with_image, mode):
    cached, naive = pair
    imgs = [prepare_image(_img(i, size=(40 + 8 * i, 24)), cached.config)] if with_image else []
    msgs = [Message("user", PROMPTS[i], images=len(imgs))]
    opts = GenerationOptions(mode=mode, max_tokens=12)
    a = Engine(cached).generate(msgs, imgs, opts)
    b = Engine(naive).generate(msgs, imgs, opts)
    assert a.token_ids == b.token_ids
    assert a.p_think == pytest.approx(b.p_think, abs=1e-5)


def test_logits_match_step_by_step(pair):
    cached, naive = pair
    img = prepare_image(_img(3), cached.config)
    segs = [cached.tokenizer.encode("<|im_start|>user\n"), img, cached.tokenizer.encode("hi<|im_end|>")]
    la, lb = cached.prefill(segs), naive.prefill(segs)
    assert np.abs(la - lb).max() < 1e-4
    ids = cached.tokenizer.encode("one two three")
    assert np.abs(cached.forward(ids) - naive.forward(ids)).max() < 1e-4
    cached.truncate(cached.n_past - 2)
    naive.truncate(naive.n_past - 2)
    assert cached.n_past == naive.n_past
    assert np.abs(cached.forward(ids[-2:]) - naive.forward(ids[-2:])).max() < 1e-4


def test_image_embedding_cache_and_stats(pair):
    cached, _ = pair
    img = prepare_image(_img(5), cached.config)
    eng = Engine(cached)
    msgs = [Message("user", "what is it?", images=1)]
    r1 = eng.generate(msgs, [img], GenerationOptions(max_tokens=8))
    assert cached.timings.cached_images == 0 or r1.stats.image_tokens == img.n_tokens
    r2 = eng.generate(msgs, [img], GenerationOptions(max_tokens=8))
    assert cached.timings.cached_images == 1
    s = r2.stats
    assert s.image_tokens == img.n_tokens > 0
    assert s.prompt_tokens > s.image_tokens
    assert s.ttft_ms > 0 and s.total_ms >= s.ttft_ms
    assert s.answer_tokens + s.think_tokens <= len(r2.token_ids)
    assert s.peak_rss_mb > 10
    assert s.backend == "torch" and s.device == "cpu"
    assert r1.token_ids == r2.token_ids


# ---- dtype (issue 28) ------------------------------------------------------------------------------
def _timing(faster: bool):
    """A CPU check that says bf16 is faster (0.5x, 0.3x fp32's time) or not (1.5x for a decode step)."""
    from r4b_edge.backends.torch_dtype import CpuBf16Timing

    return lambda hidden: CpuBf16Timing(hidden, 2, (1.0, 10.0), (0.5, 3.0) if faster else (1.5, 3.0))


@pytest.mark.parametrize("asked,device,cuda_bf16,faster,want", [
    ("auto", "cpu", False, True, "bfloat16"), ("auto", "cpu", False, False, "float32"),
    ("auto", "cuda", True, False, "bfloat16"), ("auto", "cuda", False, False, "float16"),
    ("auto", "mps", False, False, "float16"),
    ("bf16", "cpu", False, False, "bfloat16"), ("BFloat16", "cpu", False, False, "bfloat16"),
    ("fp16", "cpu", False, False, "float16"), ("float32", "cuda", True, True, "float32"),
    (None, "cpu", False, True, "float32"), (None, "cuda", True, True, "float16"),
])
def test_dtype_resolution(monkeypatch, asked, device, cuda_bf16, faster, want):
    """auto: bf16 on CUDA (fp16 without bf16), fp16 on MPS, on CPU bf16 only where the check says
    bf16 matmuls are faster at both shapes; names short and long; None keeps the old default."""
    import torch

    from r4b_edge.backends import torch_dtype

    monkeypatch.setattr(torch_dtype, "cuda_bf16", lambda: cuda_bf16)
    asked_hidden = []
    dt, why = torch_dtype.resolve_dtype(asked, device, lambda: asked_hidden.append(1) or 2560, _timing(faster))
    assert dt == getattr(torch, want)
    assert bool(asked_hidden) == (asked == "auto" and device == "cpu")  # the CPU check only where it decides
    if asked == "auto" and device == "cpu":
        assert "CPU bf16 matmul at hidden 2560, 2 thread(s)" in why and ("0.50x" if faster else "1.50x") in why


def test_cpu_bf16_check_is_timed_once(monkeypatch):
    from r4b_edge.backends import torch_dtype

    a = torch_dtype.cpu_bf16_timing(32)
    assert torch_dtype.cpu_bf16_timing(32) is a  # cached per process
    assert a.hidden == 32 and all(t > 0 for t in a.fp32_ms + a.bf16_ms)
    assert a.ratios == (a.bf16_ms[0] / a.fp32_ms[0], a.bf16_ms[1] / a.fp32_ms[1])


def test_backend_takes_dtype_and_reports_it(tiny_ckpt, monkeypatch):
    import torch

    from r4b_edge.backends import torch_dtype

    monkeypatch.setattr(torch_dtype, "cpu_bf16_timing", _timing(True))
    be = TorchBackend(tiny_ckpt, device="cpu", threads=1, dtype="auto")
    assert be.dtype == torch.bfloat16 and be.model.dtype == torch.bfloat16
    assert be.info().precision == "bfloat16" and be.info().extra["dtype"].startswith("bf16 (auto: CPU bf16 matmul at hidden 64")
    logits = be.prefill([[5, 6, 7]])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    monkeypatch.setattr(torch_dtype, "cpu_bf16_timing", _timing(False))
    be = TorchBackend(tiny_ckpt, device="cpu", threads=1, dtype="auto")
    assert be.dtype == torch.float32 and be.info().extra["dtype"].startswith("fp32 (auto: ")
    assert TorchBackend(tiny_ckpt, device="cpu", threads=1, dtype="fp16").dtype == torch.float16


def test_n_ctx_bounds_the_torch_sequence(tiny_ckpt):
    from r4b_edge.engine.generate import Engine, GenerationOptions

    be = TorchBackend(tiny_ckpt, device="cpu", threads=1, n_ctx=40)
    assert be.n_ctx == 40
    r = Engine(be).generate([Message("user", "describe")], [], GenerationOptions(mode="think", max_tokens=500))
    assert r.stats.finish_reason == "length" and be.n_past <= 40


@pytest.mark.parametrize("decode,prefill,bf16", [(0.5, 0.3, True), (1.1, 0.3, True), (1.3, 0.3, False),
                                                 (0.5, 0.95, False), (2.0, 2.0, False)])
def test_cpu_rule_thresholds(decode, prefill, bf16):
    from r4b_edge.backends.torch_dtype import CpuBf16Timing

    assert CpuBf16Timing(2560, 1, (1.0, 10.0), (decode, 10.0 * prefill)).faster is bf16
