"""GGUF parity on the shipped model (r4b_edge/assets/model); skipped until it exists.

- F16: greedy tokens identical to torch for the first 32 tokens on 20 held-out world prompts
  (19 of 20, the other parting at a tie; a divergence at a clear torch choice fails with its gap
  in the message);
  image embeddings and last logits within the pinned bounds.
- Q8_0 / Q4_K_M: accuracy and think-rate (auto mode) within 1 / 3 points of torch on the
  held-out world (the model card's table comes from `python -m r4b_edge.benchmarks.card.quant_eval`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import r4b_edge

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

# R4B_GGUF_PARITY_MODEL=<checkpoint folder> runs these checks on another trained model.
SHIPPED = Path(os.environ.get("R4B_GGUF_PARITY_MODEL")
               or Path(r4b_edge.__file__).resolve().parent / "assets" / "model")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model yet")]

# Bounds, F16 GGUF vs torch float32 on CPU. Measured (docs/gguf.md): the previous shipped model
# embeddings max|diff| 2.0e-2 with max|x| 77 (2.6e-4 relative); the current one 4.9e-2 with
# max|x| 48 (1.0e-3 relative: its F32 mmproj alone is at 4.7e-4 and the tanh-GELU projector at
# 2.3e-3 absolute, the rest is fp16 weight rounding, ~2^-11 per op); last logits 6.9e-3 with
# max|x| ~15, greedy 20/20. The embedding bound is 2x the current measurement: a wrong layer or
# layout is O(1) relative, an fp16 tower is O(1e-3).
EMB_REL_BOUND = 2e-3
LOGITS_BOUND = 5e-2
# Greedy decoding may meet a numerical tie: a torch top-2 gap below this is within the
# F16 error, and either token is a correct greedy choice.
TIE_GAP = 2e-2
# The issue asks every prompt identical up to ties. On the held-out eval items (r4b_edge.train.world.eval_items,
# EVAL_SEED) the shipped model gives 19/20 identical; the 20th ("What digit is in the top-right cell?")
# parts at step 8 at a tie (torch top-2 gap 9.6e-4, within the F16 error; asserted above per prompt).
MIN_IDENTICAL = 19
PER_FAMILY = 25  # 200 items: the same held-out subset as the model card's quantization table


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from r4b_edge.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("shipped-gguf")
    return {q: export_gguf(SHIPPED, root / q, quant=q).out_dir for q in ("F16", "Q8_0", "Q4_K_M")}


def test_f16_greedy_and_bounds(exports: dict) -> None:
    import torch

    from r4b_edge.backends.llama_backend import LlamaBackend
    from r4b_edge.backends.torch_backend import TorchBackend
    from r4b_edge.model.processing import prepare_image

    from r4b_edge.benchmarks.card.parity_report import prompt_segments, world_prompts

    tb = TorchBackend(SHIPPED, device="cpu")
    lb = LlamaBackend(exports["F16"], device="cpu")
    try:
        prompts = world_prompts(20)
        assert len(prompts) >= 20
        diverged: list = []
        for img, q in prompts:
            pi = prepare_image(img, tb.config)
            with torch.inference_mode():
                ref = tb.model.image_features(torch.from_numpy(pi.pixel_values), pi.grid, pi.orig_size).numpy()
            got, _ = lb.image_embeddings(pi)
            assert np.abs(got - ref).max() < EMB_REL_BOUND * np.abs(ref).max()
            segs = prompt_segments(tb.tokenizer, pi, q)
            la, lg = tb.prefill(segs), lb.prefill(segs)
            assert np.abs(la - lg).max() < LOGITS_BOUND
            for k in range(32):
                a, b = int(la.argmax()), int(lg.argmax())
                if a != b:
                    gap = float(np.diff(np.sort(la)[-2:])[0])
                    assert gap < TIE_GAP, f"greedy tokens differ at {k} for {q!r} with a clear torch choice (gap {gap:.3g})"
                    diverged.append((q, k, gap))
                    break
                la, lg = tb.forward([a])[-1], lb.forward([b])[-1]
        # identical for the first 32 tokens on (nearly) every prompt; a divergence only at a tie
        assert len(prompts) - len(diverged) >= MIN_IDENTICAL, diverged
    finally:
        lb.close()


def test_quantized_eval_within_targets(exports: dict) -> None:
    from r4b_edge.benchmarks.card.quant_eval import run_items
    from r4b_edge.train.world import eval_items

    items = eval_items(per_family=PER_FAMILY)
    with r4b_edge.load(SHIPPED, backend="torch", device="cpu") as m:
        ref = run_items(m, items, 96)["overall"]
    one = 1 / len(items)  # on a subset, one item may flip even within the target
    for q, limit in (("Q8_0", 0.01), ("Q4_K_M", 0.03)):
        with r4b_edge.load(exports[q], backend="llama", device="cpu") as m:
            got = run_items(m, items, 96)["overall"]
        bound = max(limit, one) + 1e-9
        assert abs(got["accuracy"] - ref["accuracy"]) <= bound, (q, got, ref)
        assert abs(got["think_rate"] - ref["think_rate"]) <= bound, (q, got, ref)
