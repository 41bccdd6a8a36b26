"""RConfig: parsing, round-trip, derived properties, validation errors."""
from __future__ import annotations

import copy
import json
import sys

import pytest

from r4b_edge.errors import ModelFormatError
from r4b_edge.model.config import RConfig
from r4b_edge.testing import tiny_config


def r4b_like_dict() -> dict:
    """A config.json shaped like YannQi/R-4B's (sizes as published; rope_theta at top level)."""
    return {
        "architectures": ["RForConditionalGeneration"], "model_type": "R",
        "auto_map": {"AutoConfig": "configuration_r.RConfig"},
        "image_token_index": 151646, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
        },
    }


def test_real_layout_parses() -> None:
    c = RConfig.from_dict(r4b_like_dict())
    assert (c.vocab_size, c.hidden_size, c.max_position_embeddings) == (151936, 2560, 40960)
    assert (c.image_size, c.patch_size, c.tokens_per_view) == (384, 14, 729)
    assert c.anyres and c.anyres_max_patches is None
    assert c.rope_theta == 1e6
    assert c.image_mean == [0.5, 0.5, 0.5] and c.image_std == [0.5, 0.5, 0.5]


def test_rope_parameters_accepted() -> None:
    d = r4b_like_dict()
    del d["text_config"]["rope_theta"]
    d["text_config"]["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert RConfig.from_dict(d).rope_theta == 5e5


def test_round_trip_file(tmp_path) -> None:
    c = tiny_config(anyres=True, vocab_size=300, image_token_index=297)
    c.save(tmp_path / "config.json")
    c2 = RConfig.from_file(tmp_path)
    assert c2.to_dict() == c.to_dict()
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "R" and d["architectures"] == ["RForConditionalGeneration"]
    assert d["vision_config"]["model_type"] == "siglip_vision_model"
    # unknown fields survive
    raw = r4b_like_dict()
    assert RConfig.from_dict(raw).to_dict()["auto_map"] == raw["auto_map"]


def test_base_only_and_anyres_max() -> None:
    assert not tiny_config(anyres=False).anyres
    d = r4b_like_dict()
    d["vision_aspect_ratio"] = "anyres_max_9"
    c = RConfig.from_dict(d)
    assert c.anyres and c.anyres_max_patches == 9
    d["vision_aspect_ratio"] = "base"
    assert not RConfig.from_dict(d).anyres
    for bad in ("pad", "anyres_max_", "anyres_max_0", "anyres_9", 9):
        d["vision_aspect_ratio"] = bad
        with pytest.raises(ModelFormatError, match="vision_aspect_ratio"):
            RConfig.from_dict(d)


def test_preprocessor_mean_std(tmp_path) -> None:
    c = tiny_config()
    c.save(tmp_path / "config.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    c2 = RConfig.from_file(tmp_path)
    assert c2.image_mean == [0.1, 0.2, 0.3] and c2.image_std == [0.4, 0.5, 0.6]


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("text_config"), "text_config"),
    (lambda d: d.pop("vision_config"), "vision_config"),
    (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size"),
    (lambda d: d["vision_config"].update(patch_size=0), "vision_config.patch_size"),
    (lambda d: d["vision_config"].update(patch_size=400), "vision_config.patch_size"),
    (lambda d: d["text_config"].update(num_key_value_heads=5), "text_config.num_key_value_heads"),
    (lambda d: d.update(image_token_index=10**7), "image_token_index"),
    (lambda d: d.pop("image_token_index"), "image_token_index"),
    (lambda d: d.update(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
    (lambda d: d.update(vision_feature_layer=99), "vision_feature_layer"),
    (lambda d: d.update(image_grid_pinpoints=[[384, 500]]), "image_grid_pinpoints"),
    (lambda d: d.update(projector_hidden_act="relu"), "projector_hidden_act"),
    (lambda d: d["vision_config"].update(model_type="clip_vision_model"), "vision_config.model_type"),
])
def test_validation_names_field(mutate, field) -> None:
    d = copy.deepcopy(r4b_like_dict())
    mutate(d)
    with pytest.raises(ModelFormatError) as e:
        RConfig.from_dict(d)
    assert "config.json" in str(e.value) and field in str(e.value)


def test_file_errors(tmp_path) -> None:
    with pytest.raises(ModelFormatError, match="config.json"):
        RConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json"):
        RConfig.from_file(tmp_path)


def test_no_torch_import() -> None:
    import subprocess

    code = "import sys, r4b_edge.model; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _with_pre(tmp_path, pre: dict, **cfg_over) -> RConfig:
    c = tiny_config()
    d = {**c.to_dict(), **cfg_over}
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    return RConfig.from_file(tmp_path)


def test_preprocessor_read_like_the_hf_image_processor(tmp_path) -> None:
    """One number means all channels; do_normalize false is mean 0 / std 1; size may be either form."""
    c = _with_pre(tmp_path, {"image_mean": 0.25, "image_std": [0.5, 0.5, 1], "size": {"shortest_edge": 32}})
    assert c.image_mean == [0.25] * 3 and c.image_std == [0.5, 0.5, 1.0]
    c = _with_pre(tmp_path, {"do_normalize": False, "image_mean": [0.1] * 3, "size": {"height": 32, "width": 32},
                             "resample": 3, "rescale_factor": 1 / 255})
    assert c.image_mean == [0.0] * 3 and c.image_std == [1.0] * 3


def test_preprocessor_mean_std_wins_over_config(tmp_path) -> None:
    d = tiny_config().to_dict()
    d["vision_config"]["image_mean"] = [0.9] * 3
    c = _with_pre(tmp_path, {"image_mean": [0.1, 0.2, 0.3]}, vision_config=d["vision_config"])
    assert c.image_mean == [0.1, 0.2, 0.3] and c.image_std == [0.5] * 3  # std: neither file says -> SigLIP's


def test_preprocessor_pinpoints_precedence(tmp_path) -> None:
    pins = [[32, 64], [64, 32], [64, 64]]
    # config.json has none: the image processor's pinpoints (and anyres) are used
    c = _with_pre(tmp_path, {"image_grid_pinpoints": pins}, image_grid_pinpoints=None, vision_aspect_ratio="anyres")
    assert c.anyres and c.image_grid_pinpoints == pins
    assert _with_pre(tmp_path, {"image_grid_pinpoints": pins}).image_grid_pinpoints == pins  # equal: fine
    with pytest.raises(ModelFormatError, match=r"preprocessor_config\.json.*image_grid_pinpoints.*differ"):
        _with_pre(tmp_path, {"image_grid_pinpoints": [[32, 64]]})


@pytest.mark.parametrize("pre, field", [
    ({"size": {"height": 64, "width": 64}}, "size"),
    ({"size": {"height": 32, "width": 64}}, "size"),
    ({"size": 32}, "size"),
    ({"resample": 2}, "resample"),
    ({"rescale_factor": 1.0}, "rescale_factor"),
    ({"do_rescale": False}, "rescale_factor"),
    ({"do_center_crop": True}, "do_center_crop"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": "0.5"}, "image_std"),
])
def test_preprocessor_errors_name_file_and_field(tmp_path, pre, field) -> None:
    with pytest.raises(ModelFormatError) as e:
        _with_pre(tmp_path, pre)
    assert "preprocessor_config.json" in str(e.value) and f"`{field}`" in str(e.value)
