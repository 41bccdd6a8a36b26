"""transformers remote code for R-4B folders (`trust_remote_code=True`), shipped as package data.

The three modules here are self-contained (they import torch/transformers, never r4b_edge): they
are copied into every model folder r4b-edge writes (`r4b_edge.model.hf_folder`), and transformers
imports them from the folder. This package only names them; importing it imports no transformers.
Being self-contained, they keep their own copies of what they need from r4b-edge's owners (the
processor's `<image>` default: `r4b_edge.model.reply.IMAGE_PLACEHOLDER`, which hf_folder.py writes
into processor_config.json); they hold none of R-4B's reply rules (`model/reply.py`).
"""
from __future__ import annotations

from pathlib import Path

#: The remote-code files, copied verbatim into model folders.
REMOTE_FILES = ("configuration_r4b.py", "modeling_r4b.py", "processing_r4b.py")
#: config.json `auto_map` (and processor_config.json's AutoProcessor entry).
AUTO_MAP = {
    "AutoConfig": "configuration_r4b.RConfig",
    "AutoModel": "modeling_r4b.RForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_r4b.RForConditionalGeneration",
    "AutoProcessor": "processing_r4b.RProcessor",
}


def source_dir() -> Path:
    """Folder holding the remote-code sources."""
    return Path(__file__).resolve().parent
