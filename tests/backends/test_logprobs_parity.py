"""Logprobs agree on every backend: `Model.score` (and its top-k) on torch, onnx (fp32 export) and llama (F16 GGUF)
of the same tiny checkpoint, on AnyRes images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import r4b_edge
from tests.conftest import export_tiny

#: max |logprob difference| vs torch fp32 (logits: onnx fp32 ~1e-6, GGUF F16 ~3e-3; STACK.md)
BOUND = {"onnx": 1e-4, "llama": 2e-2}
CHOICES = ["A", "B) the red square", "four", "The answer is 42.", "</think>\n\nno"]


def _img(seed: int, size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu") as m:
        yield {(seed, mode): m.score(_img(seed, size), "which one?", CHOICES, mode=mode, top_logprobs=5)
               for seed, size in ((0, (40, 24)), (1, (24, 64))) for mode in ("no-think", "auto")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "llama"])
def test_score_agrees_with_torch(tmp_path_factory, tiny_ckpt, reference, backend):
    path = export_tiny(tmp_path_factory, tiny_ckpt, backend)
    worst = 0.0
    with r4b_edge.load(path, backend=backend, device="cpu") as m:
        for (seed, mode), want in reference.items():
            size = (40, 24) if seed == 0 else (24, 64)
            got = m.score(_img(seed, size), "which one?", CHOICES, mode=mode, top_logprobs=5)
            for g, w in zip(got, want):
                assert g.ids == w.ids and g.tokens == w.tokens and g.prompt_tokens == w.prompt_tokens
                worst = max(worst, float(np.abs(np.subtract(g.logprobs, w.logprobs)).max()))
                for gt, wt in zip(g.top_logprobs, w.top_logprobs):
                    gl, wl = [t.logprob for t in gt], [t.logprob for t in wt]
                    np.testing.assert_allclose(gl, wl, atol=BOUND[backend])
                    # the same alternatives, except where two of them are closer than the bound
                    for i, (a, b) in enumerate(zip(gt, wt)):
                        if a.id != b.id:
                            assert abs(a.logprob - b.logprob) <= BOUND[backend], (i, a, b)
            best_g = max(range(len(got)), key=lambda i: got[i].sum)
            best_w = max(range(len(want)), key=lambda i: want[i].sum)
            assert best_g == best_w or abs(got[best_g].sum - want[best_w].sum) < BOUND[backend] * 8
    print(f"{backend}: max |logprob - torch| = {worst:.2e}")
    assert worst < BOUND[backend]


def _reply_entries(m, mode: str):
    r = m.chat(_img(2, (40, 24)), "what is it?", mode=mode, max_tokens=12, max_think_tokens=6,
               logprobs=True, top_logprobs=3)
    return r.reasoning_logprobs + r.logprobs


@pytest.fixture(scope="module")
def reference_replies(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu") as m:
        return {mode: _reply_entries(m, mode) for mode in ("no-think", "think")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "llama"])
def test_reply_logprobs_agree_with_torch(tmp_path_factory, tiny_ckpt, reference_replies, backend):
    """Greedy replies with logprobs=True: the same tokens with the same logprobs and alternatives, up to
    the first position where two candidates are closer than the bound (where greedy may differ)."""
    path = export_tiny(tmp_path_factory, tiny_ckpt, backend)
    with r4b_edge.load(path, backend=backend, device="cpu") as m:
        for mode, want in reference_replies.items():
            got = _reply_entries(m, mode)
            assert want and got
            for g, w in zip(got, want):
                if g.id != w.id:  # a near tie: both candidates within the bound at torch's position
                    alt = {t.id: t.logprob for t in w.top_logprobs}
                    assert g.id in alt and abs(alt[g.id] - w.logprob) <= 2 * BOUND[backend], (mode, g, w)
                    break
                assert abs(g.logprob - w.logprob) <= BOUND[backend], (mode, g, w)
                np.testing.assert_allclose([t.logprob for t in g.top_logprobs], [t.logprob for t in w.top_logprobs],
                                           atol=BOUND[backend])
            else:
                assert len(got) == len(want), mode
