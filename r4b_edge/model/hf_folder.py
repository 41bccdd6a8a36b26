"""Make an R-4B folder a complete Hugging Face repo (transformers / vLLM / SGLang), without torch.

`write_hf_files(folder, config)` adds what other tools need next to the weights and tokenizer:
the remote-code files (copied from `r4b_edge/model/hf_remote/`, the one source), `auto_map` in
config.json, preprocessor_config.json (the LLaVA-OneVision image processor's settings),
processor_config.json (RProcessor) and the chat template (template.CHAT_TEMPLATE) in
chat_template.jinja and tokenizer_config.json; it marks the think tags non-special in the
tokenizer files, as Qwen3's are (tokenizer.TEXT_TOKENS). Then, with transformers installed:

    AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor
        .from_pretrained(folder, trust_remote_code=True)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ModelFormatError
from .config import PREPROCESSOR_CONFIG, RConfig, read_json
from .hf_remote import AUTO_MAP, REMOTE_FILES, source_dir
from .reply import IMAGE_PLACEHOLDER
from .template import CHAT_TEMPLATE
from .tokenizer import mark_tokenizer_files

PROCESSOR_NAME = "processor_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"


def _write_json(p: Path, d: dict) -> None:
    p.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def preprocessor_dict(config: RConfig) -> dict:
    """preprocessor_config.json for transformers' LlavaOnevisionImageProcessor (bicubic, SigLIP norm)."""
    s = config.image_size
    d = {
        "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "RProcessor",
        "do_resize": True, "size": {"height": s, "width": s}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": config.image_mean, "image_std": config.image_std,
        "do_convert_rgb": True, "do_pad": True,
    }
    if config.anyres:
        d["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints or []]
    return d


def processor_dict(config: RConfig) -> dict:
    """processor_config.json for the remote RProcessor."""
    return {
        "processor_class": "RProcessor", "auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]},
        "num_image_tokens": config.tokens_per_view, "image_token": IMAGE_PLACEHOLDER,
        "vision_aspect_ratio": config.vision_aspect_ratio if config.anyres else "base",
    }


def copy_remote_code(folder: Path) -> list[Path]:
    """Copy the remote-code files into `folder`; returns their paths there."""
    src = source_dir()
    out = []
    for name in REMOTE_FILES:
        shutil.copyfile(src / name, folder / name)
        out.append(folder / name)
    return out


def write_hf_files(folder: str | Path, config: RConfig) -> Path:
    """Add remote code, auto_map, processor configs and the chat template to an R-4B folder that
    already holds config.json and the tokenizer files (tokenizer.json, tokenizer_config.json),
    and mark its think tags non-special there as Qwen3 does (`mark_tokenizer_files`)."""
    folder = Path(folder)
    cfg_path, tc_path = folder / "config.json", folder / "tokenizer_config.json"
    for p in (cfg_path, tc_path):
        if not p.is_file():
            raise ModelFormatError(f"{p.name} missing in {folder} (write the model folder first)")
    copy_remote_code(folder)
    cfg = read_json(cfg_path)
    cfg["auto_map"] = dict(AUTO_MAP)
    cfg["vision_config"].setdefault("vision_use_head", False)  # R-4B uses no SigLIP pooling head
    _write_json(cfg_path, cfg)
    _write_json(folder / PREPROCESSOR_CONFIG, preprocessor_dict(config))
    _write_json(folder / PROCESSOR_NAME, processor_dict(config))
    mark_tokenizer_files(folder)
    tc = read_json(tc_path)
    tc["chat_template"] = CHAT_TEMPLATE
    _write_json(tc_path, tc)
    (folder / CHAT_TEMPLATE_NAME).write_text(CHAT_TEMPLATE, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m r4b_edge.model.hf_folder FOLDER...`: add the HF files to existing R-4B folders."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m r4b_edge.model.hf_folder", description=main.__doc__)
    ap.add_argument("folders", nargs="+", type=Path)
    for folder in ap.parse_args(argv).folders:
        write_hf_files(folder, RConfig.from_file(folder))
        print(f"{folder}: {', '.join(REMOTE_FILES)}, {PREPROCESSOR_CONFIG}, {PROCESSOR_NAME}, {CHAT_TEMPLATE_NAME}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
