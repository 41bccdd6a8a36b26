"""The one training data format (JSONL records), LLaVA conversion, and the exact
chat/training rendering with loss masks (spec: docs/data-format.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from r4b_edge.errors import TrainingError
from r4b_edge.fsutil import atomic_write
from r4b_edge.model.reply import IM_START, IMAGE_PLACEHOLDER
from r4b_edge.model.template import TARGET_MODES, Message, render_conversation

IGNORE = -100
MODES = ("think", "direct")


def make_record(rid: str, image: str | None, question: str, answer: str | None,
                trace: str | None = None, meta: dict | None = None, mode: str | None = None, *,
                system: str | None = None, check: dict | None = None) -> dict:
    """A single-turn record: user '<image>\\n{question}', assistant '{answer}' (`system` and
    `check` only when given)."""
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if image else question
    rec: dict[str, Any] = {
        "id": rid, "images": [image] if image else [],
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer or ""}],
        "answer": answer, "trace": trace, "mode": mode, "meta": meta or {},
    }
    if system is not None:
        rec["system"] = system
    if check is not None:
        rec["check"] = check
    return rec


def validate_record(rec: dict, where: str = "") -> dict:
    """Check a record's fields; raises TrainingError naming the problem. Returns rec."""
    at = f" ({where})" if where else ""
    for k in ("id", "images", "messages"):
        if k not in rec:
            raise TrainingError(f"record{at} lacks field {k!r}")
    msgs = rec["messages"]
    if not msgs or msgs[-1].get("role") != "assistant":
        raise TrainingError(f"record {rec['id']}{at}: messages must end with an assistant turn, got {len(msgs)} messages")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want or not isinstance(m.get("content"), str):
            raise TrainingError(f"record {rec['id']}{at}: message {i} must be a {want} turn with text content")
    n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
    if n_ph != len(rec["images"]):
        raise TrainingError(f"record {rec['id']}{at}: {n_ph} <image> placeholders but {len(rec['images'])} images")
    mode = rec.get("mode")
    if mode not in (None, *MODES):
        raise TrainingError(f"record {rec['id']}{at}: mode must be think, direct or null, got {mode!r}")
    if mode == "think" and not rec.get("trace"):
        raise TrainingError(f"record {rec['id']}{at}: mode 'think' needs a non-empty trace")
    return rec


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records atomically (temp file + rename)."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate records; image paths stay relative to the file's folder."""
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"data file {path} does not exist")
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrainingError(f"{path}:{ln}: not JSON ({e.msg} at column {e.colno})") from None
                out.append(validate_record(rec, f"{path}:{ln}"))
    return out


def convert_llava(entries: str | Path | list[dict], image_root: str = "") -> list[dict]:
    """LLaVA conversation JSON ([{id, image, conversations:[{from, value}]}]) -> records.

    'human' -> user, 'gpt' -> assistant; the answer is None (subjective), so such
    records train as direct answers and are not curated by the N-sample rule."""
    if not isinstance(entries, list):
        entries = json.loads(Path(entries).read_text())
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for k, e in enumerate(entries):
        conv = e.get("conversations") or []
        msgs = []
        for c in conv:
            r = roles.get(c.get("from", ""))
            if r is None:
                raise TrainingError(f"LLaVA entry {k}: unknown speaker {c.get('from')!r}")
            msgs.append({"role": r, "content": c.get("value", "")})
        imgs = e.get("image") or []
        imgs = [imgs] if isinstance(imgs, str) else list(imgs)
        imgs = [str(Path(image_root) / i) if image_root else i for i in imgs]
        if imgs and not any(IMAGE_PLACEHOLDER in m["content"] for m in msgs if m["role"] == "user"):
            msgs[0]["content"] = IMAGE_PLACEHOLDER + "\n" + msgs[0]["content"]
        rec = {"id": str(e.get("id", k)), "images": imgs, "messages": msgs,
               "answer": None, "trace": None, "mode": None, "meta": {"source": "llava"}}
        out.append(validate_record(rec, f"LLaVA entry {k}"))
    return out


# ---- rendering (r4b_edge.model.template.render_conversation is the one renderer) ------------

