"""R-4B processor for transformers (remote code: `trust_remote_code=True`).

Self-contained: imports only transformers (written for transformers 5.24). The source of truth is
r4b-edge's `r4b_edge/model/hf_remote/`; every model folder r4b-edge writes carries a copy.

Tokenizer + transformers' LLaVA-OneVision image processor (torchvision backend when installed,
else PIL) and the folder's chat template, which takes `thinking_mode` ("auto" | "long" | "short",
or r4b-edge's "think" | "no-think"):

    text = processor.apply_chat_template(messages, add_generation_prompt=True, thinking_mode="auto")
    inputs = processor(images=image, text=text, return_tensors="pt")

Each `<image>` in the text becomes as many `<image>` tokens as the image takes: the base view
(`num_image_tokens`), plus for AnyRes the unpadded tile features and one newline per row
(`anyres_max_N` downsampled as in LLaVA-OneVision). Every image is tiled, also when a prompt holds
several; "base" (no pinpoints) uses the base view alone.
"""
from __future__ import annotations

import math
import re

from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessorMixin

_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


class RProcessor(ProcessorMixin):
    """R-4B processor: image processor + tokenizer + the `thinking_mode` chat template."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=None,
                 vision_aspect_ratio="anyres", image_token="<image>", **kwargs):
        if not isinstance(num_image_tokens, int) or math.isqrt(num_image_tokens) ** 2 != num_image_tokens:
            raise ValueError(f"num_image_tokens must be the square number of tokens per view (got {num_image_tokens!r})")
        self.num_image_tokens = num_image_tokens
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def anyres(self) -> bool:
        """True when images are tiled: an `anyres*` aspect ratio and pinpoints."""
        return (self.vision_aspect_ratio.startswith("anyres")
                and bool(getattr(self.image_processor, "image_grid_pinpoints", None)))

    def _view_size(self) -> int:
        size = self.image_processor.size
        return int(size["height"] if "height" in size else size["shortest_edge"])

    def num_tokens(self, height: int, width: int) -> int:
        """Sequence positions an image of (height, width) takes."""
        p = math.isqrt(self.num_image_tokens)
        if not self.anyres:
            return p * p
        s = self._view_size()
        bh, bw = select_best_resolution([height, width], self.image_processor.image_grid_pinpoints)
        ch, cw = bh // s * p, bw // s * p
        if width / height > cw / ch:
            ch -= 2 * ((ch - int(round(height * (cw / width), 7))) // 2)
        else:
            cw -= 2 * ((cw - int(round(width * (ch / height), 7))) // 2)
        m = _ANYRES_MAX.fullmatch(self.vision_aspect_ratio)
        if m:
            ratio = math.sqrt(ch * cw / (int(m.group(1)) * p * p))
            if ratio > 1.1:
                ch, cw = int(ch // ratio), int(cw // ratio)
        return p * p + ch * cw + ch

    def _process_images(self, images, **kwargs):
        images = make_flat_list_of_images(images)  # one entry per image: every image is tiled
        if not self.anyres:
            s = self._view_size()
            kwargs["image_grid_pinpoints"] = [[s, s]]
        out = self.image_processor(images, **kwargs)
        out.pop("batch_num_images", None)
        if not self.anyres:  # keep the base view (the processor also made one S x S tile)
            pv = out["pixel_values"]
            out["pixel_values"] = pv[:, :1] if hasattr(pv, "shape") else [x[:1] for x in pv]
        sizes = [[int(v) for v in hw] for hw in out["image_sizes"]]
        return out, [self.image_token * self.num_tokens(h, w) for h, w in sizes]

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["pixel_values", "image_sizes"]


__all__ = ["RProcessor"]
