"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` (tokenizer.json), no torch/transformers.

Works on the project's own tokenizer (train/tokenizer.py) and on real Qwen tokenizer.json files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import ModelFormatError, ModelNotFoundError
from .reply import END_TOKENS, ENDOFTEXT, IM_END, IM_START, IMAGE_PLACEHOLDER, THINK_CLOSE, THINK_OPEN

#: Added tokens marked `"special": false`, as Qwen3's and R-4B's tokenizers mark them (the other
#: added tokens are special). Stock tools then keep them in a reply's text: llama.cpp renders them
#: (GGUF type USER_DEFINED, not CONTROL), transformers' `decode(skip_special_tokens=True)` keeps
#: them, so a client (or a reasoning parser) can split a reply's reasoning from its answer there.
#: The flag changes no id and no encoding: added tokens are matched in text either way.
TEXT_TOKENS = (THINK_OPEN, THINK_CLOSE)


class Tokenizer:
    """Byte-level BPE tokenizer with the ChatML / thinking / image special ids."""

    def __init__(self, tok: _HFTokenizer, chat_template: str | None = None,
                 eos_token: str | None = None, source: str = "tokenizer.json") -> None:
        self._tok = tok
        self.chat_template = chat_template
        self.source = source
        self.im_start = self._required(IM_START)
        self.im_end = self._required(IM_END)
        self.think = self._required(THINK_OPEN)
        self.end_think = self._required(THINK_CLOSE)
        self.image = self._required(IMAGE_PLACEHOLDER)
        eos = {self.im_end}
        for t in (*END_TOKENS, eos_token):
            if t and tok.token_to_id(t) is not None:
                eos.add(tok.token_to_id(t))
        self.eos_ids: set[int] = eos
        self.special_ids: set[int] = {
            tid for tid, at in tok.get_added_tokens_decoder().items() if at.special
        } | {self.im_start, self.im_end, self.think, self.end_think, self.image}
        self._bytes: dict[int, bytes] = {}
        self._byte_level: bool | None = None

    def _required(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ModelFormatError(f"{self.source}: special token {token!r} is missing from the vocabulary")
        return int(tid)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json / chat_template.jinja if present) from a folder."""
        d = Path(path)
        if not d.is_dir():
            raise ModelNotFoundError(f"tokenizer folder not found: {d}")
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise ModelFormatError(f"tokenizer.json missing in {d}")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise ModelFormatError(f"{tj}: cannot be parsed as a tokenizer ({e})") from None
        template, eos = None, None
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{tc}: cannot be read as JSON ({e})") from None
            template = cfg.get("chat_template")
            e = cfg.get("eos_token")
            eos = e.get("content") if isinstance(e, dict) else e
            if isinstance(template, list):  # named templates: take "default"
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = d / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(tok, chat_template=template, eos_token=eos, source=str(tj))

    @property
    def vocab_size(self) -> int:
        """Number of ids (regular + added tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens in the text are parsed; no BOS is added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; `skip_special` drops special tokens."""
        return self._tok.decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, tid: int) -> bytes:
        """The exact bytes token `tid` stands for (OpenAI's logprobs `bytes`): an
        added token's UTF-8 content; a byte-level BPE piece mapped back through
        GPT-2's byte table (so a token holding half of a UTF-8 character gives
        its real bytes, where `decode([tid])` would give U+FFFD)."""
        hit = self._bytes.get(tid)
        if hit is not None:
            return hit
        if self._byte_level is None:
            dec = json.loads(self._tok.to_str()).get("decoder") or {}
            self._byte_level = dec.get("type") == "ByteLevel"
        added = self._tok.get_added_tokens_decoder().get(tid)
        piece = self._tok.id_to_token(tid)
        if piece is None:
            raise ValueError(f"token id {tid} is outside the vocabulary of {self.vocab_size} ids")
        if added is not None:
            out = added.content.encode("utf-8")
        elif self._byte_level:
            table = _unicode_to_byte()
            out = bytes(table[c] for c in piece)
        else:  # other decoders (sentencepiece-style): the token's own text
            out = self.decode([tid]).encode("utf-8")
        self._bytes[tid] = out
        return out

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (with chat_template) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok = mark_text_tokens(self._tok)
        tok.save(str(out / "tokenizer.json"))
        cfg = {
            "added_tokens_decoder": added_tokens_decoder(tok), "bos_token": None, "eos_token": IM_END,
            "pad_token": ENDOFTEXT if self._tok.token_to_id(ENDOFTEXT) is not None else None,
            "unk_token": None, "tokenizer_class": "Qwen2Tokenizer", "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False),
                                                   encoding="utf-8")


def mark_text_tokens(tok: _HFTokenizer) -> _HFTokenizer:
    """`tok` with the `TEXT_TOKENS` it holds marked non-special, as Qwen3 marks them (`tok`
    itself when none is special). Ids, merges and encodings stay the same."""
    d = json.loads(tok.to_str())
    hits = [at for at in d.get("added_tokens") or () if at.get("content") in TEXT_TOKENS and at.get("special")]
    if not hits:
        return tok
    for at in hits:
        at["special"] = False
    return _HFTokenizer.from_str(json.dumps(d, ensure_ascii=False))


def added_tokens_decoder(tok: _HFTokenizer) -> dict[str, dict]:
    """tokenizer_config.json's `added_tokens_decoder` for `tok`: id -> the added token's flags."""
    return {
        str(tid): {"content": at.content, "lstrip": at.lstrip, "normalized": at.normalized,
                   "rstrip": at.rstrip, "single_word": at.single_word, "special": at.special}
        for tid, at in sorted(tok.get_added_tokens_decoder().items())
    }


def mark_tokenizer_files(folder: str | Path) -> bool:
    """Mark the `TEXT_TOKENS` non-special in `folder`'s tokenizer.json and tokenizer_config.json
    (files written before r4b-edge marked them as Qwen3 does); a file already marked is left
    untouched. Returns whether a file was rewritten."""
    d = Path(folder)
    changed = False
    tj = d / "tokenizer.json"
    if tj.is_file():
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise ModelFormatError(f"{tj}: cannot be parsed as a tokenizer ({e})") from None
        marked = mark_text_tokens(tok)
        if marked is not tok:
            marked.save(str(tj))
            changed = True
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            text = tc.read_text(encoding="utf-8")
            cfg = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{tc}: cannot be read as JSON ({e})") from None
        dec = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        hits = [at for at in (dec.values() if isinstance(dec, dict) else ())
                if isinstance(at, dict) and at.get("content") in TEXT_TOKENS and at.get("special")]
        for at in hits:
            at["special"] = False
        if hits:
            end = "\n" if text.endswith("\n") else ""
            tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + end, encoding="utf-8")
            changed = True
    return changed


_U2B: dict[str, int] = {}


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE
    vocabulary writes for each byte -> that byte."""
    if not _U2B:
        bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
        cs = list(bs)
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _U2B.update({chr(c): b for b, c in zip(bs, cs)})
    return _U2B


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only newly stable text.

    Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until completed.
    After each stable piece only the last token is kept as context (the algorithm of
    `tokenizers.decoders.DecodeStream`), so a push decodes a handful of ids, not a window.
    `piece_len`: a cache of ``len(decode([id]))`` (the kept context's length) that may be
    shared by the decoders of one tokenizer and `skip_special`, so a push decodes once.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False,
                 piece_len: dict[int, int] | None = None) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._emitted = 0  # chars of decode(self._ids) already returned
        self._piece_len: dict[int, int] = {} if piece_len is None else piece_len

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became stable."""
        ids = self._ids
        ids.append(int(token_id))
        text = self._tok.decode(ids, skip_special=self._skip)
        if text.endswith("\ufffd") or len(text) <= self._emitted:
            return ""
        new = text[self._emitted:]
        if len(ids) > 1:  # keep the last token as the prefix that gives the next one its spacing
            del ids[:-1]
            last = ids[0]
            n = self._piece_len.get(last)
            if n is None:
                n = self._piece_len[last] = len(self._tok.decode(ids, skip_special=self._skip))
            self._emitted = n
        else:
            self._emitted = len(text)
        return new

    def flush(self) -> str:
        """Return whatever is left (incomplete bytes become U+FFFD)."""
        text = self._tok.decode(self._ids, skip_special=self._skip)
        new = text[self._emitted:]
        self._ids, self._emitted = [], 0
        return new
