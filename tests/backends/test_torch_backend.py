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
