"""p_think as a calibrated signal: the engine's p_think computed batched in torch, its AUROC for
"no-think answers this item wrong", a reliability table, and the accuracy-vs-tokens curve from
sweeping `think_threshold` offline (docs/training.md, "Evaluation")."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from r4b_edge.errors import TrainingError
from r4b_edge.model.reply import EMPTY_THINK_CONTINUATION, ENDOFTEXT

from .losses import embed_inputs
from .rollout import encode_prompt

#: Reliability table bins: [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0].
N_BINS = 10
#: think_threshold values of the offline sweep: 0, 0.01, ..., 1.
SWEEP_THRESHOLDS = tuple(round(k / 100, 2) for k in range(101))


@torch.no_grad()
def p_think_batched(model: Any, tok: Any, cfg: Any, items: Sequence[dict], root: Path, pixels: Any,
                    chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per item (single turn, or with its `history`): the engine's p_think = 1 - P(`\\n\\n</think>\\n\\n`
    | prompt ending in `<think>`) (r4b_edge/engine/generate.py `Engine._decide`), from one batched
    forward over prompt + suffix; and whether greedy decoding would write that suffix (every suffix
    token the argmax at its position: the engine's own choice under greedy is then no-think)."""
    sfx = tok.encode(EMPTY_THINK_CONTINUATION, add_special_tokens=False).ids
    k = len(sfx)
    target = torch.tensor(sfx, dtype=torch.long)
    pad = tok.token_to_id(ENDOFTEXT)
    p_out, g_out = [], []
    for c in range(0, len(items), chunk):
        its = items[c:c + chunk]
        seqs = [encode_prompt(tok, it["question"], "auto", cfg.image_token_index, cfg.tokens_per_view,
                              it.get("history", ())) + sfx for it in its]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            att[b, T - len(s):] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        pv = torch.from_numpy(np.stack([pixels.get(root / it["image"]) for it in its]))
        dev = model.device
        emb = embed_inputs(model, ids.to(dev), pv)
        logits, _ = model.forward(emb, attention_mask=att.to(dev), position_ids=pos.to(dev), use_cache=False)
        rows = logits[:, T - k - 1:T - 1].double().cpu()  # the rows that predict the k suffix tokens
        lp = torch.log_softmax(rows, -1).gather(-1, target.expand(len(seqs), k)[..., None]).squeeze(-1)
        p_out.append((1.0 - torch.exp(lp.sum(-1))).clamp(0.0, 1.0).numpy())
        g_out.append((rows.argmax(-1) == target).all(-1).numpy())
    if not p_out:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(p_out).astype(np.float64), ~np.concatenate(g_out)


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for the `positive` class: the probability that a
    positive item scores above a negative one, ties counted half (Mann-Whitney U / (n+ n-)).
    None when either class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape:
        raise TrainingError(f"auroc needs one label per score, got {s.shape[0]} scores and {y.shape[0]} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based rank of each value's first copy
    avg_rank = first + (counts + 1) / 2.0  # 1-based average rank of tied copies
    r_pos = avg_rank[inv][y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def reliability(p: Sequence[float], wrong: Sequence[bool], n_bins: int = N_BINS) -> list[dict]:
    """Bins of p_think ([k/n, (k+1)/n), the last closed) against the observed no-think error rate:
    {lo, hi, n, mean_p_think, error_rate} per bin (the last two None for an empty bin)."""
    pa = np.asarray(p, dtype=np.float64)
    w = np.asarray(wrong, dtype=bool)
    idx = np.minimum((pa * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                    "mean_p_think": float(pa[m].mean()) if n else None,
                    "error_rate": float(w[m].mean()) if n else None})
    return out


def threshold_sweep(p: Sequence[float], think: dict, no_think: dict,
                    thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> list[dict]:
    """Offline auto mode at each `think_threshold`: an item thinks iff p_think >= threshold and then
    takes its forced think result, else its forced no-think result. `think`/`no_think`: per-item
    arrays {"correct", "tokens"}. Under greedy decoding this is what the engine's auto mode with
    that threshold produces (it runs exactly the forced mode it picks). Rows: {threshold,
    accuracy, mean_tokens, think_rate}."""
    pa = np.asarray(p, dtype=np.float64)
    tc, nc = np.asarray(think["correct"], float), np.asarray(no_think["correct"], float)
    tt, nt = np.asarray(think["tokens"], float), np.asarray(no_think["tokens"], float)
    if not (len(pa) == len(tc) == len(nc) == len(tt) == len(nt)):
        raise TrainingError(f"threshold_sweep needs equal lengths, got p {len(pa)}, think {len(tc)}/{len(tt)}, "
                            f"no-think {len(nc)}/{len(nt)}")
    out = []
    for t in thresholds:
        use = pa >= t
        out.append({"threshold": float(t), "accuracy": float(np.where(use, tc, nc).mean()) if len(pa) else None,
                    "mean_tokens": float(np.where(use, tt, nt).mean()) if len(pa) else None,
                    "think_rate": float(use.mean()) if len(pa) else None})
    return out


def calibration(p: np.ndarray, groups: dict[str, np.ndarray], think: dict, no_think: dict) -> dict:
    """Per group (a tier, 'graded families', 'overall': boolean masks over the items): AUROC of
    p_think for "no-think answers wrong", the reliability table and the threshold sweep."""
    nc = np.asarray(no_think["correct"], dtype=bool)
    out = {}
    for name, m in groups.items():
        if not m.any():
            continue
        sub = {k: np.asarray(v)[m] for k, v in think.items()}, {k: np.asarray(v)[m] for k, v in no_think.items()}
        out[name] = {"n": int(m.sum()), "n_no_think_wrong": int((~nc[m]).sum()),
                     "auroc": auroc(p[m], ~nc[m]), "reliability": reliability(p[m], ~nc[m]),
                     "sweep": threshold_sweep(p[m], *sub)}
    return out


def sweep_check(p: np.ndarray, own_choice: np.ndarray, auto: dict, think: dict, no_think: dict,
                threshold: float = 0.5) -> dict:
    """The offline decision against the measured greedy auto row: at `threshold` and with the
    model's own greedy choice (the engine's default, `think_threshold=None`), how many items'
    decisions differ from the measured auto run's, and the offline vs measured accuracy/tokens."""
    thought = np.asarray(auto["thought"], dtype=bool)
    out = {"n": int(len(p)), "measured": {"accuracy": float(np.mean(auto["correct"])),
                                          "mean_tokens": float(np.mean(auto["tokens"])),
                                          "think_rate": float(thought.mean())}}
    for name, dec in ((f"threshold {threshold:g}", np.asarray(p) >= threshold), ("own greedy choice", own_choice)):
        acc = np.where(dec, think["correct"], no_think["correct"]).astype(float)
        tk = np.where(dec, think["tokens"], no_think["tokens"]).astype(float)
        out[name] = {"decisions_differing": int((dec != thought).sum()), "accuracy": float(acc.mean()),
                     "mean_tokens": float(tk.mean()), "think_rate": float(dec.mean())}
    return out


def plot_calibration(cal: dict, modes: dict, out: Path, model: str) -> list[Path]:
    """reliability.png (p_think vs observed no-think error rate per group) and threshold_curve.png
    (accuracy vs mean tokens as think_threshold sweeps 0..1, the measured modes as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for name, c in cal.items():
        pts = [(b["mean_p_think"], b["error_rate"]) for b in c["reliability"] if b["n"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{name} (AUROC {_fmt(c['auroc'])})")
    ax.set_xlabel("p_think (bin mean)")
    ax.set_ylabel("observed no-think error rate")
    ax.set_title(f"{model}: reliability of p_think")
    paths.append(_save(fig, ax, out / "reliability.png"))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    marks = {"auto": "o", "think": "^", "no-think": "s"}
    for k, (name, c) in enumerate(cal.items()):
        col = f"C{k}"
        ax.plot([r["mean_tokens"] for r in c["sweep"]], [100 * r["accuracy"] for r in c["sweep"]], color=col,
                label=f"{name}: threshold 0..1")
        for mode, mk in marks.items():
            m = modes.get(mode, {}).get(name)
            if m:
                ax.scatter(m["mean_tokens"], 100 * m["accuracy"], marker=mk, color=col, s=40)
    ax.set_xlabel("mean output tokens per item")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{model}: sweeping think_threshold (markers: measured auto o, think ^, no-think s)", fontsize=9)
    paths.append(_save(fig, ax, out / "threshold_curve.png"))
    return paths


def _save(fig: Any, ax: Any, path: Path) -> Path:
    """Legend, grid, layout, write the PNG and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
