"""`<think>` and `</think>` are plain added tokens (`"special": false`), as in Qwen3's and R-4B's
tokenizers, in every tokenizer r4b-edge writes (bundled, training, checkpoints, HF folders), so
stock tools keep them in a reply's text; the other added tokens stay special. The flag changes no
id: chat-template and training encodings, r4b-edge's decoding and its chat output are the same
with the tags marked special (the files written before) as without."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from r4b_edge.api import BUNDLED_MODEL, EXAMPLE_IMAGE
from r4b_edge.model.template import MODE_ALIASES, THINK_CLOSE, THINK_OPEN, Message, render_conversation
from r4b_edge.model.tokenizer import (
    TEXT_TOKENS, StreamDecoder, Tokenizer, mark_text_tokens, mark_tokenizer_files,
)

ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<think>", "</think>")
pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "tokenizer.json").exists(), reason="no bundled model")


def _flags(folder: Path) -> tuple[dict, dict]:
    """content -> special, from tokenizer.json and from tokenizer_config.json."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return ({a["content"]: a["special"] for a in tj["added_tokens"]},
            {a["content"]: a["special"] for a in tc["added_tokens_decoder"].values()})


def _qwen3_flags(flags: dict) -> None:
    assert TEXT_TOKENS == (THINK_OPEN, THINK_CLOSE)
    assert set(flags) == set(ADDED)
    assert {t for t, special in flags.items() if not special} == {"<think>", "</think>"}, flags


def _unmark(folder: Path) -> None:
    """Rewrite `folder`'s tokenizer files as r4b-edge wrote them before: the think tags special."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for a in tj["added_tokens"]:
        a["special"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for a in tc["added_tokens_decoder"].values():
        a["special"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with its tokenizer files as they were shipped before (tags special)."""
    d = tmp_path_factory.mktemp("old-tags") / "model"
    shutil.copytree(BUNDLED_MODEL, d)
    _unmark(d)
    _, tc = _flags(d)
    assert all(tc.values())
    return d


def test_bundled_tokenizer_marks_think_tags_as_qwen3() -> None:
    tj, tc = _flags(BUNDLED_MODEL)
    _qwen3_flags(tj)
    _qwen3_flags(tc)
    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    assert {tok.think, tok.end_think} <= tok.special_ids  # r4b-edge's own bookkeeping is unchanged


def test_training_tokenizer_marks_think_tags_as_qwen3(tiny_tokenizer_dir: Path) -> None:
    """train/tokenizer.py (every trained tokenizer, the test fixtures' included) writes the added
    tokens exactly as the bundled files hold them, flags and all."""
    tj, tc = _flags(tiny_tokenizer_dir)
    _qwen3_flags(tj)
    _qwen3_flags(tc)
    def entries(d: Path) -> list[tuple]:
        added = json.loads((d / "tokenizer.json").read_text())["added_tokens"]
        return sorted((a["content"], a["special"], a["normalized"], a["lstrip"], a["rstrip"], a["single_word"])
                      for a in added)

    assert entries(tiny_tokenizer_dir) == entries(BUNDLED_MODEL)


def test_saved_checkpoints_mark_think_tags(tiny_ckpt: Path, old_folder: Path, tmp_path: Path) -> None:
    """save_checkpoint / write_hf_files mark them, also from tokenizer files written before."""
    from r4b_edge.model.config import RConfig
    from r4b_edge.model.hf_folder import write_hf_files

    for flags in _flags(tiny_ckpt):
        _qwen3_flags(flags)

    d = tmp_path / "m"
    shutil.copytree(old_folder, d)
    write_hf_files(d, RConfig.from_file(d))
    for flags in _flags(d):
        _qwen3_flags(flags)
    # Tokenizer.save (save_checkpoint given a Tokenizer) marks them too
    Tokenizer.from_dir(old_folder).save(tmp_path / "saved")
    for flags in _flags(tmp_path / "saved"):
        _qwen3_flags(flags)


