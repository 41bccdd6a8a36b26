"""GGUF export: mapping, metadata, manifest / no-op re-run, atomicity, bad inputs, quant types."""
from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from r4b_edge.errors import ExportError  # noqa: E402
from r4b_edge.export import gguf as gg  # noqa: E402
from r4b_edge.export.gguf import export_gguf, gguf_name  # noqa: E402
from r4b_edge.export.manifest import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def f16(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    return export_gguf(tiny_ckpt, tmp_path_factory.mktemp("gguf") / "f16", quant="F16")


def _fields(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return kv, {t.name: t for t in r.tensors}


def test_name_mapping() -> None:
    assert gguf_name("model.language_model.layers.3.self_attn.q_norm.weight") == "blk.3.attn_q_norm.weight"
    assert gguf_name("model.language_model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"
    assert gguf_name("model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias") == "v.blk.1.ffn_up.bias"
    assert gguf_name("model.multi_modal_projector.pre_norm.weight") == "v.post_ln.weight"
    assert gguf_name("model.multi_modal_projector.linear_2.bias") == "mm.2.bias"
    assert gguf_name("model.image_newline") == "v.image_newline"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.vision_tower.vision_model.post_layernorm.weight") is None
    with pytest.raises(ExportError, match="no GGUF mapping"):
        gguf_name("model.language_model.layers.0.mystery.weight")


def test_text_metadata_and_tensors(f16, tiny_ckpt: Path) -> None:
    from r4b_edge.model.config import RConfig
    from r4b_edge.model.tokenizer import Tokenizer

    cfg, tok = RConfig.from_file(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt)
    kv, ts = _fields(f16.text)
    tc = cfg.text_config
    assert kv["general.architecture"] == "qwen3"
    assert kv["qwen3.block_count"] == tc["num_hidden_layers"]
    assert kv["qwen3.attention.key_length"] == tc["head_dim"]
    assert kv["qwen3.attention.head_count_kv"] == tc["num_key_value_heads"]
    assert kv["qwen3.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert kv["tokenizer.ggml.eos_token_id"] == tok.im_end
    assert "thinking_mode" in kv["tokenizer.chat_template"]
    assert json.loads(kv["r4b.config"])["image_token_index"] == cfg.image_token_index
    n = tc["num_hidden_layers"]
    for i in range(n):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                     "attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{i}.{part}.weight" in ts
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= set(ts)
    assert not any(k.startswith(("v.", "mm.")) for k in ts)
    # the values are the checkpoint's (F16-rounded), and the Q/K rows are NOT permuted
    from safetensors.numpy import load_file

    sd = {}
    for f in tiny_ckpt.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    q = sd["model.language_model.layers.0.self_attn.q_proj.weight"]
    got = np.asarray(ts["blk.0.attn_q.weight"].data).reshape(q.shape)
    np.testing.assert_allclose(got, q, atol=1e-3)


def test_mmproj_metadata(f16, tiny_ckpt: Path) -> None:
    from r4b_edge.model.config import RConfig

    cfg = RConfig.from_file(tiny_ckpt)
    kv, ts = _fields(f16.mmproj)
    vc = cfg.vision_config
    assert kv["general.architecture"] == "clip"
    assert kv["clip.projector_type"] == "mlp" and kv["clip.use_gelu"] is True
    assert kv["clip.vision.feature_layer"] == [vc["num_hidden_layers"]]  # all blocks run
    assert kv["clip.vision.projection_dim"] == cfg.hidden_size
    assert kv["clip.vision.image_size"] == cfg.image_size
    assert kv["clip.vision.image_mean"] == pytest.approx(cfg.image_mean)
    assert "clip.vision.image_grid_pinpoints" not in kv  # only with stock_pinpoints=True
    assert {"v.post_ln.weight", "v.post_ln.bias", "mm.0.weight", "mm.2.weight", "v.image_newline",
            "v.patch_embd.weight", "v.position_embd.weight"} <= set(ts)
    assert "v.class_embd" not in ts and "v.pre_ln.weight" not in ts


def test_manifest_and_noop_rerun(f16, tiny_ckpt: Path) -> None:
    man = read_manifest(f16.out_dir)
    assert man["format"] == "gguf" and man["quant"] == "F16"
    names = {e["name"] for e in man["files"]}
    assert names == {f16.text.name, f16.mmproj.name}
    assert "gguf" in man["tools"] and "llama-cpp-python" in man["tools"]
    before = {p: p.stat().st_mtime_ns for p in (f16.text, f16.mmproj, f16.manifest)}
    again = export_gguf(tiny_ckpt, f16.out_dir, quant="F16")
    assert again.skipped
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not [p for p in f16.out_dir.iterdir() if p.name.startswith(".")]


def test_bad_inputs_fail_before_writing(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="unknown quant type 'Q3_XYZ'"):
        export_gguf(tiny_ckpt, out, quant="Q3_XYZ")
    with pytest.raises(ExportError, match="unknown mmproj quant"):
        export_gguf(tiny_ckpt, out, quant="F16", mmproj_quant="Q4_K_M")
    with pytest.raises(ExportError, match="not an R-4B checkpoint folder"):
        export_gguf(tmp_path, out, quant="F16")
    with pytest.raises(ExportError, match="inside the checkpoint folder"):
        export_gguf(tiny_ckpt, tiny_ckpt / "gguf", quant="F16")
    assert not (tiny_ckpt / "gguf").exists()
    # a checkpoint missing a tensor (config says 3 layers, weights have 2)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="missing tensor"):
        export_gguf(bad, out, quant="F16")
    assert not out.exists()


def test_failed_write_leaves_nothing(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = gg.convert_chunk

    def flaky(chunk, t):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError("disk full (simulated)")
        return real(chunk, t)

    monkeypatch.setattr(gg, "convert_chunk", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        export_gguf(tiny_ckpt, out, quant="F16")
    assert list(out.iterdir()) == []  # no final file, no temp file, no manifest


@pytest.mark.parametrize("quant,mm", [("Q8_0", "Q8_0"), ("Q4_K_M", "F16")])
def test_quantized_exports_load(quant: str, mm: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    r = export_gguf(tiny_ckpt, tmp_path / quant, quant=quant)  # verify=True: read-back + llama.cpp load
    assert r.text.name == f"model-{quant}.gguf" and r.mmproj.name == f"mmproj-model-{mm}.gguf"
    kv, ts = _fields(r.text)
    assert kv["general.file_type"] == {"Q8_0": 7, "Q4_K_M": 15}[quant]
    assert "r4b.config" in kv and "tokenizer.huggingface.json" in kv  # kept by llama_model_quantize
    if quant == "Q8_0":
        assert ts["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
        _, mts = _fields(r.mmproj)
        assert mts["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert ts["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert read_manifest(r.out_dir)["quant"] == quant


def test_stock_pinpoints_option(tiny_ckpt: Path, tmp_path: Path) -> None:
    from r4b_edge.model.config import RConfig

    r = export_gguf(tiny_ckpt, tmp_path / "p", quant="F16", stock_pinpoints=True, verify=False)
    kv, _ = _fields(r.mmproj)
    pins = RConfig.from_file(tiny_ckpt).image_grid_pinpoints
    assert kv["clip.vision.image_grid_pinpoints"] == [v for h, w in pins for v in (w, h)]


def test_llama_cpp_tokenizes_like_hf(f16, tiny_ckpt: Path) -> None:
    """The vocab/merges/pre-tokenizer written for stock llama.cpp give the HF ids."""
    import llama_cpp

    from r4b_edge.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_ckpt)
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(f16.text).encode(), mp)
    assert model
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        for text in ["<|im_start|>user\nWhat colour is the square? 42 + 7 = ?<|im_end|>\n",
                     "think step by step, café naïve 東京 ñ €  spaces\n\n</think>\n\n"]:
            data = text.encode()
            buf = (llama_cpp.llama_token * 512)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, 512, False, True)
            assert list(buf[:n]) == tok.encode(text)
    finally:
        llama_cpp.llama_model_free(model)


def _vocab_facts(text: Path, ids: list[int]) -> dict[int, tuple[bool, str, str]]:
    """id -> (end of generation?, its text as llama.cpp renders a reply (special=False), its text
    with special=True), read by llama.cpp from the GGUF."""
    import llama_cpp

    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(text).encode(), mp)
    assert model
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        out = {}
        for i in ids:
            pieces = []
            for special in (False, True):
                buf = ctypes.create_string_buffer(64)
                n = llama_cpp.llama_token_to_piece(vocab, i, buf, 64, 0, special)
                pieces.append(buf.raw[:n].decode())
            out[i] = (bool(llama_cpp.llama_vocab_is_eog(vocab, i)), *pieces)
        return out
    finally:
        llama_cpp.llama_model_free(model)


def _assert_qwen3_token_types(text: Path, tok) -> None:
    kv, _ = _fields(text)
    types = kv["tokenizer.ggml.token_type"]
    eot = tok.token_to_id("<|endoftext|>")
    assert types[tok.think] == types[tok.end_think] == gguf.TokenType.USER_DEFINED
    assert all(types[i] == gguf.TokenType.CONTROL for i in (tok.im_start, tok.im_end, tok.image, eot))
    added = {a["content"]: a["special"] for a in json.loads(kv["tokenizer.huggingface.json"])["added_tokens"]}
    assert added == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True, "<image>": True,
                     "<think>": False, "</think>": False}
    facts = _vocab_facts(text, [tok.think, tok.end_think, tok.im_end, eot])
    assert facts[tok.think] == (False, "<think>", "<think>")  # in a reply's text, and generation goes on
    assert facts[tok.end_think] == (False, "</think>", "</think>")
    assert facts[tok.im_end] == (True, "", "<|im_end|>")  # still ends generation, still not text
    assert facts[eot][0] is True


def test_think_tags_are_text_tokens_for_llama_cpp(f16, tiny_ckpt: Path) -> None:
    """As llama.cpp's convert_hf_to_gguf types Qwen3's added tokens: the think tags USER_DEFINED
    (llama.cpp renders them in a reply), the other added tokens CONTROL; `<|im_end|>` ends
    generation and the think tags do not."""
    from r4b_edge.model.tokenizer import Tokenizer

    _assert_qwen3_token_types(f16.text, Tokenizer.from_dir(tiny_ckpt))


def test_old_tokenizer_files_export_qwen3_token_types(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint whose tokenizer files mark the think tags special (written before r4b-edge
    marked them as Qwen3 does) still exports them as text tokens, with the same ids."""
    from r4b_edge.model.tokenizer import Tokenizer

    old = tmp_path / "old"
    shutil.copytree(tiny_ckpt, old)
    tj = json.loads((old / "tokenizer.json").read_text())
    for a in tj["added_tokens"]:
        a["special"] = True
    (old / "tokenizer.json").write_text(json.dumps(tj))
    tok = Tokenizer.from_dir(old)
    assert tok.backend.get_added_tokens_decoder()[tok.end_think].special
    r = export_gguf(old, tmp_path / "out", quant="F16", verify=False)
    _assert_qwen3_token_types(r.text, tok)


def test_cli_export_verb(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from r4b_edge.apps.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(tiny_ckpt), "--format", "gguf", "--quant", "F16", "--out", str(out)]) == 0
    assert "written" in capsys.readouterr().out
    assert main(["export", str(tiny_ckpt), "--format", "gguf", "--quant", "F16", "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["export", str(tiny_ckpt), "--format", "gguf", "--quant", "Q9_Z", "--out", str(bad)]) == 1
    assert "unknown quant type" in capsys.readouterr().err and not bad.exists()
    assert main(["export", str(tiny_ckpt), "--format", "onnx", "--quant", "int3", "--out", str(bad)]) == 1
    assert "unknown ONNX precision" in capsys.readouterr().err and not bad.exists()


def test_old_transformers_layout_exports_the_same(f16, tiny_ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint saved with pre-4.52 names (language_model.model.*, vision_tower.*, ...)
    plus the unused SigLIP post_layernorm gives the same GGUF tensors."""
    from safetensors.numpy import load_file, save_file

    old = tmp_path / "old"
    old.mkdir()
    for f in tiny_ckpt.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, old / f.name)
    sd = {}
    for f in tiny_ckpt.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    ren = {}
    for k, v in sd.items():
        k2 = (k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
              .replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.", "multi_modal_projector.")
              .replace("model.image_newline", "image_newline"))
        ren[k2] = v
    hidden = sd["model.multi_modal_projector.pre_norm.weight"].shape[0]
    ren["vision_tower.vision_model.post_layernorm.weight"] = np.ones(hidden, np.float32)
    save_file(ren, str(old / "model.safetensors"))
    r = export_gguf(old, tmp_path / "out", quant="F16", verify=False)
    _, a = _fields(f16.text)
    _, b = _fields(r.text)
    assert set(a) == set(b)
    for name in ("blk.1.attn_k.weight", "output.weight", "token_embd.weight"):
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
    _, ma = _fields(f16.mmproj)
    _, mb = _fields(r.mmproj)
    assert set(ma) == set(mb)
    np.testing.assert_array_equal(np.asarray(ma["v.post_ln.weight"].data), np.asarray(mb["v.post_ln.weight"].data))


def test_stock_llama_cpp_python_runs_the_pair(f16, tmp_path: Path) -> None:
    """Stock tooling (llama-cpp-python's MTMDChatHandler, no r4b-edge code) runs the files."""
    import base64

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    img = tmp_path / "i.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    uri = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
    llm = Llama(model_path=str(f16.text), chat_handler=MTMDChatHandler(clip_model_path=str(f16.mmproj), verbose=False),
                n_ctx=512, n_threads=1, verbose=False)
    try:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "what colour?"}]}],
            max_tokens=4, temperature=0)
        assert r["usage"]["completion_tokens"] >= 1 and r["usage"]["prompt_tokens"] > 16
    finally:
        llm.close()
