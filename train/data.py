"""The one training data format (JSONL records), LLaVA conversion, and the exact
chat/training rendering with loss masks (spec: docs/data-format.md)."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from r4b_edge.errors import TrainingError
from r4b_edge.fsutil import atomic_write
from r4b_edge.model.reply import ENDOFTEXT, IM_END, IM_START, IMAGE_PLACEHOLDER, THINK_CLOSE, THINK_OPEN
from r4b_edge.model.template import TARGET_MODES, Message, render_conversation

from .checks import KINDS, RecordError, validate_check

IGNORE = -100
MODES = ("think", "direct")


#: The fields of a record (docs/data-format.md); `SHORTHAND` the shorthand's own fields.
FIELDS = ("id", "images", "messages", "answer", "trace", "mode", "meta", "system", "check")
SHORTHAND = ("image", "question")
#: Token strings no record text may hold (the renderer writes them).
SPECIAL = (IM_START, IM_END, ENDOFTEXT, THINK_OPEN, THINK_CLOSE)


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


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _expand_shorthand(rec: dict) -> None:
    """{"image"|"images", "question", "answer"} -> images + a user and an assistant turn, in place."""
    if "question" not in rec:
        raise RecordError("image", "'image' belongs to the shorthand (with 'question'); with 'messages' list 'images'")
    if "messages" in rec:
        raise RecordError("question", "give 'messages' or the shorthand 'question', not both")
    if "image" in rec and "images" in rec:
        raise RecordError("image", "give 'image' or 'images', not both")
    q = rec.pop("question")
    if not isinstance(q, str) or not q.strip():
        raise RecordError("question", f"must be non-empty text, got {_kind(q)}")
    if "image" in rec:
        img = rec.pop("image")
        if not isinstance(img, str) or not img:
            raise RecordError("image", f"must be a path (text), got {_kind(img)}")
        rec["images"] = [img]
    if rec["answer"] is None:
        raise RecordError("answer", "the shorthand needs a gold answer (a record with 'messages' may have none)")
    imgs = rec.get("images", [])
    if isinstance(imgs, list) and IMAGE_PLACEHOLDER not in q:
        q = f"{IMAGE_PLACEHOLDER}\n" * len(imgs) + q
    rec["messages"] = [{"role": "user", "content": q}, {"role": "assistant", "content": rec["answer"]}]


def normalize_record(raw: Any, default_id: str = "") -> dict:
    """A record as written in a file -> the canonical record (a new dict; a canonical record comes
    back equal). The shorthand {"image", "question", "answer"} is expanded; a leading system
    message moves to `system`; `messages` ending with a user turn get the `answer` as the last
    assistant turn; a numeric `answer` or `id` becomes text; absent `id` (-> default_id), `images`,
    `answer`, `trace`, `mode`, `meta` get their defaults. Raises RecordError."""
    if not isinstance(raw, dict):
        raise RecordError(None, f"a record is a JSON object, got {_kind(raw)}")
    for k in raw:
        if k not in FIELDS + SHORTHAND:
            near = difflib.get_close_matches(k, FIELDS + SHORTHAND, 1)
            raise RecordError(k, "unknown field (" + (f"did you mean {near[0]!r}?)" if near else
                                                     f"expected {', '.join(FIELDS + SHORTHAND)})"))
    rec = dict(raw)
    rid = rec.get("id", default_id)
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise RecordError("id", f"must be non-empty text, got {_kind(rid)}")
    ans = rec.get("answer")
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        ans = str(ans)
    if ans is not None and not isinstance(ans, str):
        raise RecordError("answer", f"must be text, a number or null, got {_kind(ans)}")
    rec["id"], rec["answer"] = rid, ans
    if "question" in rec or "image" in rec:
        _expand_shorthand(rec)
    elif "messages" not in rec:
        raise RecordError("messages", "missing: give 'messages', or the shorthand 'question' and 'answer'")
    msgs = rec["messages"]
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        if rec.get("system") is not None:
            raise RecordError("messages[0]", "a system message and a 'system' field: give one")
        rec["system"], msgs = msgs[0].get("content"), msgs[1:]
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "user" \
            and ans is not None:
        msgs = [*msgs, {"role": "assistant", "content": ans}]
    rec["messages"] = msgs
    for k, default in (("images", []), ("answer", None), ("trace", None), ("mode", None), ("meta", {})):
        rec.setdefault(k, default)
    return rec


def _text_ok(field: str, v: str) -> None:
    for t in SPECIAL:
        if t in v:
            raise RecordError(field, f"holds {t!r}, which the chat renderer writes itself")


def check_record(rec: dict, folder: str | Path | None = None) -> None:
    """Raise RecordError (field + reason) on the first problem of a canonical record; compiles
    its answer check (`checks.validate_check`; `folder`: where a python check's module may be)."""
    for k in ("id", "images", "messages"):
        if k not in rec:
            raise RecordError(k, "missing")
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("messages", f"must be a non-empty list of {{role, content}} turns, got {_kind(msgs)}")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}]", f"must be an object {{role, content}}, got {_kind(m)}")
        for k in m:
            if k not in ("role", "content"):
                raise RecordError(f"messages[{i}].{k}", "unknown field (a turn has role and content)")
        if m.get("role") != want:
            raise RecordError(f"messages[{i}].role", f"must be {want!r} (turns alternate user, assistant; a "
                              f"system prompt goes first or in 'system'), got {m.get('role')!r}")
        c = m.get("content")
        if not isinstance(c, str):
            raise RecordError(f"messages[{i}].content", f"must be text (<image> marks an image), got {_kind(c)}")
        if want == "assistant" and IMAGE_PLACEHOLDER in c:
            raise RecordError(f"messages[{i}].content", "an assistant turn holds <image>; images go in user turns")
        _text_ok(f"messages[{i}].content", c)
    if msgs[-1]["role"] != "assistant":
        raise RecordError("messages", f"must end with an assistant turn, or with a user turn and a non-null "
                          f"'answer' (got {len(msgs)} turns)")
    imgs = rec["images"]
    if not isinstance(imgs, list) or not all(isinstance(x, str) and x for x in imgs):
        raise RecordError("images", "must be a list of paths (text)")
    n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
    if n_ph != len(imgs):
        raise RecordError("images", f"{n_ph} <image> placeholders but {len(imgs)} images")
    if rec.get("answer") is not None and not isinstance(rec["answer"], str):
        raise RecordError("answer", f"must be text or null, got {_kind(rec['answer'])}")
    for k in ("trace", "system"):
        v = rec.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise RecordError(k, f"must be non-empty text or null, got {'empty text' if isinstance(v, str) else _kind(v)}")
        if v is not None:
            _text_ok(k, v)
    mode = rec.get("mode")
    if mode not in (None, *MODES):
        raise RecordError("mode", f"must be think, direct or null, got {mode!r}")
    if mode == "think" and not rec.get("trace"):
        raise RecordError("mode", "mode 'think' needs a non-empty trace")
    if not isinstance(rec.get("meta", {}), dict):
        raise RecordError("meta", f"must be an object, got {_kind(rec['meta'])}")
    validate_check(rec, folder)


