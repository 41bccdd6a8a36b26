"""Prefix reuse on every backend (issue 28 item 1): a follow-up evaluates only the positions after
the longest prefix already in the cache, never the image again, and replies exactly as a model
that prefills every turn from an empty cache (greedy, same tokens). Also `Progress`, an
interrupted prefill, and snapshots / the prefix cache."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import r4b_edge
from r4b_edge import Progress
from r4b_edge.backends.kvcache import PrefixCache
from tests.conftest import export_tiny

BACKENDS = ["torch", "llama", "onnx"]
QUESTIONS = ["how many shapes?", "which colour is the circle?", "and the sum of the digits?"]


def _photo(h: int = 40, w: int = 120, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request, tiny_ckpt, tmp_path_factory):
    """(reusing model, model that prefills every turn from an empty cache), one backend."""
    name = request.param
    if name == "llama":
        pytest.importorskip("llama_cpp")
    if name == "onnx":
        pytest.importorskip("onnxruntime")
    path = tiny_ckpt if name == "torch" else export_tiny(tmp_path_factory, tiny_ckpt, name)
    a = r4b_edge.load(path, backend=name, device="cpu")
    b = r4b_edge.load(path, backend=name, device="cpu")
    b.engine.prefix_reuse = False
    yield a, b
    a.close()
    b.close()


def _turns(model, image, modes):
    conv = model.conversation(image)
    out = []
    for q, mode in zip(QUESTIONS, modes):
        events = list(conv.stream(q, mode=mode, max_tokens=8))
        out.append((events, events[-1].result))
    return out


@pytest.mark.parametrize("modes", [("no-think",) * 3, ("auto", "think", "auto")])
def test_follow_ups_reuse_the_cache_and_reply_the_same(pair, modes) -> None:
    reuse, fresh = pair
    image = _photo()
    got, want = _turns(reuse, image, modes), _turns(fresh, image, modes)
    for turn, ((_, r), (_, w)) in enumerate(zip(got, want)):
        assert r.token_ids == w.token_ids, f"turn {turn + 1}: the reply differs with prefix reuse"
        s, f = r.stats, w.stats
        assert s.positions_evaluated + s.positions_reused == f.positions_evaluated
        assert f.positions_reused == 0
        if turn == 0:
            continue
        # the follow-up evaluates no image position: everything up to the last turn's reply is kept
        assert s.positions_reused > s.image_tokens > 0
        assert s.positions_evaluated < s.prompt_tokens - s.image_tokens
        assert s.vision_encode_ms == 0.0


def test_progress_comes_before_the_decision_and_counts_views_and_positions(pair) -> None:
    model, _ = pair
    image = model.prepare(_photo(seed=5))  # an image no other test encoded
    events = list(model.stream(image, "what is this?", mode="no-think", max_tokens=4))
    first_other = next(i for i, e in enumerate(events) if not isinstance(e, Progress))
    assert all(not isinstance(e, Progress) for e in events[first_other:])
    prog = events[:first_other]
    vision = [(p.done, p.total) for p in prog if p.stage == "vision"]
    views = image.pixel_values.shape[0]
    assert vision == [(i, views) for i in range(views + 1)]
    prefill = [p for p in prog if p.stage == "prefill"]
    assert prefill[0].done == 0 and prefill[-1].done == prefill[-1].total
    assert [p.done for p in prefill] == sorted(p.done for p in prefill)
    assert prefill[-1].total == events[-1].result.stats.positions_evaluated
    assert prog[0].stage == "vision" and all(p.elapsed_ms >= 0 for p in prog)


def test_an_interrupted_prefill_keeps_what_it_evaluated(pair) -> None:
    model, fresh = pair
    be, tok = model.backend, model.tokenizer
    segs = [tok.encode("a long prompt " * 6), model.prepare(_photo(seed=7)), tok.encode(" tell me more")]
    want = fresh.backend.prefill(segs)
    chunk, be.prefill_chunk = be.prefill_chunk, 8
    try:
        steps = be.prefill_steps(segs)
        seen = [next(steps) for _ in range(6)]  # some views and chunks, then the consumer leaves
        steps.close()
        done = max(p.done for p in seen if p.stage == "prefill")
        assert be.n_past == done > 0
        got = be.prefill(segs, reuse=True)
        assert be.timings.positions_reused == done
    finally:
        be.prefill_chunk = chunk
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_snapshot_and_restore(pair) -> None:
    model, _ = pair
    be, tok = model.backend, model.tokenizer
    be.prefill([tok.encode("one two three four")])
    snap = be.snapshot()
    a = be.forward(tok.encode(" five six"))
    be.forward(tok.encode(" seven eight nine"))
    be.restore(snap)
    assert be.n_past == len(snap.keys) and be.cached_keys == snap.keys
    b = be.forward(tok.encode(" five six"))
    assert np.abs(a - b).max() < 1e-4 * max(1.0, float(np.abs(a).max()))
    assert snap.nbytes > 0


def test_the_prefix_cache_serves_alternating_conversations(pair) -> None:
    """Two conversations about two images, turn by turn: with a prefix cache each follow-up
    restores its own conversation's state; replies equal the fresh model's."""
    model, fresh = pair
    be = model.backend
    be.prefix_cache = PrefixCache(256 << 20)
    try:
        images = [model.prepare(_photo(seed=11)), model.prepare(_photo(seed=12, h=60, w=50))]
        history: list[list] = [[], []]
        for q in QUESTIONS[:2]:
            for c in (0, 1):
                msgs = history[c] + [r4b_edge.Message("user", q, images=0 if history[c] else 1)]
                r = model.chat_messages(msgs, [images[c]], mode="no-think", max_tokens=6)
                w = fresh.chat_messages(msgs, [images[c]], mode="no-think", max_tokens=6)
                assert r.token_ids == w.token_ids
                if history[c]:  # a follow-up: its image and first turn come from the prefix cache
                    assert r.stats.positions_reused > r.stats.image_tokens
                history[c] = msgs + [r4b_edge.Message("assistant", r.answer)]
        assert be.prefix_cache.hits >= 1 and len(be.prefix_cache) >= 1
    finally:
        be.prefix_cache = None


@pytest.mark.parametrize("after", [True, False])
def test_ctrl_c_inside_a_chunk_keeps_a_consistent_cache(tiny_ckpt, after) -> None:
    """Ctrl-C lands in the middle of the prefill's loop (after a chunk was evaluated, or before):
    the cache keeps exactly the chunks that are in it, and the same prompt again resumes there."""
    model = r4b_edge.load(tiny_ckpt, backend="torch", device="cpu")
    be, tok = model.backend, model.tokenizer
    segs = [tok.encode("a long prompt " * 8)]
    want = be.prefill(segs)
    be.prefill([[1]])  # something else in the cache
    be.prefill_chunk = 8
    real, calls = be._eval, []

    def interrupted(kind, rows, want_logits):
        calls.append(1)
        if len(calls) == 3:
            if after:
                real(kind, rows, want_logits)
            raise KeyboardInterrupt
        return real(kind, rows, want_logits)

    be._eval = interrupted
    with pytest.raises(KeyboardInterrupt):
        be.prefill(segs, reuse=True)
    del be._eval
    assert be.n_past == len(be.cached_keys) == (24 if after else 16)
    got = be.prefill(segs, reuse=True)
    assert be.timings.positions_reused == be.n_past - be.timings.positions_evaluated == (24 if after else 16)
    assert np.abs(got - want).max() < 1e-4
    model.close()
