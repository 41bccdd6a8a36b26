"""The eval against the runtime on the bundled model (torch, CPU, greedy; a few items): its
follow-up chats are the ones `r4b_edge.api.Conversation` holds, its batched p_think is the
engine's, and its token count is the engine's `Result.token_ids` (which the benchmarks and the
API usage report)."""
from __future__ import annotations

import pytest

from r4b_edge.api import BUNDLED_MODEL
from r4b_edge.train import world as W

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").exists(), reason="no bundled model")
FAMILIES = ["digit", "colour-count", "sum", "total"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from r4b_edge import load
    from r4b_edge.train.recipe import Recipe
    from r4b_edge.train.data import PixelCache
    from r4b_edge.train.evaluate import load_eval_model
    from r4b_edge.train.rollout import Roller

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("items")
    items = []
    for it in W.eval_items(per_family=2, families=FAMILIES):
        it["image"].save(root / f"{it['id']}.png")
        items.append(dict(it, scene=it["scene"].key(), image=f"{it['id']}.png", pil=it["image"]))
    model, cfg, tok = load_eval_model(BUNDLED_MODEL)
    pixels = PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std)
    roller = Roller(model, tok, cfg, root, pixels)
    rt = load(None, backend="torch", device="cpu", threads=1)
    r = Recipe(ev_max_new=80, ev_batch=16)
    return items, root, (model, cfg, tok, pixels), roller, rt, r


def test_p_think_batched_is_the_engines(setup):
    from r4b_edge.train.eval_calibration import p_think_batched

    items, root, (model, cfg, tok, pixels), _, rt, _ = setup
    p, own = p_think_batched(model, tok, cfg, items, root, pixels, chunk=3)  # uneven chunks, left padding
    for it, pi, oi in zip(items, p, own):
        res = rt.chat(it["pil"], it["question"], mode="auto", max_tokens=80)
        assert pi == pytest.approx(res.p_think, abs=2e-4)
        assert bool(oi) == res.thought  # greedy: the engine's own choice


def test_token_count_is_the_engines(setup):
    from r4b_edge.train.evaluate import reply_budget

    items, _, (_, _, tok, _), roller, rt, r = setup
    for mode in ("auto", "think", "no-think"):
        ro = roller.run(items, mode, max_new=reply_budget(tok, mode, 80), chunk=8)
        for it, x in zip(items, ro):
            res = rt.chat(it["pil"], it["question"], mode=mode, max_tokens=80)
            assert x.parsed.n_tokens == len(res.token_ids) == res.stats.think_tokens + res.stats.answer_tokens, (mode, it["id"])
            if mode == "no-think":
                assert x.parsed.answer.strip() == res.answer


def test_follow_ups_are_the_runtime_conversation(setup):
    from r4b_edge.model.reply import has_think_tag
    from r4b_edge.train.eval_chat import follow_up_items, runtime_answer
    from r4b_edge.train.evaluate import raw_answers

    items, _, _, roller, rt, r = setup
    fu = follow_up_items(items, W.EVAL_SEED, lambda rows: raw_answers(roller.run(rows, "auto", max_new=80, chunk=16)))
    final = {t: roller.run(fu[t], "auto", max_new=80, chunk=16) for t in (2, 3)}
    for t in (2, 3):
        for it, x in zip(fu[t], final[t]):
            conv = rt.conversation(it["pil"])
            for q, a in it["history"]:
                got = conv.ask(q, mode="auto", max_tokens=80)
                assert got.answer == a  # the history holds exactly what the runtime kept
            res = conv.ask(it["question"], mode="auto", max_tokens=80)
            assert res.thought == x.parsed.thought and res.answer == runtime_answer(x.parsed.answer)
            if not has_think_tag(x.parsed.answer):  # the engine ends a reply at a think tag; the eval counts it
                assert len(res.token_ids) == x.parsed.n_tokens
