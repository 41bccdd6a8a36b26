"""Checkpoint folder: save/load round-trip, sharding, validation errors, the real R-4B layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r4b_edge.errors import ModelFormatError, ModelNotFoundError
from r4b_edge.model.checkpoint import INDEX_NAME, load_checkpoint, save_checkpoint
from r4b_edge.model.config import RConfig
from r4b_edge.model.modeling import RForConditionalGeneration
from r4b_edge.testing import write_random_checkpoint

torch.set_num_threads(1)


def _logits(model: RForConditionalGeneration, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(model.embed_tokens(torch.tensor([ids])), use_cache=False)[0]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _single_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_sharded_layout(tiny_ckpt: Path) -> None:
    names = {p.name for p in tiny_ckpt.iterdir()}
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json"} <= names
    idx = json.loads((tiny_ckpt / INDEX_NAME).read_text())
    assert set(idx["weight_map"].values()) == set(shards)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "R" and cfg["image_grid_pinpoints"]
    assert json.loads((tiny_ckpt / "tokenizer_config.json").read_text())["chat_template"]
    assert not [p for p in tiny_ckpt.parent.iterdir() if ".tmp-" in p.name]


def test_round_trip_logits(tiny_ckpt: Path, tmp_path: Path) -> None:
    model, cfg, tok = load_checkpoint(tiny_ckpt)
    assert cfg.anyres and tok.image == cfg.image_token_index and not model.training
    ids = tok.encode("<|im_start|>user\nhi 12<|im_end|>\n")
    out = save_checkpoint(model, cfg, tok, tmp_path / "again")  # single file this time
    assert (out / "model.safetensors").is_file() and not (out / INDEX_NAME).exists()
    model2, _, _ = load_checkpoint(out)
    assert torch.equal(_logits(model, ids), _logits(model2, ids))
    assert model.state_dict().keys() == model2.state_dict().keys()


def test_random_checkpoint_is_seeded(tiny_ckpt: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    cfg = RConfig.from_file(tiny_ckpt)
    out = write_random_checkpoint(tmp_path / "again", cfg, tiny_tokenizer_dir, seed=0)
    a, b = load_checkpoint(tiny_ckpt)[0], load_checkpoint(out)[0]
    assert torch.equal(_logits(a, [5, 6, 7]), _logits(b, [5, 6, 7]))


def test_base_ckpt_and_dtype(tiny_ckpt_base: Path) -> None:
    model, cfg, _ = load_checkpoint(tiny_ckpt_base, dtype=torch.bfloat16)
    assert not cfg.anyres and (tiny_ckpt_base / "model.safetensors").is_file()
    assert model.dtype == torch.bfloat16 and _logits(model, [1, 2]).dtype == torch.bfloat16


def test_overwrite_is_atomic_replace(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    model, cfg, tok = load_checkpoint(tiny_ckpt_base)
    out = tmp_path / "ck"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_checkpoint(model, cfg, tok, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_real_r4b_extra_tensors_and_old_layout(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    """Files may carry SigLIP post_layernorm / pooling head (ignored) or pre-4.52 names (renamed)."""
    ck = _copy(tiny_ckpt_base, tmp_path)
    sd = _single_state(ck)
    v = "model.vision_tower.vision_model."
    extra = {v + "post_layernorm.weight": torch.ones(64), v + "post_layernorm.bias": torch.zeros(64),
             v + "head.probe": torch.zeros(1, 1, 64), v + "head.attention.in_proj_weight": torch.zeros(192, 64),
             v + "head.layernorm.weight": torch.ones(64), v + "head.mlp.fc1.weight": torch.zeros(128, 64)}
    save_file({**sd, **extra}, str(ck / "model.safetensors"), metadata={"format": "pt"})
    ref = load_checkpoint(tiny_ckpt_base)[0]
    assert torch.equal(_logits(load_checkpoint(ck)[0], [3, 4]), _logits(ref, [3, 4]))

    old = {}
    for k, t in sd.items():
        k = k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
        old[k.replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.",
                      "multi_modal_projector.").replace("model.image_newline", "image_newline")] = t
    save_file(old, str(ck / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(_logits(load_checkpoint(ck)[0], [3, 4]), _logits(ref, [3, 4]))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_named(tiny_ckpt_base: Path, tmp_path: Path, name: str) -> None:
    ck = _copy(tiny_ckpt_base, tmp_path)
    (ck / name).unlink()
    with pytest.raises(ModelFormatError, match=name.replace(".", r"\.")):
        load_checkpoint(ck)


def test_missing_shard_and_index(tiny_ckpt: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_ckpt, tmp_path)
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelFormatError, match=shard.name):
        load_checkpoint(ck)
    ck2 = _copy(tiny_ckpt, tmp_path / "b")
    (ck2 / INDEX_NAME).unlink()
    with pytest.raises(ModelFormatError, match=INDEX_NAME.replace(".", r"\.")):
        load_checkpoint(ck2)


def test_corrupt_weights_named(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_ckpt_base, tmp_path)
    (ck / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        load_checkpoint(ck)


def test_missing_unexpected_and_shape_named(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_ckpt_base, tmp_path)
    sd = _single_state(ck)
    gone = "model.language_model.layers.1.mlp.up_proj.weight"
    bad = dict(sd)
    bad.pop(gone)
    bad["model.foo.bar"] = torch.zeros(2)
    bad["model.multi_modal_projector.linear_1.weight"] = torch.zeros(64, 32)
    save_file(bad, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as e:
        load_checkpoint(ck)
    msg = str(e.value)
    assert gone in msg and "model.foo.bar" in msg
    assert "model.multi_modal_projector.linear_1.weight [64, 32] (expected [64, 64]" in msg


def test_tokenizer_larger_than_vocab(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_ckpt_base, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = cfg["image_token_index"] + 1
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="vocab_size"):
        load_checkpoint(ck)


def test_tied_embeddings_round_trip(tiny_tokenizer, tmp_path: Path) -> None:
    from r4b_edge.testing import tiny_config

    cfg = RConfig.from_dict({**tiny_config(vocab_size=tiny_tokenizer.vocab_size,
                                           image_token_index=tiny_tokenizer.image).to_dict(),
                             "tie_word_embeddings": True})
    out = write_random_checkpoint(tmp_path / "tied", cfg, tiny_tokenizer)
    assert "lm_head.weight" not in _single_state(out)
    model = load_checkpoint(out)[0]
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


@pytest.mark.parametrize("stored", [
    "model.language_model.layers.0.mlp.up_proj.weight",          # R-4B / transformers >= 4.52
    "language_model.model.layers.0.mlp.up_proj.weight",          # < 4.52 and transformers 5 save_pretrained
])
def test_rename_table_language_model(stored: str) -> None:
    from r4b_edge.model.checkpoint import canonical_name

    assert canonical_name(stored) == "model.language_model.layers.0.mlp.up_proj.weight"


def test_rename_table_every_layout() -> None:
    from r4b_edge.model.checkpoint import canonical_name

    want = {
        "lm_head.weight": ["lm_head.weight", "language_model.lm_head.weight"],
        "model.image_newline": ["model.image_newline", "image_newline"],
        "model.multi_modal_projector.pre_norm.bias": ["model.multi_modal_projector.pre_norm.bias",
                                                      "multi_modal_projector.pre_norm.bias"],
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight": [
            "model.vision_tower.vision_model.embeddings.patch_embedding.weight",  # R-4B
            "vision_tower.vision_model.embeddings.patch_embedding.weight",        # < 4.52
            "vision_tower.embeddings.patch_embedding.weight",                     # transformers 5 save_pretrained
            "model.vision_tower.embeddings.patch_embedding.weight"],              # transformers 5 state_dict
    }
    for canonical, stored in want.items():
        assert [canonical_name(s) for s in stored] == [canonical] * len(stored)
    assert canonical_name("something.else") == "something.else"


def test_mixed_layouts_are_refused(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_ckpt_base, tmp_path)
    sd = _single_state(ck)
    sd["image_newline"] = sd["model.image_newline"].clone()
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="'image_newline' and 'model.image_newline' both map to 'model.image_newline'"):
        load_checkpoint(ck)


def test_transformers5_save_pretrained_layout_loads(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A LlavaOnevision built from a config (R-4B's projector swapped in), given this model's weights
    and saved by transformers 5's save_pretrained, loads with the same logits."""
    from safetensors import safe_open
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from r4b_edge.model.checkpoint import canonical_name
    from r4b_edge.model.hf_remote.modeling_r4b import RMultiModalProjector
    from r4b_edge.model.modeling import qwen3_config, siglip_config

    ref, cfg, tok = load_checkpoint(tiny_ckpt)
    hf_cfg = LlavaOnevisionConfig(text_config=qwen3_config(cfg).to_dict(), vision_config=siglip_config(cfg).to_dict(),
                                  image_token_index=cfg.image_token_index, image_grid_pinpoints=cfg.image_grid_pinpoints,
                                  vision_aspect_ratio="anyres_max_9")
    hf = LlavaOnevisionForConditionalGeneration(hf_cfg)
    hf.model.multi_modal_projector = RMultiModalProjector(hf_cfg)
    ours = ref.state_dict()
    state = {k: ours[canonical_name(k)] for k in hf.state_dict() if canonical_name(k) in ours}
    assert set(hf.state_dict()) - set(state) == {"model.vision_tower.post_layernorm.weight",
                                                 "model.vision_tower.post_layernorm.bias"}  # unused by R-4B
    hf.load_state_dict(state, strict=False)
    out = tmp_path / "saved"
    hf.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "vision_tower.embeddings.patch_embedding.weight" in names and "language_model.lm_head.weight" in names
    assert "model.language_model.norm.weight" not in names and "language_model.model.norm.weight" in names
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # R-4B config + tokenizer beside
        shutil.copyfile(tiny_ckpt / name, out / name)
    model = load_checkpoint(out)[0]
    ids = tok.encode("<|im_start|>user\nhi 12<|im_end|>\n")
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
