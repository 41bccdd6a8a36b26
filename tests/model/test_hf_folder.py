"""The model folder as a Hugging Face repo: transformers' Auto* classes with trust_remote_code load it
and match r4b-edge (prompt, image token counts, pixels, logits) on AnyRes and on the bundled model."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r4b_edge.api import BUNDLED_MODEL, EXAMPLE_IMAGE
from r4b_edge.backends.torch_backend import TorchBackend
from r4b_edge.model.checkpoint import canonical_name, load_checkpoint, save_checkpoint
from r4b_edge.model.config import PREPROCESSOR_CONFIG, RConfig
from r4b_edge.model.hf_folder import (
    CHAT_TEMPLATE_NAME, PROCESSOR_NAME, main, preprocessor_dict, processor_dict, write_hf_files,
)
from r4b_edge.model.hf_remote import AUTO_MAP, REMOTE_FILES, source_dir
from r4b_edge.model.processing import prepare_image
from r4b_edge.model.template import CHAT_TEMPLATE, MODE_ALIASES, Message, render_prompt
from r4b_edge.testing import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
)

torch.set_num_threads(1)
SIZES = [(40, 120), (120, 40), (50, 50), (33, 47), (200, 90), (7, 9)]


def _hf(folder: Path):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def _pixel_tol(processor, cfg: RConfig) -> float:
    """transformers' PIL path resizes exactly as r4b-edge (PIL bicubic); its torchvision path differs
    by up to 2 uint8 levels (STACK.md), i.e. 2/255/std after normalisation."""
    if type(processor.image_processor).__name__.endswith("Pil"):
        return 1e-6
    return 2 / 255 / min(cfg.image_std) + 1e-6


def _expected_ids(tok, cfg: RConfig, prompt: str, images) -> list[int]:
    parts = prompt.split("<image>")
    ids = tok.encode(parts[0])
    for im, text in zip(images, parts[1:]):
        ids += [cfg.image_token_index] * im.n_tokens + tok.encode(text)
    return ids


def _img(hw: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8))


# ---- files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bundled", "saved"])
def test_folder_files_are_the_one_source(which, tiny_ckpt: Path) -> None:
    """The shipped folder and save_checkpoint's output carry copies equal to the source files."""
    folder = BUNDLED_MODEL if which == "bundled" else tiny_ckpt
    cfg = RConfig.from_file(folder)
    # on a failure for the bundled folder: python -m r4b_edge.model.hf_folder r4b_edge/assets/model
    for name in REMOTE_FILES:
        assert (folder / name).read_bytes() == (source_dir() / name).read_bytes(), name
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert json.loads((folder / PREPROCESSOR_CONFIG).read_text()) == json.loads(json.dumps(preprocessor_dict(cfg)))
    assert json.loads((folder / PROCESSOR_NAME).read_text()) == processor_dict(cfg)
    assert (folder / CHAT_TEMPLATE_NAME).read_text() == CHAT_TEMPLATE
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_remote_code_is_self_contained() -> None:
    """transformers imports these from the folder: only stdlib, torch, transformers, each other."""
    allowed = {"__future__", "math", "re", "torch", "transformers"}
    for name in REMOTE_FILES:
        tree = ast.parse((source_dir() / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [] if node.level else [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(mods) <= allowed, (name, mods)


def test_write_hf_files_cli_and_errors(tiny_ckpt_base: Path, tmp_path: Path) -> None:
    import shutil

    from r4b_edge.errors import ModelFormatError

    folder = tmp_path / "old"
    shutil.copytree(tiny_ckpt_base, folder)
    for name in (*REMOTE_FILES, PREPROCESSOR_CONFIG, PROCESSOR_NAME):
        (folder / name).unlink()
    assert main([str(folder)]) == 0
    assert all((folder / n).is_file() for n in REMOTE_FILES) and (folder / PROCESSOR_NAME).is_file()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer_config.json missing"):
        write_hf_files(folder, RConfig.from_file(folder))


# ---- Auto classes --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bundled", "tiny-anyres"])
def test_auto_classes_load_every_tensor(which, tiny_ckpt: Path) -> None:
    folder = BUNDLED_MODEL if which == "bundled" else tiny_ckpt
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(cfg).__name__ == "RConfig" and cfg.model_type == "R"
    assert cfg.vision_aspect_ratio == ("base" if which == "bundled" else "anyres")
    for auto in (AutoModel, AutoModelForImageTextToText):
        model, info = auto.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                           output_loading_info=True)
        assert type(model).__name__ == "RForConditionalGeneration"
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, _, _ = load_checkpoint(folder)
    # in memory transformers 5 drops SigLIP's `vision_model.` level; the loader's table maps it back
    assert {canonical_name(k) for k in model.state_dict()} == set(ours.state_dict())
    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(proc).__name__ == "RProcessor" and proc.image_token_id == ours.config.image_token_index
    assert type(AutoTokenizer.from_pretrained(folder)).__name__ == "Qwen2Tokenizer"


# ---- chat template ---------------------------------------------------------------------------------
_CHATS = [
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the sum of all the digits?"}]}],
     [Message("user", "What is the sum of all the digits?", images=1)], None),
    ([{"role": "user", "content": "Which colour is the circle?"}], [Message("user", "Which colour is the circle?")], None),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many squares?"}]},
      {"role": "assistant", "content": "<think>\ncounting\n</think>\n\n3"},
      {"role": "user", "content": [{"type": "text", "text": "And circles?"}]}],
     [Message("user", "How many squares?", images=1), Message("assistant", "3"), Message("user", "And circles?")],
     "Be brief."),
]


