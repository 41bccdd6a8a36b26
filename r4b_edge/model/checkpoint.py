"""Load and save the R-4B checkpoint folder (torch).

Folder layout: config.json, model.safetensors or model-0000k-of-0000n.safetensors +
model.safetensors.index.json, tokenizer.json, tokenizer_config.json (chat_template),
optionally chat_template.jinja, generation_config.json, preprocessor_config.json. Folders this
module writes also carry the transformers remote code and processor configs (hf_folder.py).

Everything is validated from the safetensors headers before any weight is read. Tensors the
model does not use are accepted and ignored: the SigLIP `post_layernorm.*` (R-4B's projector
`pre_norm` takes its place) and the SigLIP pooling `head.*`. Tensor names in the other layouts
transformers writes are renamed by one table, CHECKPOINT_RENAMES (see its comment).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ModelFormatError, ModelNotFoundError
from ..fsutil import replace_dir
from .config import RConfig
from .hf_folder import write_hf_files
from .modeling import RForConditionalGeneration
from .reply import ENDOFTEXT
from .tokenizer import Tokenizer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")

#: Tensors a checkpoint may carry that this model does not use (ignored on load).
IGNORED_TENSORS = re.compile(r"^model\.vision_tower\.vision_model\.(post_layernorm|head)\.")
#: Tensor names -> R-4B names, like transformers' `_checkpoint_conversion_mapping`: the first
#: pattern that matches renames (re.subn), names that match none are kept. It covers
#:   R-4B / transformers >= 4.52: model.language_model.*, model.vision_tower.vision_model.*,
#:     model.multi_modal_projector.*, model.image_newline, lm_head.* (kept as they are);
#:   transformers < 4.52: language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
#:     multi_modal_projector.*, image_newline;
#:   transformers 5 `save_pretrained` of a model built from a config (LlavaOnevision classes): as
#:     < 4.52 but the SigLIP tower without its `vision_model.` level (vision_tower.embeddings.*), and
#:     its in-memory state_dict (model.vision_tower.embeddings.*).
CHECKPOINT_RENAMES: dict[str, str] = {
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^(?:model\.)?vision_tower\.(?:vision_model\.)?": "model.vision_tower.vision_model.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
    r"^image_newline$": "model.image_newline",
}
_RENAMES = [(re.compile(k), v) for k, v in CHECKPOINT_RENAMES.items()]


def canonical_name(name: str) -> str:
    """R-4B tensor name of `name` (CHECKPOINT_RENAMES; R-4B names are returned unchanged)."""
    for pattern, repl in _RENAMES:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new
    return name


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Shard paths and the index weight_map (None for a single file); errors name the file."""
    idx = folder / INDEX_NAME
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{idx}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(wm, dict) or not wm:
            raise ModelFormatError(f"{idx}: `weight_map` is empty or not an object")
        shards = sorted(set(wm.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelFormatError(f"{idx} names shard(s) missing from {folder}: {_list(missing)}")
        return [folder / s for s in shards], wm
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single], None
    if list(folder.glob("model-*-of-*.safetensors")):
        raise ModelFormatError(f"{INDEX_NAME} missing in {folder} (shards are present but no index)")
    raise ModelFormatError(f"no weights in {folder}: expected {SINGLE_NAME} or {INDEX_NAME} + shards")


def read_headers(files: Sequence[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[str, list[int], str]]:
    """{canonical name: (file, shape, stored name)} from the safetensors headers (no data read)."""
    out: dict[str, tuple[str, list[int], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if weight_map is not None and weight_map.get(k) not in (None, f.name):
                        continue  # the index says this tensor lives in another shard
                    name = canonical_name(k)
                    if name in out:
                        raise ModelFormatError(
                            f"{f.name}: tensors {out[name][2]!r} and {k!r} both map to {name!r} "
                            "(a checkpoint mixes two naming layouts)")
                    out[name] = (str(f), list(sf.get_slice(k).get_shape()), k)
        except ModelFormatError:
            raise
        except Exception as e:  # safetensors raises SafetensorError/OSError on bad files
            raise ModelFormatError(f"{f}: not a readable safetensors file ({e})") from None
    if weight_map is not None:
        absent = [k for k, s in weight_map.items() if canonical_name(k) not in out]
        if absent:
            raise ModelFormatError(f"{INDEX_NAME} lists tensor(s) not found in their shard: {_list(absent)}")
    return out


def _empty_model(config: RConfig) -> RForConditionalGeneration:
    with torch.device("meta"):
        return RForConditionalGeneration(config, init_weights=False)


def expected_shapes(config: RConfig) -> dict[str, list[int]]:
    """R-4B tensor names and shapes for `config` (lm_head.weight omitted when tied)."""
    sd = _empty_model(config).state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: list(v.shape) for k, v in sd.items()}


def validate_tensors(config: RConfig, headers: dict[str, tuple[str, list[int], str]]) -> None:
    """Raise ModelFormatError naming missing / unexpected tensors and shape mismatches."""
    exp = expected_shapes(config)
    have = {k for k in headers if not IGNORED_TENSORS.match(k)}
    missing = set(exp) - have
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    unexpected = have - set(exp) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_list(unexpected)}")
    bad = [f"{k} {headers[k][1]} (expected {exp[k]}, in {Path(headers[k][0]).name})"
           for k in sorted(have & set(exp)) if headers[k][1] != exp[k]]
    if bad:
        problems.append("shape mismatch: " + "; ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
    if problems:
        raise ModelFormatError("checkpoint does not match config.json: " + "; ".join(problems))


def _materialize_buffers(model: RForConditionalGeneration) -> None:
    """Recreate the non-persistent buffers (RoPE, SigLIP position ids) of a meta-built model."""
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    emb = model.model.vision_tower.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelFormatError(f"tensors left uninitialised after loading: {_list(left)}")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[RForConditionalGeneration, RConfig, Tokenizer]:
    """Load an R-4B folder -> (model in eval mode, config, tokenizer). dtype None means float32."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelNotFoundError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} is not a folder (expected a model folder with config.json)")
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"config.json missing in {folder}")
    config = RConfig.from_file(folder / "config.json")
    if not (folder / "tokenizer.json").is_file():
        raise ModelFormatError(f"tokenizer.json missing in {folder}")
    tokenizer = Tokenizer.from_dir(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json "
                               f"text_config.vocab_size is {config.vocab_size}")
    files, wm = weight_files(folder)
    headers = read_headers(files, wm)
    validate_tensors(config, headers)

    dtype = dtype or torch.float32
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for k, t in load_file(str(f), device="cpu").items():
            name = canonical_name(k)
            if headers.get(name, (None,))[0] == str(f) and not IGNORED_TENSORS.match(name):
                state[name] = t.to(dtype) if t.is_floating_point() else t
    model = _empty_model(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    del state
    _materialize_buffers(model)
    model.to(device=device).eval()
    return model, config, tokenizer


# ---- saving ----------------------------------------------------------------------------------
def _plan_shards(sd: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _write_tokenizer(src: "Tokenizer | str | os.PathLike | Sequence[str | os.PathLike]", out: Path) -> Tokenizer:
    if isinstance(src, Tokenizer):
        src.save(out)
    else:
        paths = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(p) for p in src]
        if len(paths) == 1 and paths[0].is_dir():
            paths = [paths[0] / n for n in TOKENIZER_FILES if (paths[0] / n).is_file()]
        for p in paths:
            if not p.is_file():
                raise ModelFormatError(f"tokenizer file not found: {p}")
            shutil.copyfile(p, out / p.name)
    if not (out / "tokenizer.json").is_file():
        raise ModelFormatError("tokenizer.json missing from the tokenizer files given to save_checkpoint")
    return Tokenizer.from_dir(out)


def save_checkpoint(model: RForConditionalGeneration, config: RConfig,
                    tokenizer_dir_or_files: "Tokenizer | str | os.PathLike | Sequence[str | os.PathLike]",
                    out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the R-4B folder atomically (temp folder, then rename); returns the folder path.

    The folder is also a complete Hugging Face repo (hf_folder.write_hf_files): remote code,
    `auto_map`, processor configs and the chat template."""
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        shards = _plan_shards(sd, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_NAME), metadata=meta)
        else:
            n = len(shards)
            wm = {}
            for i, sh in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(sh, str(tmp / name), metadata=meta)
                wm.update({k: name for k in sh})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
        cfg = config.to_dict()
        cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        tok = _write_tokenizer(tokenizer_dir_or_files, tmp)
        if tok.chat_template and not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        gen = {"eos_token_id": sorted(tok.eos_ids), "pad_token_id": tok.token_to_id(ENDOFTEXT),
               "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        write_hf_files(tmp, config)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
