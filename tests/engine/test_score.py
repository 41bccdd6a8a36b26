"""`Model.score`: where the continuation starts, values against an uncached torch forward, one prefill for many choices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import r4b_edge
from r4b_edge.backends.torch_backend import TorchBackend
from r4b_edge.engine.score import score_ids
from r4b_edge.errors import ContextLengthError, GenerationOptionError
from r4b_edge.model.template import EMPTY_THINK_CONTINUATION, Message, render_prompt


def _img(seed: int = 0, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu") as m:
        yield m


def _reference(tiny_ckpt, model, image, prompt: str, continuation: str, mode: str) -> np.ndarray:
    """The same numbers from an uncached torch backend: prompt + whole continuation in one forward."""
    be = TorchBackend(tiny_ckpt, device="cpu", use_cache=False)
    tok = be.tokenizer
    rendered = render_prompt([Message("user", prompt, images=1)], mode)
    before, after = rendered.split("<image>")
    ids = tok.encode(continuation)
    last = be.prefill([tok.encode(before), model.prepare(image), tok.encode(after)])
    rows = torch.from_numpy(np.vstack([last[None], be.forward(ids)[:-1]])).double()
    return torch.log_softmax(rows, -1)[torch.arange(len(ids)), torch.tensor(ids)].numpy()


@pytest.mark.parametrize("mode", ["no-think", "think", "auto"])
def test_score_matches_uncached_forward_after_the_mode_prefix(tiny_ckpt, model, mode):
    img = _img(1)
    cont = "The answer is 42."
    s = model.score(img, "what is 6 x 7?", cont, mode=mode)
    want = _reference(tiny_ckpt, model, img, "what is 6 x 7?", cont, mode)
    assert s.ids == model.tokenizer.encode(cont) and "".join(s.tokens) == cont
    np.testing.assert_allclose(s.logprobs, want, atol=1e-5)
    assert s.sum == pytest.approx(float(want.sum()), abs=1e-4)
    assert all(lp <= 0 for lp in s.logprobs)
    rendered = render_prompt([Message("user", "what is 6 x 7?", images=1)], mode)
    n_text = len(model.tokenizer.encode(rendered.replace("<image>", "")))
    assert s.prompt_tokens == n_text + model.prepare(img).n_tokens


def test_modes_give_different_scores_and_prompt_ends_with_prefix(model):
    img = _img(2)
    sums = {m: model.score(img, "q", "yes", mode=m).sum for m in ("auto", "think", "no-think")}
    assert len(set(sums.values())) == 3


def test_greedy_reply_scores_as_greedy(model):
    img = _img(3)
    forced = len(model.tokenizer.encode(EMPTY_THINK_CONTINUATION))  # token_ids start at <think>
    r = model.chat(img, "count the dots", mode="no-think", max_tokens=8 + forced)
    ids = list(r.token_ids[forced:])
    rendered = render_prompt([Message("user", "count the dots", images=1)], "no-think")
    s, other = score_ids(model.engine, rendered, [model.prepare(img)], [ids, ids + [ids[0]] * 3])
    assert s.greedy and s.ids == ids
    assert not other.greedy and other.logprobs[:len(ids)] == pytest.approx(s.logprobs, abs=1e-5)


def test_many_choices_one_prefill_equal_one_by_one(model):
    img = _img(4)
    choices = ["A", "B", "C is longer", "D"]
    calls = []
    prefill = model.backend.prefill
    model.backend.prefill = lambda segs: calls.append(1) or prefill(segs)
    try:
        many = model.score(img, "which?", choices, top_logprobs=3)
    finally:
        model.backend.prefill = prefill
    assert len(calls) == 1 and [s.continuation for s in many] == choices
    for c, s in zip(choices, many):
        one = model.score(img, "which?", c)
        assert s.logprobs == pytest.approx(one.logprobs, abs=1e-5)
        assert len(s.top_logprobs) == len(s.ids) and all(len(t) == 3 for t in s.top_logprobs)
        first = s.top_logprobs[0]
        assert first[0].logprob >= first[1].logprob >= first[2].logprob
    best = max(many, key=lambda s: s.sum)
    assert best.sum == max(s.sum for s in many)


def test_score_errors(model):
    with pytest.raises(GenerationOptionError, match="empty"):
        model.score(None, "q", "")
    with pytest.raises(GenerationOptionError, match="at least one"):
        model.score(None, "q", [])
    with pytest.raises(GenerationOptionError, match="mode"):
        model.score(None, "q", "a", mode="sometimes")
    with pytest.raises(GenerationOptionError, match="top_logprobs"):
        model.score(None, "q", "a", top_logprobs=99)
    with pytest.raises(ContextLengthError, match="continuation"):
        model.score(None, "q", "a b " * 5000)
    assert model.score(None, "text only", "a").prompt_tokens > 0
