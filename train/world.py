"""The procedural visual-reasoning world (spec: docs/world.md): training and evaluation data, so
it lives in train/; no runtime module asks it (the eval, the model-card reports, the benchmarks and
the tests import it from here). `r4b-edge train world` writes a split of it to a folder (`write_world`).

A scene is a 64x64 RGB image split into a 2x2 grid of 32x32 cells; every cell
holds one coloured item, either a seven-segment digit or a shape. Questions
come in two tiers: *perception* (one glance) and *reasoning* (several digits
combined, with a step trace). Everything is a pure function of (seed, index).
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from r4b_edge.errors import R4BError, TrainingError

IMAGE_SIZE = 64
CELL = 32
BACKGROUND = (0, 0, 0)
POSITIONS = ["top-left", "top-right", "bottom-left", "bottom-right"]  # reading order
ORIGINS = [(0, 0), (32, 0), (0, 32), (32, 32)]  # (x, y) of each cell
COLOURS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (170, 60, 220), "white": (240, 240, 240),
}
SHAPES = ["square", "circle", "triangle"]
SEGMENTS = {  # seven-segment patterns, segments a..g
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}
PERCEPTION = ["digit", "colour", "shape", "count", "colour-count"]
REASONING = ["sum", "product-plus", "row-max"]
#: Graded families: one question template, an easy level the model can answer at a glance and a
#: hard level it needs steps for (docs/world.md "Graded families"); their tier is "graded".
GRADED = ["total"]
FAMILIES = PERCEPTION + REASONING + GRADED
TIERS = ("perception", "reasoning", "graded")
#: total: digits in the scene per level, and the level's probability.
TOTAL_LEVELS = {"easy": ((1,), 0.5), "hard": ((3, 4), 0.5)}
TEMPLATES = {
    "caption": "Describe the image.",
    "digit": "What digit is in the {pos} cell?",
    "colour": "What colour is the item in the {pos} cell?",
    "shape": "What shape is in the {pos} cell?",
    "count": "How many shapes are there?",
    "colour-count": "How many {colour} items are there?",
    "sum": "What is the sum of all the digits?",
    "product-plus": "Multiply the first two digits, then add the third digit. What is the result?",
    "row-max": "Which row has the larger digit sum? Give that sum.",
    "total": "Add up all the digits. What is the total?",
}


@dataclass(frozen=True)
class Item:
    """One cell's content: kind 'digit' (value 0-9) or 'shape' (value a SHAPES name)."""

    kind: str
    value: int | str
    colour: str

    def describe(self) -> str:
        """'red 3' or 'blue circle'."""
        return f"{self.colour} {self.value}"


@dataclass(frozen=True)
class Scene:
    """Four items in reading order (top-left, top-right, bottom-left, bottom-right)."""

    items: tuple[Item, Item, Item, Item]

    @property
    def digits(self) -> list[int]:
        """Digit values in reading order (shapes skipped)."""
        return [int(it.value) for it in self.items if it.kind == "digit"]

    def key(self) -> str:
        """Stable text key of the scene (hashing / splitting)."""
        return "|".join(f"{it.kind}:{it.value}:{it.colour}" for it in self.items)

    @classmethod
    def from_key(cls, key: str) -> "Scene":
        """The scene back from its `key()`."""
        cells = [c.split(":") for c in key.split("|")]
        if len(cells) != 4 or any(len(c) != 3 for c in cells):
            raise TrainingError(f"scene key needs 4 cells 'kind:value:colour' joined by '|', got {key!r}")
        return cls(tuple(Item(k, int(v) if k == "digit" else v, c) for k, v, c in cells))  # type: ignore[arg-type]

    def split(self) -> str:
        """'eval' for the 10% of scenes whose sha256(key) is 0 mod 10, else 'train'."""
        h = int(hashlib.sha256(self.key().encode()).hexdigest(), 16)
        return "eval" if h % 10 == 0 else "train"


@dataclass
class Question:
    """A question about a scene, its exact answer and its step trace."""

    family: str
    tier: str
    question: str
    answer: str
    trace: str
    meta: dict = field(default_factory=dict)


def scan_text(scene: Scene) -> str:
    """The scene readout, one line per cell: 'top-left red 3' ... (caption and perception trace)."""
    return "\n".join(f"{p} {it.describe()}" for p, it in zip(POSITIONS, scene.items))


