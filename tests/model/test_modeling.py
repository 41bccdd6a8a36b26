"""RForConditionalGeneration: tensor names, image feature packing, cache, splicing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from r4b_edge.errors import ImageError, ModelFormatError
from r4b_edge.model.config import RConfig
from r4b_edge.model.modeling import RForConditionalGeneration, truncate_cache
from r4b_edge.model.processing import anyres_layout, count_image_tokens, pack_anyres, prepare_image
from r4b_edge.testing import tiny_config

torch.set_num_threads(1)


def r4b_tensor_names(n_text: int, n_vision: int) -> set[str]:
    """R-4B's tensor names (transformers >= 4.52 layout) for the given layer counts."""
    names = {"model.image_newline", "lm_head.weight", "model.language_model.embed_tokens.weight",
             "model.language_model.norm.weight"}
    for p in ("pre_norm", "linear_1", "linear_2"):
        names |= {f"model.multi_modal_projector.{p}.weight", f"model.multi_modal_projector.{p}.bias"}
    for i in range(n_text):
        b = f"model.language_model.layers.{i}."
        names |= {b + s + ".weight" for s in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
            "input_layernorm", "post_attention_layernorm")}
    v = "model.vision_tower.vision_model."
    names |= {v + "embeddings.patch_embedding.weight", v + "embeddings.patch_embedding.bias",
              v + "embeddings.position_embedding.weight"}
    for i in range(n_vision):
        b = f"{v}encoder.layers.{i}."
        for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names |= {b + s + ".weight", b + s + ".bias"}
    return names


@pytest.fixture(scope="module")
def model() -> RForConditionalGeneration:
    torch.manual_seed(0)
    return RForConditionalGeneration(tiny_config(anyres=True, vocab_size=300, image_token_index=297)).eval()


def test_state_dict_names_exact(model) -> None:
    assert set(model.state_dict()) == r4b_tensor_names(2, 2)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_projector_is_layernorm_mlp_exact_gelu(model) -> None:
    pr = model.model.multi_modal_projector
    assert pr.pre_norm.eps == 1e-6 and isinstance(pr.act, torch.nn.GELU) and pr.act.approximate == "none"


def test_vision_layer_is_pre_post_layernorm(model) -> None:
    pv = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.model.vision_tower.vision_model(pixel_values=pv, output_hidden_states=True)
        hs = model.vision_hidden_states(pv)
    assert torch.equal(hs, out.hidden_states[-1]) and hs.shape == (1, 16, 64)


@pytest.mark.parametrize("hw", [(40, 120), (120, 40), (64, 64), (3, 4), (33, 47), (10, 100)])
def test_feature_count_matches_processing(model, hw) -> None:
    img = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    p = prepare_image(img, model.config)
    with torch.no_grad():
        f = model.image_features(p.pixel_values, p.grid, p.orig_size)
    assert f.shape == (p.n_tokens, 64) == (count_image_tokens(hw, model.config), 64)
    assert p.grid != (0, 0)


def test_packing_layout(model) -> None:
    """Base view first; tiles spatially arranged, unpadded, newline closing every row."""
    p = prepare_image(np.zeros((40, 120, 3), np.uint8), model.config)  # wide: 1x2 grid, rows unpadded
    assert p.grid == (1, 2)
    with torch.no_grad():
        f = model.image_features(p.pixel_values, p.grid, p.orig_size)
        proj = model.model.multi_modal_projector(model.vision_hidden_states(torch.from_numpy(p.pixel_values)))
    P, n = 4, model.config.tokens_per_view
    assert torch.allclose(f[:n], proj[0])
    rows = (f.shape[0] - n) // (2 * P + 1)
    body = f[n:].view(rows, 2 * P + 1, 64)
    assert torch.allclose(body[:, -1], model.model.image_newline.expand(rows, 64))
    fmap = torch.cat([proj[1].view(P, P, 64), proj[2].view(P, P, 64)], dim=1)  # [P, 2P, H]
    top = (P - rows) // 2
    assert torch.allclose(body[:, :-1], fmap[top:top + rows])


def test_base_only_has_no_newline() -> None:
    m = RForConditionalGeneration(tiny_config(anyres=False, vocab_size=300, image_token_index=297)).eval()
    p = prepare_image(np.zeros((20, 90, 3), np.uint8), m.config)
    assert p.grid == (0, 0) and p.pixel_values.shape == (1, 3, 32, 32) and p.n_tokens == 16
    with torch.no_grad():
        assert m.image_features(p.pixel_values, p.grid, p.orig_size).shape == (16, 64)


def test_bad_pixel_values(model) -> None:
    with pytest.raises(ImageError, match="views"):
        model.image_features(np.zeros((2, 3, 32, 32), np.float32), (1, 2), (40, 120))
    with pytest.raises(ImageError, match=r"\[views, 3, 32, 32\]"):
        model.image_features(np.zeros((1, 3, 16, 16), np.float32), (0, 0), (16, 16))


def test_cache_matches_full_forward(model) -> None:
    ids = torch.randint(0, 290, (1, 9))
    with torch.no_grad():
        full, _ = model(model.embed_tokens(ids), use_cache=False)
        a, cache = model(model.embed_tokens(ids[:, :5]))
        b, cache = model(model.embed_tokens(ids[:, 5:]), past_key_values=cache)
    assert cache.get_seq_length() == 9
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)
    for keep in (6, 0):
        truncate_cache(cache, keep)
        assert cache.get_seq_length() == keep
        with torch.no_grad():
            c, _ = model(model.embed_tokens(ids[:, keep:]), past_key_values=cache)
        assert torch.allclose(c, full[:, keep:], atol=1e-5)
    with pytest.raises(ValueError, match="9 positions to 10"):
        truncate_cache(cache, 10)


