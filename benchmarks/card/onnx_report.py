"""ONNX vs torch on a trained checkpoint: greedy parity, eval accuracy / think-rate per precision,
CPU decode speed; writes the markdown table for the model card (QUANT_ONNX.md).

    python -m r4b_edge.benchmarks.card.onnx_report --model r4b_edge/assets/model \
        --exports runs/onnx --md r4b_edge/assets/model/QUANT_ONNX.md

Every backend runs the same engine (greedy, auto mode) on the same held-out world questions
(`r4b_edge.train.world.eval_items`, the model card's eval split), so the deltas are the export's and nothing else's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from r4b_edge.export.onnx import export_onnx
from r4b_edge.train.world import eval_items

PRECISIONS = ("fp32", "int8", "int4")


def greedy_parity(ref: Any, other: Any, items: Sequence[dict], n_tokens: int = 32) -> dict:
    """Greedy tokens of `other` vs `ref` backend for the first `n_tokens` after each prompt
    (teacher-forced on the reference's tokens, so one flip does not cascade into the logits
    comparison): prompts whose tokens all match, and max |logit difference|."""
    from r4b_edge.model.processing import prepare_image
    from r4b_edge.model.reply import IMAGE_PLACEHOLDER
    from r4b_edge.model.template import Message, render_prompt

    tok = ref.tokenizer
    same, worst, agree, total = 0, 0.0, 0, 0
    for it in items:
        img = prepare_image(it["image"], ref.config)
        text = render_prompt([Message("user", it["question"], images=1)], "auto")
        pre, post = text.split(IMAGE_PLACEHOLDER, 1)
        segs = [tok.encode(pre), img, tok.encode(post)]
        la, lb = ref.prefill(segs), other.prefill(segs)
        ta, tb = [], []
        for _ in range(n_tokens):
            worst = max(worst, float(np.abs(la - lb).max()))
            ta.append(int(np.argmax(la)))
            tb.append(int(np.argmax(lb)))
            la, lb = ref.forward([ta[-1]])[-1], other.forward([ta[-1]])[-1]
        same += ta == tb
        agree += sum(a == b for a, b in zip(ta, tb))
        total += len(ta)
    return {"prompts": len(items), "identical_prompts": same, "token_agreement": agree / max(total, 1),
            "max_abs_logit_diff": worst}


def evaluate(backend: Any, items: Sequence[dict], max_tokens: int = 64) -> dict:
    """Accuracy and think-rate (auto mode, greedy) per tier and overall."""
    from r4b_edge.engine.generate import Engine, GenerationOptions
    from r4b_edge.model.processing import prepare_image
    from r4b_edge.model.template import Message
    from r4b_edge.train.world import check_answer

    eng = Engine(backend)
    rows = []
    for it in items:
        img = prepare_image(it["image"], backend.config)
        r = eng.generate([Message("user", it["question"], images=1)], [img],
                         GenerationOptions(mode="auto", max_tokens=max_tokens))
        rows.append((it["tier"], check_answer(r.answer, it["answer"]), r.thought, len(r.token_ids)))
    out = {}
    for tier in ("perception", "reasoning", "graded", "overall"):
        sel = [x for x in rows if tier == "overall" or x[0] == tier]
        if sel:
            out[tier] = {"n": len(sel), "accuracy": float(np.mean([x[1] for x in sel])),
                         "think_rate": float(np.mean([x[2] for x in sel])),
                         "mean_tokens": float(np.mean([x[3] for x in sel]))}
    return out


def decode_speed(backends: dict[str, Any], n_tokens: int = 128, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` decode tokens/s of each backend (one token per forward after a short
    prompt); the repeats are interleaved across backends so background load hits all alike."""
    best = {name: 0.0 for name in backends}
    for _ in range(repeats):
        for name, be in backends.items():
            logits = be.prefill([[be.tokenizer.im_start] * 8])
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                logits = be.forward([int(np.argmax(logits))])[-1]
            best[name] = max(best[name], n_tokens / (time.perf_counter() - t0))
    return best