def render(scene: Scene) -> Image.Image:
    """Draw the scene exactly as docs/world.md specifies (numpy rectangles, no fonts)."""
    arr = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    arr[:, :] = BACKGROUND
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for (cx, cy), it in zip(ORIGINS, scene.items):
        col = COLOURS[it.colour]
        if it.kind == "digit":
            x0, x1, y0, y1, ym, t = cx + 9, cx + 23, cy + 4, cy + 28, cy + 16, 3
            rects = {
                "a": (x0, y0, x1, y0 + t), "b": (x1 - t, y0, x1, ym), "c": (x1 - t, ym, x1, y1),
                "d": (x0, y1 - t, x1, y1), "e": (x0, ym, x0 + t, y1), "f": (x0, y0, x0 + t, ym),
                "g": (x0, ym - 1, x1, ym + 2),
            }
            for s in SEGMENTS[int(it.value)]:
                ax, ay, bx, by = rects[s]
                arr[ay:by, ax:bx] = col
        elif it.value == "square":
            arr[cy + 8:cy + 24, cx + 8:cx + 24] = col
        elif it.value == "circle":
            m = (xs + 0.5 - (cx + 16)) ** 2 + (ys + 0.5 - (cy + 16)) ** 2 <= 8.5 ** 2
            arr[m] = col
        else:  # triangle, apex up
            m = (ys >= cy + 7) & (ys < cy + 25) & (np.abs(xs + 0.5 - (cx + 16)) <= (ys - (cy + 7) + 1) * 0.5)
            arr[m] = col
    return Image.fromarray(arr, "RGB")


def _rng(seed: int, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, index, salt])


def sample_scene(rng: np.random.Generator, min_digits: int = 0) -> Scene:
    """Each cell: a digit with p=0.7 else a shape; colours uniform. Rejects below min_digits."""
    cols = list(COLOURS)
    while True:
        items = []
        for _ in range(4):
            colour = cols[int(rng.integers(len(cols)))]
            if rng.random() < 0.7:
                items.append(Item("digit", int(rng.integers(10)), colour))
            else:
                items.append(Item("shape", SHAPES[int(rng.integers(3))], colour))
        scene = Scene(tuple(items))  # type: ignore[arg-type]
        if len(scene.digits) >= min_digits:
            return scene


def _lines(*parts: str) -> str:
    return "\n".join(parts)


