"""Measure GGUF vs torch parity for a checkpoint (used to write docs/gguf.md and to pin
the test bounds); not run in CI.

    python -m r4b_edge.benchmarks.card.parity_report CHECKPOINT --work /tmp/parity [--prompts 20] [--out PARITY.md]

Exports F32-mmproj/F16/Q8_0/Q4_K_M pairs into --work (no-op when up to date) and prints
a markdown table: image-embedding and last-logit max |diff|, the part of the embedding
error due to llama.cpp's tanh-GELU in the projector (torch run with tanh vs erf), and
greedy-token identity over the held-out eval items (`r4b_edge.train.world.eval_items`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def world_prompts(n: int) -> list:
    """(PIL image, question) of the first `n` held-out eval items, interleaved over the families."""
    from r4b_edge.train.world import eval_items

    return [(it["image"], it["question"]) for it in eval_items(per_family=-(-n // 8), interleaved=True)[:n]]


def prompt_segments(tok, image, question: str):
    from r4b_edge.model.reply import IMAGE_PLACEHOLDER
    from r4b_edge.model.template import Message, render_prompt

    a, b = render_prompt([Message("user", question, images=1)], "auto").split(IMAGE_PLACEHOLDER)
    return [tok.encode(a), image, tok.encode(b)]


def measure(ckpt: Path, gguf_dir: Path, prompts, n_tokens: int = 32) -> dict:
    """Max |diff| of embeddings / last logits and greedy identity for one GGUF pair."""
    import torch

    from r4b_edge.backends.llama_backend import LlamaBackend
    from r4b_edge.backends.torch_backend import TorchBackend
    from r4b_edge.model.processing import prepare_image

    tb, lb = TorchBackend(ckpt, device="cpu"), LlamaBackend(gguf_dir, device="cpu")
    emb, logit, ident, first_diff, margins = 0.0, 0.0, 0, [], []
    try:
        for img, q in prompts:
            pi = prepare_image(img, tb.config)
            with torch.inference_mode():
                ref = tb.model.image_features(torch.from_numpy(pi.pixel_values), pi.grid, pi.orig_size).numpy()
            got, _ = lb.image_embeddings(pi)
            emb = max(emb, float(np.abs(got - ref).max()))
            segs = prompt_segments(tb.tokenizer, pi, q)
            la, lg = tb.prefill(segs), lb.prefill(segs)
            logit = max(logit, float(np.abs(la - lg).max()))
            same, pos = True, n_tokens
            for k in range(n_tokens):
                s = np.sort(la)
                margins.append(float(s[-1] - s[-2]))
                a, b = int(la.argmax()), int(lg.argmax())
                if a != b:
                    same, pos = False, k
                    break
                la, lg = tb.forward([a])[-1], lb.forward([b])[-1]
            ident += same
            first_diff.append(pos)
    finally:
        lb.close()
    return {"emb_max_abs": emb, "logits_max_abs": logit, "greedy_identical": ident, "prompts": len(prompts),
            "min_first_diff": min(first_diff), "min_torch_margin": min(margins)}


def gelu_effect(ckpt: Path, prompts) -> float:
    """Max |diff| of torch image features with tanh-GELU vs exact GELU in the projector."""
    import torch

    from r4b_edge.model.checkpoint import load_checkpoint
    from r4b_edge.model.processing import prepare_image

    model, cfg, _ = load_checkpoint(ckpt)
    worst = 0.0
    with torch.inference_mode():
        for img, _ in prompts[:5]:
            pi = prepare_image(img, cfg)
            pv = torch.from_numpy(pi.pixel_values)
            model.model.multi_modal_projector.act = torch.nn.GELU()
            a = model.image_features(pv, pi.grid, pi.orig_size)
            model.model.multi_modal_projector.act = torch.nn.GELU(approximate="tanh")
            b = model.image_features(pv, pi.grid, pi.orig_size)
            worst = max(worst, float((a - b).abs().max()))
    model.model.multi_modal_projector.act = torch.nn.GELU()
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--quants", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the table here (markdown) and the raw numbers next to it (.json)")
    a = ap.parse_args(argv)
    from r4b_edge.errors import R4BError
    from r4b_edge.export.gguf import export_gguf

    if a.prompts < 1:
        raise R4BError(f"--prompts must be >= 1, got {a.prompts}")

    prompts = world_prompts(a.prompts)
    rows = []
    for q, mq in [("F16", "F32")] + [(q, None) for q in a.quants]:
        tag = f"{q}+mmproj-{mq or ('Q8_0' if q == 'Q8_0' else 'F16')}"
        r = export_gguf(a.checkpoint, a.work / tag, quant=q, mmproj_quant=mq)
        m = measure(a.checkpoint, r.out_dir, prompts)
        m.update(pair=tag, text_mib=round(r.text.stat().st_size / 2**20, 2),
                 mmproj_mib=round(r.mmproj.stat().st_size / 2**20, 2))
        rows.append(m)
        print(json.dumps(m), flush=True)
    g = gelu_effect(a.checkpoint, prompts)
    print(json.dumps({"projector_tanh_vs_erf_gelu_max_abs": g}))
    text = markdown(rows, g)
    print("\n" + text)
    if a.out:
        from r4b_edge.fsutil import atomic_write

        with atomic_write(a.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
        a.out.with_suffix(".json").write_text(json.dumps(
            {"checkpoint": str(a.checkpoint), "pairs": rows, "projector_tanh_vs_erf_gelu_max_abs": g}, indent=2))
    return 0


def markdown(rows: list[dict], gelu: float) -> str:
    """The parity table (one row per pair) and the projector-GELU line."""
    lines = ["| pair | text MiB | mmproj MiB | emb max abs diff | last-logit max abs diff | greedy 32 identical |",
             "|---|---|---|---|---|---|"]
    for m in rows:
        lines.append(f"| {m['pair']} | {m['text_mib']} | {m['mmproj_mib']} | {m['emb_max_abs']:.2e} | "
                     f"{m['logits_max_abs']:.2e} | {m['greedy_identical']}/{m['prompts']} |")
    lines += ["", f"projector GELU tanh vs erf alone (torch): {gelu:.2e}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