@pytest.mark.parametrize("mode", sorted(MODE_ALIASES))
@pytest.mark.parametrize("chat", range(len(_CHATS)))
def test_processor_chat_template_is_r4b_edge_prompt(mode: str, chat: int) -> None:
    proc = AutoProcessor.from_pretrained(BUNDLED_MODEL, trust_remote_code=True)
    hf_messages, messages, system = _CHATS[chat]
    want = render_prompt(messages, mode, system=system)
    assert proc.apply_chat_template(hf_messages, add_generation_prompt=True, thinking_mode=mode) == want
    assert proc.tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False,
                                              thinking_mode=mode) == want


def test_chat_template_default_and_unknown_mode() -> None:
    proc = AutoProcessor.from_pretrained(BUNDLED_MODEL, trust_remote_code=True)
    msgs = _CHATS[1][0]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == render_prompt(_CHATS[1][1], "auto")
    with pytest.raises(Exception, match="thinking_mode"):
        proc.apply_chat_template(msgs, add_generation_prompt=True, thinking_mode="deep")


# ---- tokens, pixels, logits ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anyres_max_ckpt(tmp_path_factory, tiny_tokenizer_dir: Path, tiny_tokenizer) -> Path:
    """Tiny random AnyRes folder with `anyres_max_1` (downsampling on for 2x2 grids)."""
    d = tiny_config(anyres=True, vocab_size=tiny_tokenizer.vocab_size, image_token_index=tiny_tokenizer.image).to_dict()
    cfg = RConfig.from_dict({**d, "vision_aspect_ratio": "anyres_max_1"})
    from r4b_edge.model.modeling import RForConditionalGeneration

    torch.manual_seed(3)
    return save_checkpoint(RForConditionalGeneration(cfg).eval(), cfg, tiny_tokenizer_dir,
                           tmp_path_factory.mktemp("ckpt") / "tiny-max1")


