"""Tokenizer wrapper and the UTF-8-safe stream decoder."""
from __future__ import annotations

import json

import pytest

from r4b_edge.errors import ModelFormatError, ModelNotFoundError
from r4b_edge.model.tokenizer import StreamDecoder, Tokenizer


def test_special_ids(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    for tok, tid in [("<|im_start|>", t.im_start), ("<|im_end|>", t.im_end), ("<think>", t.think),
                     ("</think>", t.end_think), ("<image>", t.image)]:
        assert t.encode(tok) == [tid]
    assert t.eos_ids == {t.im_end, t.token_to_id("<|endoftext|>")}
    assert t.vocab_size > t.image
    assert t.chat_template and "<|im_start|>" in t.chat_template


def test_encode_decode_round_trip(tiny_tokenizer: Tokenizer) -> None:
    text = "<|im_start|>user\n<image>\nWhat is 12 + 30? café 東京<|im_end|>\n<think>\n\n</think>\n\n42"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.im_start == ids[0]  # no BOS added
    assert "<|im_start|>" not in tiny_tokenizer.decode(ids, skip_special=True)


def test_stream_decoder_multibyte(tiny_tokenizer: Tokenizer) -> None:
    text = "naïve 東京 € 🙂 ok " * 3 + "x" * 100
    ids = tiny_tokenizer.encode(text)
    sd = StreamDecoder(tiny_tokenizer)
    pieces = [sd.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + sd.flush() == text


def test_stream_decoder_flush_incomplete(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("🙂")
    assert len(ids) > 1  # byte-level pieces of one 4-byte char
    sd = StreamDecoder(tiny_tokenizer)
    assert sd.push(ids[0]) == ""
    assert sd.flush() == "\ufffd"


def test_missing_special_token(tmp_path, tiny_tokenizer_dir) -> None:
    d = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    d["added_tokens"] = [a for a in d["added_tokens"] if a["content"] != "</think>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json.*</think>"):
        Tokenizer.from_dir(tmp_path)


def test_dir_errors(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_save_reload(tmp_path, tiny_tokenizer: Tokenizer) -> None:
    tiny_tokenizer.save(tmp_path)
    t2 = Tokenizer.from_dir(tmp_path)
    assert t2.encode("hi <think> 7") == tiny_tokenizer.encode("hi <think> 7")
    assert t2.chat_template == tiny_tokenizer.chat_template and t2.eos_ids == tiny_tokenizer.eos_ids


def _metaspace_tokenizer() -> Tokenizer:
    """A sentencepiece-style tokenizer (Metaspace: the decoder drops the first word's space),
    where decoding tokens one by one would lose spaces."""
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers

    words = ["▁hello", "▁world", "▁a", "b", "c", "▁東京", "é", "<0xF0>", "<unk>"]
    hf = HF(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.add_special_tokens([AddedToken(t, special=True) for t in
                           ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<image>", "<|endoftext|>")])
    return Tokenizer(hf, eos_token="<|im_end|>")


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("which", ["byte-level", "metaspace"])
def test_stream_decoder_equals_full_decode_and_decode_stream(which, shared, tiny_tokenizer: Tokenizer) -> None:
    """Random id sequences: the pushes + flush give exactly decode(all ids), and the pieces
    equal those of the tokenizers library's own `DecodeStream` wherever it emits text.
    `shared`: every decoder shares one `piece_len` cache (as the engine's do)."""
    import random

    from tokenizers.decoders import DecodeStream

    tok = tiny_tokenizer if which == "byte-level" else _metaspace_tokenizer()
    rng = random.Random(0)
    pool = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    cache: dict[int, int] = {}
    for _ in range(30):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 80))]
        sd = StreamDecoder(tok, piece_len=cache) if shared else StreamDecoder(tok)
        ds = DecodeStream(skip_special_tokens=False)
        ours, theirs = [], []
        for i in ids:
            ours.append(sd.push(i))
            theirs.append(ds.step(tok.backend, i) or "")
        assert "".join(ours) + sd.flush() == tok.decode(ids)
        if "\ufffd" not in tok.decode(ids):
            assert "".join(ours) == "".join(theirs)
    if shared:
        assert cache and all(n == len(tok.decode([i])) for i, n in cache.items())
