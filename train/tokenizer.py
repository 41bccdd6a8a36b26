"""Train the project's byte-level BPE tokenizer with `tokenizers`.

Qwen2's pre-tokenizer regex + ByteLevel, so the file exports to GGUF as
`tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "qwen2"` unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from r4b_edge.model.reply import ENDOFTEXT, IM_END, IM_START, IMAGE_PLACEHOLDER, THINK_CLOSE, THINK_OPEN
from r4b_edge.model.tokenizer import TEXT_TOKENS, added_tokens_decoder, mark_text_tokens

# Qwen2's pre-tokenizer split pattern (as in Qwen2/Qwen3 tokenizer.json).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Order fixes the ids: they follow the regular vocabulary. All are special (skipped by
# `decode(skip_special_tokens=True)`, CONTROL in a GGUF) but the think tags (`TEXT_TOKENS`),
# which are plain added tokens as in Qwen3's tokenizer, so stock tools keep them in the text.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE_PLACEHOLDER, THINK_OPEN, THINK_CLOSE]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the added tokens (`SPECIAL_TOKENS`) get the last ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_special = len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=t not in TEXT_TOKENS, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, chat_template: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (HF layout) into out_dir."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = mark_text_tokens(tok)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "added_tokens_decoder": added_tokens_decoder(tok),
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "model_max_length": 4096,
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
