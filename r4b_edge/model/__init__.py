"""Model pieces that need no torch: config, tokenizer, image processing.

`modeling` and `checkpoint` import torch; import them explicitly.
"""
from .config import RConfig
from .processing import PreparedImage, count_image_tokens, load_image, prepare_image
from .tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "RConfig", "Tokenizer", "StreamDecoder",
    "load_image", "prepare_image", "PreparedImage", "count_image_tokens",
]