def report(model: Path, exports: Path, per_family: int = 25, parity_prompts: int = 24,
           threads: int | None = None) -> dict:
    """Export fp32/int8/int4 (cached), then parity, eval and speed of each vs torch fp32."""
    import torch

    from r4b_edge.backends.onnx_backend import OnnxBackend
    from r4b_edge.backends.torch_backend import TorchBackend

    if threads:
        torch.set_num_threads(threads)
    dirs = {p: export_onnx(model, exports / f"onnx-{p}", p) for p in PRECISIONS}
    tb = TorchBackend(model, device="cpu")
    items = eval_items(per_family=per_family)
    parity_items = eval_items(per_family=max(1, -(-parity_prompts // 8)))[:parity_prompts]
    res: dict[str, Any] = {"model": str(model), "torch": {"eval": evaluate(tb, items)}}
    obs = {p: OnnxBackend(d, device="cpu", threads=threads) for p, d in dirs.items()}
    for p, ob in obs.items():
        res[p] = {"parity": greedy_parity(tb, ob, parity_items), "eval": evaluate(ob, items),
                  "bytes": sum(f.stat().st_size for f in dirs[p].glob("*.onnx*"))}
    speed = decode_speed({"torch": tb, **obs})
    for name, tps in speed.items():
        res[name]["decode_tps"] = tps
    for ob in obs.values():
        ob.close()
    return res


def _tiers(ev: dict) -> str:
    """'perception | reasoning | graded' accuracy cells ('–' for a tier without items)."""
    return " | ".join(f"{ev[t]['accuracy']:.1%}" if t in ev else "–" for t in ("perception", "reasoning", "graded"))


def markdown(res: dict) -> str:
    """The model-card table."""
    t = res["torch"]
    lines = [
        "## ONNX precisions (onnxruntime CPU) vs torch fp32",
        "",
        f"Model: `{res['model']}`; {t['eval']['overall']['n']} held-out world questions (auto mode, greedy); "
        "parity: greedy tokens of the first 32 steps after each image prompt, teacher-forced on torch's tokens.",
        "",
        "| backend | graphs MB | accuracy | Δ acc (pts) | think-rate | Δ think (pts) | perception acc | reasoning acc "
        "| graded acc | identical 32-token prompts | token agreement | max abs logit diff | decode tok/s | speed vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| torch fp32 | – | {t['eval']['overall']['accuracy']:.1%} | – | {t['eval']['overall']['think_rate']:.1%} | – "
        f"| {_tiers(t['eval'])} | – | – | – | {t['decode_tps']:.0f} | 1.00x |",
    ]
    for p in PRECISIONS:
        if p not in res:
            continue
        r, e = res[p], res[p]["eval"]
        da = (e["overall"]["accuracy"] - t["eval"]["overall"]["accuracy"]) * 100
        dt = (e["overall"]["think_rate"] - t["eval"]["overall"]["think_rate"]) * 100
        pa = r["parity"]
        lines.append(
            f"| onnx {p} | {r['bytes'] / 1e6:.1f} | {e['overall']['accuracy']:.1%} | {da:+.1f} | "
            f"{e['overall']['think_rate']:.1%} | {dt:+.1f} | {_tiers(e)} | {pa['identical_prompts']}/{pa['prompts']} "
            f"| {pa['token_agreement']:.1%} | {pa['max_abs_logit_diff']:.2g} | {r['decode_tps']:.0f} "
            f"| {r['decode_tps'] / t['decode_tps']:.2f}x |")
    lines += ["", "Targets (issue 5): fp32 identical greedy tokens on every prompt; int8 within 1 point and int4 within "
              "3 points of torch in accuracy and think-rate; ONNX int8 decode >= 1.5x torch fp32 on CPU.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r4b_edge.benchmarks.card.onnx_report", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="R-4B checkpoint folder")
    ap.add_argument("--exports", required=True, help="folder for the onnx-fp32/int8/int4 exports (reused)")
    ap.add_argument("--md", default=None, help="write the markdown table here (e.g. the model's QUANT_ONNX.md)")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--per-family", type=int, default=25, help="eval questions per world family")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both torch and onnxruntime")
    ap.add_argument("--parity-prompts", type=int, default=24, help="image prompts of the greedy parity check")
    a = ap.parse_args(argv)
    from r4b_edge.errors import R4BError

    if a.per_family < 1 or a.parity_prompts < 1:
        raise R4BError(f"--per-family and --parity-prompts must be >= 1, got {a.per_family} and {a.parity_prompts}")
    res = report(Path(a.model), Path(a.exports), a.per_family, parity_prompts=a.parity_prompts, threads=a.threads)
    md = markdown(res)
    print(md)
    from r4b_edge.fsutil import atomic_write

    if a.md:
        with atomic_write(a.md) as tmp:
            tmp.write_text(md, encoding="utf-8")
    if a.json:
        with atomic_write(a.json) as tmp:
            tmp.write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