def _compare(folder: Path, sizes, n_images: int = 1) -> list[tuple]:
    """For each size: r4b-edge vs transformers on one prompt with `n_images` images of that size."""
    ours, cfg, tok = load_checkpoint(folder)
    backend = TorchBackend(folder, device="cpu")
    hf, proc = _hf(folder)
    tol = _pixel_tol(proc, cfg)
    rows = []
    for k, hw in enumerate(sizes):
        pil = [_img(hw, seed=k + i) for i in range(n_images)]
        images = [prepare_image(im, cfg) for im in pil]
        msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "how many?"}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, thinking_mode="auto")
        assert prompt == render_prompt([Message("user", "how many?", images=n_images)], "auto")
        inputs = proc(images=pil, text=prompt, return_tensors="pt")
        ids = _expected_ids(tok, cfg, prompt, images)
        assert inputs["input_ids"][0].tolist() == ids, hw  # same prompt, same image token counts
        assert [list(s) for s in inputs["image_sizes"].tolist()] == [list(im.orig_size) for im in images]
        for i, im in enumerate(images):
            pv = inputs["pixel_values"][i].numpy()
            n = im.pixel_values.shape[0]
            assert pv.shape[1:] == im.pixel_values.shape[1:] and not pv[n:].any()  # views beyond n: padding
            assert float(np.abs(pv[:n] - im.pixel_values).max()) <= tol, (hw, i)
        views = inputs["pixel_values"].shape[1]  # r4b-edge's pixels, zero-padded to the batch's view count
        pv_ours = torch.from_numpy(np.stack([
            np.pad(im.pixel_values, [(0, views - im.pixel_values.shape[0])] + [(0, 0)] * 3) for im in images]))
        segs, parts = [], prompt.split("<image>")
        for i, text in enumerate(parts):
            segs.append(tok.encode(text))
            if i < len(images):
                segs.append(images[i])
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([ids]), pixel_values=pv_ours,
                        image_sizes=inputs["image_sizes"]).logits[0]
            full = ours.forward_with_images(torch.tensor([ids]), images)[0]
            own_pixels = hf(**inputs).logits[0]
        last = torch.from_numpy(backend.prefill(segs))
        rows.append((hw, images[0].grid, images[0].n_tokens, float((theirs - full).abs().max()),
                     float((theirs[-1] - last).abs().max()), float((own_pixels - full).abs().max()), tol))
    return rows


@pytest.mark.parametrize("which", ["tiny-anyres", "tiny-anyres_max_1", "bundled"])
def test_image_tokens_and_logits_match_torch_backend(which, tiny_ckpt: Path, anyres_max_ckpt: Path) -> None:
    folder = {"tiny-anyres": tiny_ckpt, "tiny-anyres_max_1": anyres_max_ckpt, "bundled": BUNDLED_MODEL}[which]
    rows = _compare(folder, SIZES)
    grids = {r[1] for r in rows}
    assert (grids == {(0, 0)}) == (which == "bundled") and (which == "bundled" or len(grids) >= 3)
    for hw, grid, n, d_full, d_last, d_own, tol in rows:
        assert d_full <= 1e-4 and d_last <= 1e-4, (hw, grid, n, d_full, d_last)
        if tol <= 1e-6:  # transformers' PIL path: same pixels, so the processor's own inputs match too
            assert d_own <= 1e-4, (hw, d_own)


def test_several_images_in_one_prompt_are_each_tiled(tiny_ckpt: Path) -> None:
    """LLaVA-OneVision tiles single images only; R-4B's folder (like r4b-edge) tiles every image."""
    for hw, grid, n, d_full, d_last, d_own, tol in _compare(tiny_ckpt, [(40, 120), (50, 50)], n_images=2):
        assert grid != (0, 0) and d_full <= 1e-4 and d_last <= 1e-4


def test_remote_model_save_pretrained_writes_r4b_layout(tiny_ckpt: Path, tmp_path: Path) -> None:
    """transformers' own save of the remote model is again an R-4B folder r4b-edge loads."""
    import shutil

    from safetensors import safe_open

    hf, proc = _hf(tiny_ckpt)
    out = tmp_path / "resaved"
    hf.save_pretrained(out)
    proc.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    ours, _, tok = load_checkpoint(tiny_ckpt)
    assert names == set(ours.state_dict())
    shutil.copyfile(tiny_ckpt / "tokenizer.json", out / "tokenizer.json")
    again, _, _ = load_checkpoint(out)
    ids = torch.tensor([tok.encode("<|im_start|>user\nhi<|im_end|>\n")])
    with torch.no_grad():
        assert torch.equal(again(again.embed_tokens(ids), use_cache=False)[0],
                           ours(ours.embed_tokens(ids), use_cache=False)[0])