def test_mark_tokenizer_files_changes_flags_only(old_folder: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(old_folder / name, d / name)
    before = {n: json.loads((d / n).read_text()) for n in ("tokenizer.json", "tokenizer_config.json")}
    assert mark_tokenizer_files(d) is True
    for flags in _flags(d):
        _qwen3_flags(flags)
    after = {n: json.loads((d / n).read_text()) for n in ("tokenizer.json", "tokenizer_config.json")}
    for doc in (*before.values(), *after.values()):
        for a in doc.get("added_tokens") or doc["added_tokens_decoder"].values():
            a.pop("special")
    assert after == before  # nothing but the flags moved
    stamp = {n: (d / n).stat().st_mtime_ns for n in ("tokenizer.json", "tokenizer_config.json")}
    assert mark_tokenizer_files(d) is False  # already marked: left untouched
    assert {n: (d / n).stat().st_mtime_ns for n in stamp} == stamp
    assert (BUNDLED_MODEL / "tokenizer_config.json").read_bytes() != (old_folder / "tokenizer_config.json").read_bytes()
    tok = Tokenizer.from_dir(d).backend
    assert mark_text_tokens(tok) is tok


def _texts() -> list[str]:
    """Chat-template outputs: prompts in every mode and training examples in every target mode,
    with images, history, a system turn, and tags written inside the text."""
    from r4b_edge.train.world import make_example

    out = []
    for i, family in enumerate(["digit", "count", "total", "colour-count"]):
        _, q = make_example(7, i, family)
        user = Message("user", q.question, images=1)
        hist = [Message("system", "Answer briefly."), Message("user", "How many digits?", images=1),
                Message("assistant", "4", reasoning="I count them")]
        for mode in MODE_ALIASES:
            out.append("".join(t for t, _ in render_conversation([*hist, user], mode)))
        for target in ("think", "forced-think", "direct"):
            convo = [user, Message("assistant", q.answer, reasoning=q.trace or "look")]
            out.append("".join(t for t, _ in render_conversation(convo, target)))
    out.append("a <think> inside </think> text</think><think>\n\n</think>\n\n<|im_end|>")
    return out


def test_encodings_and_decoding_unchanged(old_folder: Path) -> None:
    """Same ids for every template output and training record, same text back from r4b-edge's
    decoding (whole and streamed) of those ids and of random ids."""
    from r4b_edge.train.data import encode_record, make_record

    new, old = Tokenizer.from_dir(BUNDLED_MODEL), Tokenizer.from_dir(old_folder)
    assert new.backend.get_added_tokens_decoder()[new.think].special is False
    assert old.backend.get_added_tokens_decoder()[old.think].special is True
    texts = _texts()
    for text in texts:
        ids = new.encode(text)
        assert ids == old.encode(text), text
        assert new.decode(ids) == old.decode(ids) == text
    from r4b_edge.train.world import make_example

    for i, family in enumerate(["digit", "count", "total"]):
        _, q = make_example(3, i, family)
        rec = make_record(f"r{i}", "x.png", q.question, q.answer, q.trace or "look")
        for mode in ("think", "forced-think", "direct"):
            a = encode_record(new.backend, rec, new.image, 16, mode=mode)
            b = encode_record(old.backend, rec, old.image, 16, mode=mode)
            assert (a.ids, a.labels) == (b.ids, b.labels)
            assert new.think in a.ids
    rng = random.Random(0)
    seqs = [new.encode(t) for t in texts] + [[rng.randrange(new.vocab_size) for _ in range(rng.randrange(1, 40))]
                                            for _ in range(300)]
    for ids in seqs:
        assert new.decode(ids) == old.decode(ids)
        sa, sb = StreamDecoder(new), StreamDecoder(old)
        assert [sa.push(t) for t in ids] + [sa.flush()] == [sb.push(t) for t in ids] + [sb.flush()]


@pytest.mark.parametrize("mode", ["auto", "think", "no-think"])
def test_chat_output_unchanged(old_folder: Path, mode: str) -> None:
    """The bundled model's reasoning and answer are the same with the old files."""
    import r4b_edge

    pytest.importorskip("torch")
    q = "What is the sum of all the digits?"
    a, b = (r4b_edge.load(f, backend="torch", device="cpu").chat(EXAMPLE_IMAGE, q, mode=mode, max_tokens=256)
            for f in (BUNDLED_MODEL, old_folder))
    assert (a.reasoning, a.answer) == (b.reasoning, b.answer)
    assert THINK_OPEN not in a.answer + a.reasoning and THINK_CLOSE not in a.answer + a.reasoning
    if mode != "no-think":
        assert a.answer == "18"


def test_transformers_decode_keeps_think_tags(tiny_ckpt: Path) -> None:
    """transformers' `decode(skip_special_tokens=True)` keeps the tags and drops `<|im_end|>`, as
    with Qwen3's tokenizer, for the bundled folder and a saved checkpoint."""
    transformers = pytest.importorskip("transformers")
    text = "<think>\nsix plus twelve is 18\n</think>\n\n18<|im_end|>"
    for folder in (BUNDLED_MODEL, tiny_ckpt):
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == Tokenizer.from_dir(folder).encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == "<think>\nsix plus twelve is 18\n</think>\n\n18"
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert set(tok.all_special_tokens) >= {"<|im_end|>"}
        assert not {"<think>", "</think>"} & set(tok.all_special_tokens)