def record_messages(rec: dict) -> list[Message]:
    """A record's turns as template Messages; the last assistant turn carries the record's trace."""
    msgs = [Message(m["role"], m["content"]) for m in rec["messages"]]
    msgs[-1].reasoning = rec.get("trace") or ""
    return msgs


def record_pieces(rec: dict, mode: str | None = None, mask_empty_think: bool = False) -> list[tuple[str, bool]]:
    """All (text, trained) pieces of a record: `render_conversation` with the last turn in `mode`
    (think | forced-think | direct; default the record's mode, else direct); earlier assistant
    turns are direct. `<think>` is never trained; `forced-think` leaves the decision token (the
    `\n` after `<think>`) untrained too, so the trace is learned as the answer to a forced-think
    prompt without teaching the model to choose thinking for that question. A follow-up record
    (`meta.turn` > 1) trains its last turn only."""
    final_mode = mode or rec.get("mode") or "direct"
    if final_mode not in TARGET_MODES:
        raise TrainingError(f"mode must be 'think', 'forced-think' or 'direct', got {final_mode!r}")
    if final_mode != "direct" and not rec.get("trace"):
        raise TrainingError("a think-mode response needs a trace")
    pieces = render_conversation(record_messages(rec), final_mode, mask_empty_think=mask_empty_think)
    if rec.get("meta", {}).get("turn", 1) > 1:  # a follow-up: the history is context, not a target
        last_user = max(i for i, (t, _) in enumerate(pieces) if t.startswith(f"{IM_START}user"))
        pieces = [(t, tr and i > last_user) for i, (t, tr) in enumerate(pieces)]
    return pieces


@dataclass
class Encoded:
    """One tokenised example: ids with image placeholders expanded, labels (-100 = no loss)."""

    ids: list[int]
    labels: list[int]
    images: list[str]


def encode_pieces(tok: Any, pieces: Sequence[tuple[str, bool]], image_id: int, n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Encode each piece and expand every image id into n_image_tokens copies."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        for t in tok.encode(text, add_special_tokens=False).ids:
            rep = n_image_tokens if t == image_id else 1
            ids += [t] * rep
            labels += [t if (trained and t != image_id) else IGNORE] * rep
    return ids, labels


def encode_record(tok: Any, rec: dict, image_id: int, n_image_tokens: int, mode: str | None = None,
                  mask_empty_think: bool = False, max_len: int = 512) -> Encoded:
    """Tokenise a record into the exact training format (see docs/data-format.md)."""
    ids, labels = encode_pieces(tok, record_pieces(rec, mode, mask_empty_think), image_id, n_image_tokens)
    if len(ids) > max_len:
        raise TrainingError(f"record {rec['id']} has {len(ids)} tokens, over max_len {max_len}")
    return Encoded(ids, labels, list(rec["images"]))


def load_pixels(path: str | Path, size: int) -> np.ndarray:
    """Base view as uint8 HWC: RGB, resized to size x size (bicubic) when needed."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def normalize_pixels(a: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HWC -> (x/255 - mean)/std, float32 CHW (as r4b_edge.model.processing does)."""
    f = a.astype(np.float32) / 255.0
    f = (f - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return f.transpose(2, 0, 1)


class PixelCache:
    """Loads each image once (uint8, keyed by path) and normalises on access."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, mean, std
        self._c: dict[str, np.ndarray] = {}

    def get(self, path: str | Path) -> np.ndarray:
        """Normalised float32 CHW pixels of one image."""
        k = str(path)
        if k not in self._c:
            self._c[k] = load_pixels(k, self.size)
        return normalize_pixels(self._c[k], self.mean, self.std)


def collate(examples: Sequence[Encoded], pixels: PixelCache, root: Path, pad_id: int) -> dict:
    """Right-padded batch: input_ids, labels, attention_mask [B,T]; pixel_values [N_img,3,S,S]."""
    import torch

    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    lab = torch.full((B, T), IGNORE, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    imgs = []
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        lab[b, :n] = torch.tensor(e.labels)
        att[b, :n] = 1
        imgs += [pixels.get(root / p) for p in e.images]
    pv = torch.from_numpy(np.stack(imgs)) if imgs else None
    return {"input_ids": ids, "labels": lab, "attention_mask": att, "pixel_values": pv}
