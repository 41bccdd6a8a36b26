"""Record format round trip, LLaVA conversion, exact training rendering and loss masks."""
from __future__ import annotations


import numpy as np
import pytest

from r4b_edge.errors import TrainingError
from r4b_edge.train import data as D
from r4b_edge.train.stages import tokenizer_texts
from r4b_edge.train.tokenizer import train_tokenizer

IMG_N = 4


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(tokenizer_texts(1, n=20), vocab_size=400)


def rec(mode=None, trace="3+4=7"):
    return D.make_record("r1", "a.png", "What is the sum of all the digits?", "7", trace,
                         {"tier": "reasoning"}, mode)


def test_jsonl_round_trip_and_validation(tmp_path):
    recs = [rec(), dict(rec("think"), id="r2"), D.make_record("t", None, "hi", None)]  # ids unique in a file
    p = D.write_jsonl(tmp_path / "x.jsonl", recs)
    assert D.read_jsonl(p) == recs
    assert not list(tmp_path.glob("*.tmp"))
    bad = rec()
    bad["images"] = []
    with pytest.raises(TrainingError, match="1 <image> placeholders but 0 images"):
        D.validate_record(bad)
    with pytest.raises(TrainingError, match="needs a non-empty trace"):
        D.validate_record(rec("think", trace=None))
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:1: field 'messages': missing.*\n.*bad.jsonl:2: not JSON"):
        D.read_jsonl(tmp_path / "bad.jsonl")