# ---- the README snippet ------------------------------------------------------------------------------
def test_readme_transformers_snippet_runs(capsys) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    m = re.search(r"<!-- transformers-snippet -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README has no transformers snippet"
    exec(compile(m.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    import r4b_edge

    ref = r4b_edge.load(backend="torch").chat(EXAMPLE_IMAGE, "What is the sum of all the digits?", mode="auto")
    assert out.strip().endswith(ref.answer.strip()) and ref.answer.strip() == "18"


@pytest.mark.parametrize("ratio", ["anyres", "anyres_max_9", "anyres_max_2"])
def test_processor_token_count_at_r4b_geometry(ratio: str) -> None:
    """RProcessor's count = r4b-edge's at R-4B's 384 px / patch 14 (27 x 27 per view), OneVision pinpoints."""
    from types import SimpleNamespace

    from r4b_edge.model.hf_remote.processing_r4b import RProcessor
    from r4b_edge.model.processing import count_image_tokens

    pins = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
    cfg = RConfig.from_dict({**tiny_config().to_dict(), "image_grid_pinpoints": pins, "vision_aspect_ratio": ratio,
                             "vision_config": {**tiny_config().vision_config, "image_size": 384, "patch_size": 14}})
    proc = RProcessor.__new__(RProcessor)
    proc.num_image_tokens, proc.vision_aspect_ratio = cfg.tokens_per_view, ratio
    proc.image_processor = SimpleNamespace(size={"height": 384, "width": 384}, image_grid_pinpoints=pins)
    rng = np.random.default_rng(0)
    sizes = [(100, 1000), (1000, 100), (500, 500), (300, 770), (1500, 1100), (7, 9), (2304, 2304), (4000, 300)]
    sizes += [tuple(int(x) for x in rng.integers(5, 3000, 2)) for _ in range(200)]
    assert cfg.tokens_per_view == 729
    assert [proc.num_tokens(*hw) for hw in sizes] == [count_image_tokens(hw, cfg) for hw in sizes]


def test_tied_embeddings_folder(tiny_tokenizer, tmp_path: Path) -> None:
    from r4b_edge.testing import write_random_checkpoint

    cfg = RConfig.from_dict({**tiny_config(vocab_size=tiny_tokenizer.vocab_size,
                                           image_token_index=tiny_tokenizer.image).to_dict(), "tie_word_embeddings": True})
    out = write_random_checkpoint(tmp_path / "tied", cfg, tiny_tokenizer)
    hf, info = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    ours = load_checkpoint(out)[0]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(ours.embed_tokens(ids), use_cache=False)[0], atol=1e-5)


def test_tokenized_chat_template_and_pipeline() -> None:
    """Images inside the messages (apply_chat_template(tokenize=True)) and the image-text-to-text
    pipeline give the same inputs / answer as r4b-edge."""
    proc = AutoProcessor.from_pretrained(BUNDLED_MODEL, trust_remote_code=True)
    img = Image.open(EXAMPLE_IMAGE)
    q = "What is the sum of all the digits?"
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
    inp = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", thinking_mode="long")
    ours, cfg, tok = load_checkpoint(BUNDLED_MODEL)
    prompt = render_prompt([Message("user", q, images=1)], "long")
    assert inp["input_ids"][0].tolist() == _expected_ids(tok, cfg, prompt, [prepare_image(img, cfg)])
    pipe = transformers.pipeline("image-text-to-text", model=str(BUNDLED_MODEL), trust_remote_code=True,
                                 dtype=torch.float32)
    out = pipe(text=msgs, max_new_tokens=120, return_full_text=False)[0]["generated_text"]
    import r4b_edge

    ref = r4b_edge.load(backend="torch").chat(img, q, mode="auto")
    assert out.strip().endswith(ref.answer.strip()) and ref.answer.strip() == "18"