def validate_record(rec: dict, where: str = "") -> dict:
    """Check a canonical record (`check_record`); raises TrainingError '{where}: field ...'
    (default where: 'record {id}'). Returns rec."""
    try:
        check_record(rec)
    except RecordError as e:
        at = where or f"record {rec.get('id')!r}"
        raise TrainingError(f"{at}: {e}") from None
    return rec


def _image_problem(p: Path) -> str | None:
    """Why `p` is not a usable image (missing, or PIL cannot read its header/checksums), or None."""
    if not p.is_file():
        return f"image file not found: {p}"
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a bad file
        return f"not a readable image: {p} ({type(e).__name__}: {e})"
    return None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records atomically (temp file + rename)."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path, *, check_images: bool = False, max_errors: int = 20) -> list[dict]:
    """Read, normalise (`normalize_record`) and validate every record of a JSONL file; image paths
    stay relative to the file's folder. The whole file is read first; each bad record is one line
    'FILE:LINE: field 'F': reason' and the first `max_errors` of them are raised together as one
    TrainingError. `check_images`: every image must exist and be readable (`load_data`)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"data file {path} does not exist")
    if max_errors < 1:
        raise TrainingError(f"max_errors must be >= 1, got {max_errors}")
    out: list[dict] = []
    bad: list[str] = []
    ids: dict[str, int] = {}
    images: dict[str, str | None] = {}
    with open(path, "rb") as f:
        for ln, raw_line in enumerate(f, 1):
            try:
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RecordError(None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise RecordError(None, f"not JSON ({e.msg} at column {e.colno})") from None
                rec = normalize_record(raw, f"{path.stem}-{ln}")
                check_record(rec, path.parent)
                if rec["id"] in ids:
                    raise RecordError("id", f"duplicate id {rec['id']!r} (line {ids[rec['id']]} has it too)")
                ids[rec["id"]] = ln
                for i, name in enumerate(rec["images"] if check_images else []):
                    p = Path(name) if Path(name).is_absolute() else path.parent / name
                    if str(p) not in images:
                        images[str(p)] = _image_problem(p)
                    if images[str(p)]:
                        raise RecordError("image" if "image" in raw else f"images[{i}]", images[str(p)] or "")
                out.append(rec)
            except RecordError as e:
                bad.append(f"{path}:{ln}: {e}")
    if bad:
        more = [f"{path}: {len(bad) - max_errors} more bad records ({len(bad)} in all)"] if len(bad) > max_errors else []
        raise TrainingError("\n".join(bad[:max_errors] + more))
    if not out:
        raise TrainingError(f"{path}: no records")
    return out


def load_data(path: str | Path, max_errors: int = 20) -> list[dict]:
    """A user's data file, validated before any compute: `read_jsonl` with every image opened."""
    return read_jsonl(path, check_images=True, max_errors=max_errors)


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
    prompt without teaching the model to choose thinking for that question. The record's `system`
    prompt (if any) comes first, never trained. A follow-up record
    (`meta.turn` > 1) trains its last turn only."""
    final_mode = mode or rec.get("mode") or "direct"
    if final_mode not in TARGET_MODES:
        raise TrainingError(f"mode must be 'think', 'forced-think' or 'direct', got {final_mode!r}")
    if final_mode != "direct" and not rec.get("trace"):
        raise TrainingError("a think-mode response needs a trace")
    pieces = render_conversation(record_messages(rec), final_mode, rec.get("system"), mask_empty_think=mask_empty_think)
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


# ---- `r4b-edge train check-data` ---------------------------------------------------------------

def summarize(recs: Sequence[dict]) -> dict:
    """Counts of a validated file: records, distinct images, multi-turn, traced, system-prompted,
    subjective (null answer) records, and records per answer-check kind."""
    kinds = {k: 0 for k in KINDS}
    for r in recs:
        kinds[(r.get("check") or {}).get("kind", "exact")] += 1
    return {"records": len(recs), "images": len({p for r in recs for p in r["images"]}),
            "multi_turn": sum(len(r["messages"]) > 2 for r in recs), "with_trace": sum(bool(r.get("trace")) for r in recs),
            "with_system": sum(bool(r.get("system")) for r in recs),
            "subjective": sum(r.get("answer") is None for r in recs), "checks": {k: n for k, n in kinds.items() if n}}


def main(argv: list[str] | None = None) -> int:
    """`train check-data FILE.jsonl [--max-errors N]`: validate a data file as training reads it
    (every record, image and answer check; no model loaded) and print its counts as JSON."""
    import argparse

    ap = argparse.ArgumentParser(prog="r4b-edge train check-data", description=main.__doc__)
    ap.add_argument("data", help="a JSONL data file (docs/data-format.md)")
    ap.add_argument("--max-errors", type=int, default=20, help="bad records to list (default 20)")
    a = ap.parse_args(argv)
    print(json.dumps({"file": a.data, **summarize(load_data(a.data, a.max_errors))}))
    return 0