def test_llava_conversion():
    entries = [{"id": "x1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "x2", "image": "2.jpg", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A dog."}]}]
    out = D.convert_llava(entries, image_root="imgs")
    assert out[0]["images"] == ["imgs/coco/1.jpg"] and out[0]["answer"] is None
    assert [m["role"] for m in out[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert out[1]["messages"][0]["content"] == "<image>\nDescribe."
    with pytest.raises(TrainingError, match="unknown speaker 'bot'"):
        D.convert_llava([{"id": 1, "conversations": [{"from": "bot", "value": "x"}]}])
    text = "".join(t for t, _ in D.record_pieces(out[0]))
    assert text == ("<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
                    "<think>\n\n</think>\n\nA cat.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\nBlack.<|im_end|>")


def test_rendered_text_is_the_design_format():
    from r4b_edge.model.template import Message, render_prompt

    head = "<|im_start|>user\n<image>\nWhat is the sum of all the digits?<|im_end|>\n<|im_start|>assistant\n"
    think = "".join(t for t, _ in D.record_pieces(rec(), "think"))
    direct = "".join(t for t, _ in D.record_pieces(rec(), "direct"))
    assert think == head + "<think>\n3+4=7\n</think>\n\n7<|im_end|>"
    assert direct == head + "<think>\n\n</think>\n\n7<|im_end|>"
    assert render_prompt([Message("user", "Q?", images=1)], "no-think") == head.replace(
        "What is the sum of all the digits?", "Q?") + "<think>\n\n</think>\n\n"
    with pytest.raises(TrainingError, match="needs a trace"):
        D.record_pieces({**rec(), "trace": None}, "forced-think")
    with pytest.raises(TrainingError, match="got 'auto'"):
        D.record_pieces(rec(), "auto")


@pytest.mark.parametrize("mode,mask", [("think", False), ("direct", False), ("direct", True)])
def test_piecewise_encoding_equals_whole_text(tok, mode, mask):
    pieces = D.record_pieces(rec(), mode, mask)
    whole = tok.encode("".join(t for t, _ in pieces), add_special_tokens=False).ids
    ids, labels = D.encode_pieces(tok, pieces, image_id=-1, n_image_tokens=1)
    assert ids == whole and len(labels) == len(ids)


def labelled_text(tok, enc):
    return tok.decode([t for t, l in zip(enc.ids, enc.labels) if l != D.IGNORE], skip_special_tokens=False)


def test_loss_masks(tok):
    img = tok.token_to_id("<image>")
    think = D.encode_record(tok, rec(), img, IMG_N, "think")
    assert labelled_text(tok, think) == "\n3+4=7\n</think>\n\n7<|im_end|>"
    direct = D.encode_record(tok, rec(), img, IMG_N, "direct")
    assert labelled_text(tok, direct) == "\n\n</think>\n\n7<|im_end|>"
    masked = D.encode_record(tok, rec(), img, IMG_N, "direct", mask_empty_think=True)
    assert labelled_text(tok, masked) == "7<|im_end|>"  # non-thinking loss masking
    for e in (think, direct, masked):
        assert e.ids.count(img) == IMG_N  # placeholder expanded
        assert all(l == D.IGNORE for t, l in zip(e.ids, e.labels) if t in (img, tok.token_to_id("<think>")))
        assert all(l in (D.IGNORE, t) for t, l in zip(e.ids, e.labels))
    with pytest.raises(TrainingError, match="over max_len 5"):
        D.encode_record(tok, rec(), img, IMG_N, "think", max_len=5)


def test_pixels_match_model_preprocessing(tmp_path):
    from r4b_edge.model.processing import prepare_image
    from r4b_edge.train.recipe import Recipe, model_config
    from r4b_edge.train.world import make_example, render

    cfg = model_config(Recipe.preset("micro"), 400, 396)
    p = tmp_path / "w.png"
    render(make_example(1, 0, "sum")[0]).save(p)
    mine = D.PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std).get(p)
    ref = prepare_image(str(p), cfg)
    assert ref.n_tokens == cfg.tokens_per_view and ref.grid == (0, 0)
    np.testing.assert_allclose(mine, ref.pixel_values[0], atol=1e-6)


def test_collate_right_pads(tok, tmp_path):
    from r4b_edge.train.world import make_example, render

    render(make_example(1, 0, "sum")[0]).save(tmp_path / "a.png")
    img = tok.token_to_id("<image>")
    es = [D.encode_record(tok, rec(), img, IMG_N, "think"), D.encode_record(tok, rec(), img, IMG_N, "direct")]
    b = D.collate(es, D.PixelCache(64, [0.5] * 3, [0.5] * 3), tmp_path, pad_id=0)
    assert b["input_ids"].shape[0] == 2 and b["pixel_values"].shape == (2, 3, 64, 64)
    n1 = len(es[1].ids)
    assert int(b["attention_mask"][1].sum()) == n1 and (b["labels"][1, n1:] == D.IGNORE).all()


def test_stage1_grounding_labels(tok):
    from r4b_edge.train.recipe import Recipe, model_config
    from r4b_edge.train.stages import add_grounding_labels
    from r4b_edge.train.world import make_example

    cfg = model_config(Recipe.preset("micro"), tok.get_vocab_size(), tok.token_to_id("<image>"))
    think = tok.token_to_id("<think>")

    def enc(family, response_slots=True):
        scene, q = make_example(1, 0, family)
        r = D.make_record("g", "a.png", q.question, q.answer, q.trace,
                          {"family": family, "tier": q.tier, "scene": scene.key(), **q.meta})
        e = D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct", mask_empty_think=True)
        before = list(e.labels)
        return scene, q, add_grounding_labels(tok, e, r, cfg, response_slots), before

    scene, q, e, before = enc("digit")
    img = [i for i, t in enumerate(e.ids) if t == cfg.image_token_index]
    assert len(img) == cfg.tokens_per_view == 16  # patch 16: 2 x 2 tokens per cell
    value = [tok.encode(str(it.value)).ids[0] for it in scene.items]
    colour = [tok.encode(" " + it.colour).ids[0] for it in scene.items]
    want = [(colour if r % 2 and c % 2 else value)[(r // 2) * 2 + c // 2] for r in range(4) for c in range(4)]
    assert [e.labels[i + 1] for i in img] == want  # a cell's bottom-right patch: colour; the others: value
    a0 = tok.encode(q.answer).ids[0]
    w = tok.encode(" " + q.meta["pos"]).ids
    start = next(i for i in range(len(e.ids)) if e.ids[i:i + len(w)] == w) + len(w)
    answer_at = len(e.ids) - 2
    assert all(e.labels[i] == a0 for i in range(start, answer_at))  # carried slot by slot
    assert all(e.labels[i] == before[i] for i in range(answer_at, len(e.ids)))  # real targets unchanged
    _, _, e2, before2 = enc("digit", response_slots=False)
    t = e2.ids.index(think)
    assert all(e2.labels[i] == before2[i] for i in range(t + 1, len(e2.ids)))  # annealing: response untouched
    q0 = img[-1] + 2  # the slots of the 4 tokens after the image's newline: colours of cells 0..3
    assert [e.labels[q0 + k + 1] for k in range(4)] == [tok.encode(" " + it.colour).ids[0] for it in scene.items]
    _, q3, e3, before3 = enc("sum")
    n_img = sum(1 for a, b in zip(e3.labels, before3) if a != b)
    assert n_img == 20  # reasoning: image grounding only (16 patches + 4 colours), no answer in the prompt


def test_sft_loss_uses_labels_not_inputs(tok):
    import torch

    from r4b_edge.model.modeling import RForConditionalGeneration
    from r4b_edge.train.losses import sft_loss_sum, token_logprobs
    from r4b_edge.train.recipe import Recipe, model_config

    cfg = model_config(Recipe.preset("micro"), tok.get_vocab_size(), tok.token_to_id("<image>"))
    torch.manual_seed(0)
    m = RForConditionalGeneration(cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    att = torch.ones_like(ids)
    same = {"input_ids": ids, "labels": ids.clone(), "attention_mask": att, "pixel_values": None}
    ls, n = sft_loss_sum(m, same)
    assert n == 4 and torch.allclose(ls, -token_logprobs(m, ids, att, None).sum())
    other = dict(same, labels=torch.tensor([[-100, 11, -100, 12, -100]]))
    lo, n2 = sft_loss_sum(m, other)
    lp = token_logprobs(m, ids, att, None, targets=other["labels"])
    assert n2 == 2 and torch.allclose(lo, -(lp[0, 0] + lp[0, 2]))
    emb = m.embed_tokens(ids)
    logits, _ = m.forward(emb, attention_mask=att, use_cache=False)
    ref = torch.log_softmax(logits[0, 0], -1)[11] + torch.log_softmax(logits[0, 2], -1)[12]
    assert torch.allclose(lo, -ref, atol=1e-5)


def test_colour_anchor_carries_colour_count_answers_from_the_colour_word(tok):
    from r4b_edge.train.stages import add_grounding_labels

    cfg, _, q, r = _world_record(tok, "colour-count")

    def labels(anchor: bool) -> list[int]:
        e = D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct", mask_empty_think=True)
        return add_grounding_labels(tok, e, r, cfg, colour_anchor=anchor).labels

    ids = D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct").ids
    w = tok.encode(" " + q.meta["colour"]).ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(w)] == w) + len(w)
    qmark = max(i for i in range(len(ids)) if tok.decode([ids[i]]).endswith("?"))
    a0 = tok.encode(q.answer).ids[0]
    off, on = labels(False), labels(True)
    span = [i for i in range(start, qmark) if off[i] == D.IGNORE]  # not a cell-colour slot
    assert span and all(on[i] == a0 for i in span)  # from the colour word on
    assert not any(off[i] == a0 for i in span)  # default: only from the `?`
    assert off[qmark + 1:] == on[qmark + 1:]


def test_stage0_text_records():
    from r4b_edge.train.lm import text_records
    from r4b_edge.train.world import PERCEPTION, REASONING

    recs, modes = text_records(1, 3, 4, 0.5)
    assert len(recs) == 3 * len(REASONING) + 4 * len(PERCEPTION) and not any(x["images"] for x in recs)
    fam = [x["meta"]["family"] for x in recs]
    assert all(m == "think" for f, m in zip(fam, modes) if f in REASONING)
    for f in PERCEPTION:
        assert [m for g, m in zip(fam, modes) if g == f] == ["think", "think", "direct", "direct"]
    assert recs[0]["messages"][0]["content"].count("\n") == 4  # four scan lines, then the question
    assert text_records(1, 3, 4)[1].count("direct") == 4 * len(PERCEPTION)


def _world_record(tok, family: str = "colour-count", seed: int = 1, index: int = 0):
    """(micro config, scene, question, record) of one world example."""
    from r4b_edge.train.recipe import Recipe, model_config
    from r4b_edge.train.world import make_example

    cfg = model_config(Recipe.preset("micro"), tok.get_vocab_size(), tok.token_to_id("<image>"))
    scene, q = make_example(seed, index, family)
    r = D.make_record("g", "a.png", q.question, q.answer, q.trace,
                      {"family": family, "tier": q.tier, "scene": scene.key(), **q.meta})
    return cfg, scene, q, r


def test_colour_match_bits_mark_the_cells_of_the_asked_colour(tok):
    from r4b_edge.train.stages import add_grounding_labels

    seen = set()
    for index in range(12):
        cfg, scene, q, r = _world_record(tok, "colour-count", 1, index)
        e = D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct", mask_empty_think=True)
        off = add_grounding_labels(tok, e, r, cfg).labels
        e = D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct", mask_empty_think=True)
        on = add_grounding_labels(tok, e, r, cfg, colour_match=True).labels
        ids = e.ids
        w = tok.encode(" " + q.meta["colour"]).ids
        c = next(i for i in range(len(ids)) if ids[i:i + len(w)] == w) + len(w) - 1
        bits = ["1" if cell.split(":")[2] == q.meta["colour"] else "0" for cell in scene.key().split("|")]
        assert [tok.decode([on[c + 1 + k]]) for k in range(4)] == bits
        assert sum(b == "1" for b in bits) == int(q.answer)
        seen.add(q.answer)
        # the answer is still carried from the `?` on, and nothing else moves
        assert on[c + 5:] == off[c + 5:] and on[:c + 1] == off[:c + 1]
    assert len(seen) >= 2  # the scenes cover more than one count


def test_colour_match_leaves_other_families_alone(tok):
    from r4b_edge.train.stages import add_grounding_labels

    for fam in ("count", "colour", "sum"):
        cfg, _, _, r = _world_record(tok, fam)
        a = add_grounding_labels(tok, D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct"),
                                 r, cfg).labels
        b = add_grounding_labels(tok, D.encode_record(tok, r, cfg.image_token_index, cfg.tokens_per_view, "direct"),
                                 r, cfg, colour_match=True).labels
        assert a == b, fam


def test_colour_count_weight_in_pretrain_and_annealing_mix():
    import numpy as np

    from r4b_edge.errors import TrainingError
    from r4b_edge.train.anneal import mix_weights
    from r4b_edge.train.recipe import Recipe
    from r4b_edge.train.stages import family_weights

    def rec(fam: str, mode: str) -> dict:
        return {"meta": {"family": fam}, "mode": mode, "trace": "t" if fam != "caption" else None}

    recs = [rec("colour-count", "direct"), rec("count", "direct"), rec("digit", "direct")]
    w = family_weights(recs, Recipe(colour_count_weight=3.0))
    assert np.allclose(w, [0.6, 0.2, 0.2])
    assert np.allclose(family_weights(recs, Recipe(colour_count_weight=1.0)), 1 / 3)
    with pytest.raises(TrainingError, match="colour_count_weight=0"):
        family_weights(recs[:1], Recipe(colour_count_weight=0.0))
    # annealing: the group shares (direct : reasoning, trace fraction) do not move with the weight
    cur = recs + [rec("sum", "think"), rec("row-max", "think")]
    for cw in (1.0, 3.0):
        r = Recipe(colour_count_weight=cw, an_direct_to_reasoning=1.0, an_perception_trace_frac=0.1, an_chat_frac=0.0)
        out, modes, wa = mix_weights(cur, r)
        assert wa.sum() == pytest.approx(1.0)
        think = sum(x for x, m, o in zip(wa, modes, out) if m == "think" and o["mode"] == "think")
        traced = sum(x for x, m, o in zip(wa, modes, out) if m == "forced-think" and o["mode"] == "direct")
        assert think == pytest.approx(0.5) and traced == pytest.approx(0.05)
        cc = [x for x, m, o in zip(wa, modes, out) if o["meta"]["family"] == "colour-count" and m == "direct"]
        dg = [x for x, m, o in zip(wa, modes, out) if o["meta"]["family"] == "digit" and m == "direct"]
        assert cc[0] / dg[0] == pytest.approx(cw)


def test_focus_weights_give_colour_count_its_share():
    import numpy as np

    from r4b_edge.errors import TrainingError
    from r4b_edge.train.stages import focus_weights

    recs = [{"meta": {"family": f}} for f in ("colour-count", "count", "digit", "caption", "colour-count")]
    w = focus_weights(recs, 0.5)
    assert np.allclose(w, [0.25, 0.5 / 3, 0.5 / 3, 0.5 / 3, 0.25])
    for bad, rs in ((0.0, recs), (1.0, recs), (0.5, recs[1:4]), (0.5, recs[:1])):
        with pytest.raises(TrainingError, match="pt_focus_share"):
            focus_weights(rs, bad)


def test_forced_think_trains_the_trace_but_not_the_decision(tok):
    rec = D.make_record("f", None, "What is 2+3?", "5", "2+3=5")
    think = D.encode_record(tok, rec, 0, 1, "think")
    forced = D.encode_record(tok, rec, 0, 1, "forced-think")
    assert forced.ids == think.ids  # same tokens, one label fewer
    t = think.ids.index(tok.token_to_id("<think>"))
    assert think.labels[t + 1] == think.ids[t + 1]  # the decision token
    assert forced.labels[t + 1] == D.IGNORE and think.labels[t + 1] != D.IGNORE
    assert forced.labels[t + 2:] == think.labels[t + 2:]
    with pytest.raises(TrainingError, match="forced-think"):
        D.encode_record(tok, rec, 0, 1, "sometimes")