def test_forward_with_images(model) -> None:
    cfg = model.config
    p = prepare_image(np.full((50, 30, 3), 200, np.uint8), cfg)
    ids = torch.tensor([[1, 2] + [cfg.image_token_index] * p.n_tokens + [3, 4]])
    with torch.no_grad():
        logits = model.forward_with_images(ids, [p])
        emb = model.embed_tokens(ids)
        emb[0, 2:2 + p.n_tokens] = model.image_features(p.pixel_values, p.grid, p.orig_size)
        ref, _ = model(emb, use_cache=False)
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.allclose(logits, ref, atol=1e-5)
    with pytest.raises(ImageError, match=rf"{p.n_tokens - 1} image placeholder.*need {p.n_tokens}"):
        model.forward_with_images(torch.tensor([[1] + [cfg.image_token_index] * (p.n_tokens - 1)]), [p])


@pytest.mark.parametrize("hw", [(40, 120), (120, 40), (50, 50), (33, 47)])
def test_packing_matches_transformers(model, hw) -> None:
    """Same features as LlavaOnevisionModel.pack_image_features (anyres_max_N switched off)."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    cfg = model.config
    p = prepare_image(np.random.default_rng(1).integers(0, 255, (*hw, 3), dtype=np.uint8), cfg)
    fake = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=cfg.image_size, patch_size=cfg.patch_size),
        image_grid_pinpoints=cfg.image_grid_pinpoints))
    with torch.no_grad():
        proj = model.model.multi_modal_projector(model.vision_hidden_states(torch.from_numpy(p.pixel_values)))
        ref, _ = LlavaOnevisionModel.pack_image_features(
            fake, [proj], torch.tensor([p.orig_size]), image_newline=model.model.image_newline,
            vision_aspect_ratio="anyres_max_1000000")
        ours = model.image_features(p.pixel_values, p.grid, p.orig_size)
    assert torch.equal(ours, ref[0])


def test_anyres_max_downsampling_matches_transformers() -> None:
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from r4b_edge.model.config import RConfig

    cfg = RConfig.from_dict({**tiny_config(vocab_size=300, image_token_index=297).to_dict(),
                             "vision_aspect_ratio": "anyres_max_1"})
    torch.manual_seed(0)
    m = RForConditionalGeneration(cfg).eval()
    p = prepare_image(np.random.default_rng(2).integers(0, 255, (60, 64, 3), dtype=np.uint8), cfg)
    fake = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=32, patch_size=8), image_grid_pinpoints=cfg.image_grid_pinpoints))
    with torch.no_grad():
        proj = m.model.multi_modal_projector(m.vision_hidden_states(torch.from_numpy(p.pixel_values)))
        ref, _ = LlavaOnevisionModel.pack_image_features(
            fake, [proj], torch.tensor([p.orig_size]), image_newline=m.model.image_newline,
            vision_aspect_ratio="anyres_max_1")
        ours = m.image_features(p.pixel_values, p.grid, p.orig_size)
    assert p.grid == (2, 2) and ours.shape[0] == p.n_tokens < 16 + 8 * 9
    assert torch.allclose(ours, ref[0])


def test_an_older_transformers_cache_api_is_a_clear_error(monkeypatch) -> None:
    import pytest

    from r4b_edge.errors import BackendUnavailableError
    from r4b_edge.model import modeling

    def old_forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):  # transformers 5.17's names
        raise AssertionError("not reached")

    monkeypatch.setattr(modeling.Qwen3Model, "forward", old_forward)
    with pytest.raises(BackendUnavailableError, match=r"past_key_values.*transformers==5.24.0"):
        modeling.check_transformers()


@pytest.mark.parametrize("aspect,size", [("anyres", (50, 70)), ("anyres", (70, 20)), ("anyres_max_1", (64, 64)),
                                         ("anyres_max_1", (30, 70)), ("base", (50, 30))])
def test_numpy_pack_anyres_equals_torch_image_features(aspect: str, size: tuple[int, int]) -> None:
    """processing.pack_anyres (what the llama and onnx backends pack with) gives the torch model's
    image_features, incl. the anyres_max_N downsampling and base-only configs."""
    base = tiny_config(anyres=aspect != "base").to_dict()
    base["vision_aspect_ratio"] = aspect
    cfg = RConfig.from_dict(base)
    torch.manual_seed(0)
    m = RForConditionalGeneration(cfg).eval()
    rng = np.random.default_rng(2)
    img = prepare_image(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), cfg)
    lay = anyres_layout(img.orig_size, cfg)
    assert (lay.get("feature") != lay.get("unpadded")) == aspect.startswith("anyres_max")  # downsampling exercised
    newline = m.model.image_newline.detach().numpy()
    with torch.no_grad():
        ref = m.image_features(img.pixel_values, img.grid, img.orig_size).numpy()
        per_view = m.model.multi_modal_projector(m.vision_hidden_states(torch.from_numpy(img.pixel_values))).numpy()
    got = pack_anyres(per_view, img.grid, img.orig_size, cfg, newline)
    assert got.shape == ref.shape == (img.n_tokens, 64)
    assert np.abs(got - ref).max() < 1e-5
    with pytest.raises(ModelFormatError, match=f"returned {per_view.shape[0] - 1} views"):
        pack_anyres(per_view[:-1], img.grid, img.orig_size, cfg, newline)
    if img.grid != (0, 0):
        with pytest.raises(ModelFormatError, match="no image_newline"):
            pack_anyres(per_view, img.grid, img.orig_size, cfg, None)
