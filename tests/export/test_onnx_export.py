"""ONNX export: folder layout, genai_config, manifest, dynamic shapes, parity of each graph with
torch, precisions, external data, and bad inputs failing before anything is written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from r4b_edge import formats
from r4b_edge.errors import ExportError
from r4b_edge.export import onnx as onnx_export
from r4b_edge.export.manifest import read_manifest, sha256_file
from r4b_edge.export.onnx import export_onnx
from r4b_edge.model.checkpoint import load_checkpoint


def exported(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, precision: str = "fp32") -> Path:
    """One export per (checkpoint, precision) per test session (a re-export is a no-op)."""
    return export_onnx(ckpt, tmp_path_factory.getbasetemp() / f"onnx-{ckpt.name}-{precision}", precision)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, tiny_ckpt) -> Path:
    return exported(tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="module")
def torch_model(tiny_ckpt):
    model, config, tok = load_checkpoint(tiny_ckpt)
    return model, config


@pytest.mark.slow  # pays for the module's fp32 export (~10 s)
def test_layout_config_and_manifest(fp32, tiny_ckpt, tiny_tokenizer):
    names = {p.name for p in fp32.iterdir()}
    assert {"vision.onnx", "embed.onnx", "decoder.onnx", "image_newline.npy", "genai_config.json",
            "manifest.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    doc = json.loads((fp32 / "genai_config.json").read_text())
    m = doc["model"]
    assert doc["format"] == "r4b-edge-onnx" and doc["precision"] == "fp32"
    assert m["image_token_id"] == tiny_tokenizer.image
    assert m["special_tokens"]["think"] == tiny_tokenizer.think
    assert set(m["eos_token_id"]) == tiny_tokenizer.eos_ids
    assert m["chat_template"] == tiny_tokenizer.chat_template
    assert m["vision"]["tokens_per_view"] == (32 // 8) ** 2
    assert m["decoder"]["num_hidden_layers"] == 2 and m["decoder"]["head_size"] == 16
    assert doc["r4b_config"]["text_config"]["hidden_size"] == 64
    man = read_manifest(fp32)
    assert man["format"] == "onnx" and man["quant"] == "fp32"
    listed = {e["name"]: e for e in man["files"]}
    assert {"decoder.onnx", "vision.onnx", "embed.onnx", "genai_config.json"} <= set(listed)
    for name, e in listed.items():
        assert sha256_file(fp32 / name) == e["sha256"]
    assert os.stat(fp32).st_mode & 0o055, "export folder must be readable by others (not 0700)"


def test_graph_io_is_dynamic(fp32):
    dec = onnx.load(str(fp32 / "decoder.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    assert dims["inputs_embeds"][:2] == ["batch", "seq"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past", 16]
    assert dims["logits_index"] == ["k"]
    outs = [o.name for o in dec.graph.output]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    vis = onnx.load(str(fp32 / "vision.onnx"))
    assert isinstance(vis.graph.input[0].type.tensor_type.shape.dim[0].dim_param, str)
    assert vis.graph.input[0].type.tensor_type.shape.dim[0].dim_param


@pytest.mark.parametrize("batch,seq,past", [(1, 5, 0), (2, 3, 0), (2, 1, 9), (1, 1, 3), (3, 4, 7)])
def test_decoder_matches_torch(fp32, torch_model, batch, seq, past):
    """Decoder with past in / present out vs the torch model, left padding in row 0."""
    model, config = torch_model
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(batch * 100 + seq * 10 + past)
    L, kvh, hd = 2, 2, 16
    emb = torch.randn(batch, seq, 64, generator=g)
    kv = [torch.randn(batch, kvh, past, hd, generator=g) for _ in range(2 * L)]
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pad = 2 if batch > 1 else 0
    mask[0, :pad] = 0
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    with torch.no_grad():
        cache = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(L)], config=model.text_hf_config)
        ref, cache = model(emb, past_key_values=cache, attention_mask=mask, position_ids=pos)
    feed = {"inputs_embeds": emb.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
            "logits_index": np.arange(seq, dtype=np.int64)}
    for i in range(L):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = kv[2 * i].numpy(), kv[2 * i + 1].numpy()
    out = _session(fp32 / "decoder.onnx").run(None, feed)
    valid = slice(max(0, pad - past), None)  # padded query rows see no key: their output is undefined
    assert np.abs(out[0][0, valid] - ref[0, valid].numpy()).max() < 1e-4
    assert np.abs(out[0][1:] - ref[1:].numpy()).max() < 1e-4 if batch > 1 else True
    assert out[1].shape == (batch, kvh, past + seq, hd)
    assert np.abs(out[1][1:] - cache.layers[0].keys[1:].numpy()).max() < 1e-4 if batch > 1 else True


def test_logits_index_selects_positions(fp32):
    s = _session(fp32 / "decoder.onnx")
    emb = np.random.default_rng(0).standard_normal((1, 6, 64)).astype(np.float32)
    feed = {"inputs_embeds": emb, "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.arange(6)[None].astype(np.int64)}
    feed.update({f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")})
    full = s.run(["logits"], {**feed, "logits_index": np.arange(6, dtype=np.int64)})[0]
    last = s.run(["logits"], {**feed, "logits_index": np.array([5], np.int64)})[0]
    assert last.shape == (1, 1, full.shape[-1])
    assert np.abs(last[0, 0] - full[0, 5]).max() < 1e-5


@pytest.mark.parametrize("views", [1, 5])
def test_vision_and_embed_match_torch(fp32, torch_model, views):
    model, config = torch_model
    pv = torch.randn(views, 3, 32, 32, generator=torch.Generator().manual_seed(views))
    with torch.no_grad():
        ref = model.model.multi_modal_projector(model.vision_hidden_states(pv)).numpy()
        ids = torch.tensor([[1, 5, 9, 100]])
        ref_emb = model.embed_tokens(ids).numpy()
    got = _session(fp32 / "vision.onnx").run(None, {"pixel_values": pv.numpy()})[0]
    assert got.shape == (views, 16, 64)
    assert np.abs(got - ref).max() < 1e-4
    emb = _session(fp32 / "embed.onnx").run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(emb - ref_emb).max() == 0
    assert np.allclose(np.load(fp32 / "image_newline.npy"), model.model.image_newline.detach().numpy())


def test_reexport_is_a_noop(fp32, tiny_ckpt):
    before = {p.name: p.stat().st_mtime_ns for p in fp32.iterdir()}
    assert export_onnx(tiny_ckpt, fp32, "fp32") == fp32
    assert {p.name: p.stat().st_mtime_ns for p in fp32.iterdir()} == before


@pytest.mark.slow
def test_force_reexports(tmp_path, tiny_ckpt):
    out = export_onnx(tiny_ckpt, tmp_path / "o", "int8")
    first = (out / "manifest.json").stat().st_mtime_ns
    assert export_onnx(tiny_ckpt, out, "int8", force=True) == out
    assert (out / "manifest.json").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_bad_inputs_fail_before_writing(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="fp32, fp16, int8, int8-dynamic, int4"):
        export_onnx(tiny_ckpt, out, "q4_k_m")
    with pytest.raises(ExportError, match="config.json missing"):
        export_onnx(tmp_path / "nope", out)
    with pytest.raises(ExportError, match="inside the checkpoint"):
        export_onnx(tiny_ckpt, tiny_ckpt / "onnx")
    assert not out.exists() and not (tiny_ckpt / "onnx").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(tiny_ckpt, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="text_config"):
        export_onnx(broken, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_export_leaves_nothing(tmp_path, tiny_ckpt, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_export, "_export_decoder", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(tiny_ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _onnx_last_logits(folder: Path, emb: np.ndarray) -> np.ndarray:
    feed = {"inputs_embeds": emb, "attention_mask": np.ones((1, emb.shape[1]), np.int64),
            "position_ids": np.arange(emb.shape[1])[None].astype(np.int64),
            "logits_index": np.array([emb.shape[1] - 1], np.int64)}
    s = _session(folder / "decoder.onnx")
    for i in s.get_inputs():
        if i.name.startswith("past_"):
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float16 if "16" in i.type else np.float32)
    return s.run(["logits"], feed)[0][0, -1]


@pytest.mark.slow
@pytest.mark.parametrize("precision,ops,bound", [
    ("int8", {"MatMulNBits"}, 0.15),
    ("int4", {"MatMulNBits"}, 1.0),
    ("fp16", {"Cast"}, 0.01),
    ("int8-dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}, 1.0),
])
def test_precisions(tmp_path_factory, tiny_ckpt, fp32, precision, ops, bound):
    out = exported(tmp_path_factory, tiny_ckpt, precision)
    doc = json.loads((out / "genai_config.json").read_text())
    assert doc["precision"] == precision
    dec_ops = _ops(out / "decoder.onnx")
    assert ops <= dec_ops or (precision == "int8-dynamic" and "DynamicQuantizeMatMul" in dec_ops), dec_ops
    if precision in ("int8", "int4"):
        from r4b_edge.export.onnx_quant import lm_head_node

        dec = onnx.load(str(out / "decoder.onnx"))
        bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in dec.graph.node
                if n.op_type == "MatMulNBits"}
        head = lm_head_node(dec)
        assert bits[head] == 8  # the LM head is int8 in both
        assert {b for n, b in bits.items() if n != head} == {8 if precision == "int8" else 4}
        vis_ops = _ops(out / "vision.onnx")
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= vis_ops or "DynamicQuantizeMatMul" in vis_ops
    if precision == "fp16":
        inits = onnx.load(str(out / "decoder.onnx")).graph.initializer
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)
    else:
        assert (out / "decoder.onnx").stat().st_size < (fp32 / "decoder.onnx").stat().st_size
    assert doc["graph_precision"]["vision"] == ("int8" if precision == "int4" else precision)
    emb = np.random.default_rng(1).standard_normal((1, 7, 64)).astype(np.float32)
    ref = _onnx_last_logits(fp32, emb)
    diff = np.abs(_onnx_last_logits(out, emb) - ref).max()
    assert 0 < diff < bound, diff
    from r4b_edge.backends.onnx_backend import OnnxBackend

    be = OnnxBackend(out, device="cpu")
    assert be.info().precision == precision
    rows = [be.prefill([[1, 2, 3]])] + list(be.forward([4, 5]))
    assert all(np.isfinite(r).all() for r in rows) and be.n_past == 5


@pytest.mark.slow
def test_external_data_for_big_graphs(tmp_path, tiny_ckpt, monkeypatch):
    """Graphs over the limit (here: 0 bytes) are saved as <graph>.onnx + <graph>.onnx.data."""
    monkeypatch.setattr(formats, "ONNX_EXTERNAL_DATA_BYTES", 0)
    out = export_onnx(tiny_ckpt, tmp_path / "ext", "fp32")
    for g in ("decoder.onnx", "vision.onnx", "embed.onnx"):
        assert (out / (g + ".data")).is_file(), sorted(p.name for p in out.iterdir())
        assert (out / g).stat().st_size < (out / (g + ".data")).stat().st_size
        _session(out / g)
    listed = {e["name"] for e in read_manifest(out)["files"]}
    assert "decoder.onnx.data" in listed


@pytest.mark.slow
def test_tokenizer_files_mark_think_tags_as_qwen3(tmp_path, tiny_ckpt):
    """The export's tokenizer files mark `<think>` / `</think>` non-special (as Qwen3's), also from a
    checkpoint written before r4b-edge did (both tags special there); nothing else changes."""
    import shutil

    src = tmp_path / "old"
    shutil.copytree(tiny_ckpt, src)
    docs = {}
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        doc = json.loads((src / name).read_text())
        for a in (doc[key] if isinstance(doc[key], list) else doc[key].values()):
            a["special"] = True
        (src / name).write_text(json.dumps(doc))
        docs[name] = doc
    out = export_onnx(src, tmp_path / "onnx", "fp32")
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        doc = json.loads((out / name).read_text())
        added = doc[key] if isinstance(doc[key], list) else list(doc[key].values())
        assert {a["content"] for a in added if not a["special"]} == {"<think>", "</think>"}, name
        for a in added:
            a["special"] = True
        assert doc == docs[name]