def ask(scene: Scene, family: str, rng: np.random.Generator) -> Question:
    """Build one question of `family` about `scene` (the scene must suit the family)."""
    scan = scan_text(scene)
    its = scene.items
    if family == "caption":
        return Question(family, "caption", TEMPLATES["caption"], scan, "", {})
    if family in ("digit", "shape"):
        kind = "digit" if family == "digit" else "shape"
        idx = [i for i, it in enumerate(its) if it.kind == kind]
        if not idx:
            raise TrainingError(f"scene has 0 cells of kind {kind!r} for family {family!r}")
        i = idx[int(rng.integers(len(idx)))]
        q = TEMPLATES[family].format(pos=POSITIONS[i])
        a = str(its[i].value)
        return Question(family, "perception", q, a, _lines(scan, f"{POSITIONS[i]} -> {a}"), {"pos": POSITIONS[i]})
    if family == "colour":
        i = int(rng.integers(4))
        q = TEMPLATES[family].format(pos=POSITIONS[i])
        a = its[i].colour
        return Question(family, "perception", q, a, _lines(scan, f"{POSITIONS[i]} -> {a}"), {"pos": POSITIONS[i]})
    if family == "count":
        at = [p for p, it in zip(POSITIONS, its) if it.kind == "shape"]
        trace = _lines(scan, f"shapes: {' '.join(at) or 'none'} -> {len(at)}")
        return Question(family, "perception", TEMPLATES[family], str(len(at)), trace, {})
    if family == "colour-count":
        colour = its[int(rng.integers(4))].colour if rng.random() < 0.8 else list(COLOURS)[int(rng.integers(6))]
        at = [p for p, it in zip(POSITIONS, its) if it.colour == colour]
        trace = _lines(scan, f"{colour}: {' '.join(at) or 'none'} -> {len(at)}")
        return Question(family, "perception", TEMPLATES[family].format(colour=colour), str(len(at)), trace,
                        {"colour": colour})
    d = scene.digits
    if family == "sum":
        if len(d) < 2:
            raise TrainingError(f"sum needs >= 2 digits, scene has {len(d)}")
        steps, acc = [], d[0]
        for x in d[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        return Question(family, "reasoning", TEMPLATES[family], str(acc), _lines(scan, *steps), {})
    if family == "product-plus":
        if len(d) < 3:
            raise TrainingError(f"product-plus needs >= 3 digits, scene has {len(d)}")
        p = d[0] * d[1]
        trace = _lines(scan, f"{d[0]}*{d[1]}={p}", f"{p}+{d[2]}={p + d[2]}")
        return Question(family, "reasoning", TEMPLATES[family], str(p + d[2]), trace, {})
    if family == "row-max":
        if len(d) != 4:
            raise TrainingError(f"row-max needs 4 digits, scene has {len(d)}")
        top, bot = d[0] + d[1], d[2] + d[3]
        trace = _lines(scan, f"top {d[0]}+{d[1]}={top}", f"bottom {d[2]}+{d[3]}={bot}", f"larger {max(top, bot)}")
        return Question(family, "reasoning", TEMPLATES[family], str(max(top, bot)), trace, {})
    if family == "total":
        if not d:
            raise TrainingError("total needs >= 1 digit, scene has 0")
        level = next((lv for lv, (ns, _) in TOTAL_LEVELS.items() if len(d) in ns), "other")
        steps, acc = [], d[0]
        for x in d[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        return Question(family, "graded", TEMPLATES[family], str(acc), _lines(scan, *steps, f"total {acc}"),
                        {"level": level, "n_digits": len(d)})
    raise TrainingError(f"unknown question family {family!r}; known: {', '.join(FAMILIES)}")


MIN_DIGITS = {"digit": 1, "sum": 2, "product-plus": 3, "row-max": 4, "total": 1}


def suits(scene: Scene, family: str) -> bool:
    """Whether `ask(scene, family)` has the cells it needs (a total only at one of its levels)."""
    n = len(scene.digits)
    if family == "shape":
        return n < 4
    if family == "total":
        return any(n in ns for ns, _ in TOTAL_LEVELS.values())
    return n >= MIN_DIGITS.get(family, 0)


def opening_question(scene: Scene, rng: np.random.Generator, families: Sequence[str] = PERCEPTION) -> Question:
    """A question of one of `families` the scene suits, drawn uniformly: an earlier turn of a chat."""
    fams = [f for f in families if suits(scene, f)]
    return ask(scene, fams[int(rng.integers(len(fams)))], rng)


def opening_for(scene_key: str, seed: int, salt: int, item_id: str) -> Question:
    """The opening question of the chat that asks item `item_id` (scene `scene_key`) second,
    seeded by (seed, salt, item id): the same for every run, batch and process layout."""
    rng = np.random.default_rng([seed, salt, zlib.crc32(item_id.encode())])
    return opening_question(Scene.from_key(scene_key), rng)


def history_for(scene_key: str, seed: int, salt: int, item_id: str, n: int) -> list[Question]:
    """The `n` earlier questions of a chat that asks item `item_id` (scene `scene_key`) as question
    n + 1: each drawn uniformly from every family (all tiers) the scene suits, seeded by (seed, salt,
    item id, n), so a chat is the same for every run, batch and process layout (docs/world.md)."""
    if n < 0:
        raise TrainingError(f"a chat has >= 0 earlier questions, got {n}")
    rng = np.random.default_rng([seed, salt, zlib.crc32(item_id.encode()), n])
    scene = Scene.from_key(scene_key)
    return [opening_question(scene, rng, FAMILIES) for _ in range(n)]


def make_example(seed: int, index: int, family: str, split: str = "train") -> tuple[Scene, Question]:
    """The (scene, question) for (seed, index, family); scenes are drawn until their split matches."""
    if split not in ("train", "eval"):
        raise TrainingError(f"split must be 'train' or 'eval', got {split!r}")
    rng = _rng(seed, index, FAMILIES.index(family) + 1 if family in FAMILIES else 0)
    n_digits: tuple[int, ...] = ()
    if family == "total":  # the level first, then a scene with that many digits
        levels = list(TOTAL_LEVELS.values())
        n_digits = levels[int(rng.choice(len(levels), p=[p for _, p in levels]))][0]
    for _ in range(10_000):
        scene = sample_scene(rng, MIN_DIGITS.get(family, 0))
        if family == "shape" and not any(it.kind == "shape" for it in scene.items):
            continue
        if n_digits and len(scene.digits) not in n_digits:
            continue
        if scene.split() == split:
            return scene, ask(scene, family, rng)
    raise TrainingError(f"no {split} scene found in 10000 draws for seed {seed} index {index}")


_NUM = re.compile(r"^[+-]?\d+$")


def normalize_answer(text: str) -> str:
    """Lower-case, trim, drop a trailing '.', collapse spaces, canonical integers ('07' -> '7')."""
    s = " ".join(text.strip().lower().split()).rstrip(".").strip()
    if _NUM.match(s):
        s = str(int(s))
    return s


def check_answer(prediction: str, gold: str) -> bool:
    """The reward rule: exact match after normalize_answer."""
    return normalize_answer(prediction) == normalize_answer(gold)


def check_record(answer: str, record: dict) -> bool:
    """`check_answer` against a world record's gold answer: the world's `python` answer check."""
    return check_answer(answer, record["answer"])


#: The `check` of every world record (`train.checks`): the world's own rule, `check_record`.
CHECK = {"kind": "python", "function": "r4b_edge.train.world:check_record"}


# ---- the held-out eval set every report, table and benchmark asks -----------------------------
#: World seed of the held-out eval split: training's recipe seed (1234, `train.recipe.Recipe`) +
#: EVAL_SEED_OFFSET. `train/evaluate.py` (the model card's eval) scores exactly these items; the
#: model-card reports (benchmarks/card/: onnx_report, quant_eval, parity_report, gpu_parity) and the
#: bench's modes table default to them, so every table describes the same questions.
EVAL_SEED_OFFSET = 100
EVAL_SEED = 1234 + EVAL_SEED_OFFSET


def item_id(split: str, seed: int, family: str, index: int) -> str:
    """The id of world item (split, seed, family, index), as in the written records."""
    return f"{split}-{seed}-{family}-{index:06d}"


def eval_items(split: str = "eval", per_family: int = 25, seed: int = EVAL_SEED,
               families: Sequence[str] | None = None, interleaved: bool = False) -> list[dict]:
    """`per_family` world items of each family: {id, index, family, tier, question, answer (the
    gold answer), trace, scene, image (PIL)}. Family by family (the written records' order), or
    `interleaved` (index by index, so every prefix covers the families)."""
    fams = list(families or FAMILIES)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise R4BError(f"unknown eval families {unknown}; known: {', '.join(FAMILIES)}")
    order = ([(f, i) for i in range(per_family) for f in fams] if interleaved
             else [(f, i) for f in fams for i in range(per_family)])
    out = []
    for fam, i in order:
        scene, q = make_example(seed, i, fam, split)
        out.append({"id": item_id(split, seed, fam, i), "index": i, "family": fam, "tier": q.tier,
                    "question": q.question, "answer": q.answer, "trace": q.trace, "scene": scene,
                    "image": render(scene)})
    return out


# ---- `r4b-edge train world`: a split written to a folder -------------------------------------
def write_world(out_dir: str | Path, seed: int, counts: dict[str, int], split: str = "train",
                start: int = 0) -> Path:
    """Render `counts[family]` examples per family into out_dir (images/*.png + records.jsonl)."""
    from .data import make_record, write_jsonl

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for family, n in counts.items():
        for i in range(start, start + n):
            scene, q = make_example(seed, i, family, split)
            name = f"images/{item_id(split, seed, family, i)}.png"
            path = out / name
            if not path.exists():
                render(scene).save(path, optimize=False)
            records.append(make_record(item_id(split, seed, family, i), name, q.question,
                                       q.answer, q.trace or None,
                                       {"tier": q.tier, "family": family, "scene": scene.key(), **q.meta},
                                       check=CHECK))
    return write_jsonl(out / "records.jsonl", records)


def main(argv: list[str] | None = None) -> int:
    """`train world`: write a world split to a folder."""
    import argparse

    ap = argparse.ArgumentParser(prog="r4b-edge train world", description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--split", choices=["train", "eval"], default="train")
    ap.add_argument("--per-family", type=int, default=100)
    ap.add_argument("--families", default=",".join(["caption"] + FAMILIES))
    a = ap.parse_args(argv)
    counts = {f: a.per_family for f in a.families.split(",")}
    p = write_world(a.out, a.seed, counts, a.split)
    print(json.dumps({"records": str(p), "n": sum(counts.values())}))
    return 0
