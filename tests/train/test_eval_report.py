"""The target check at its bars, and the model card: every table is there and every number in it
comes from the card's inputs (rendering with perturbed inputs changes every numeric token except
the targets' own bars)."""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import asdict

import numpy as np
import pytest

from r4b_edge.train.card import CardInputs, model_card
from r4b_edge.train.recipe import Recipe
from r4b_edge.train.eval_report import markdown, targets
from r4b_edge.train.evaluate import MODES, summarize

FAMS = [("digit", "perception", None), ("colour", "perception", None), ("sum", "reasoning", None),
        ("row-max", "reasoning", None), ("total", "graded", "easy"), ("total", "graded", "hard")]


def fake_items(n: int = 40) -> list[dict]:
    return [{"id": f"i{f}{lv}{k}", "family": f, "tier": t, "level": lv} for f, t, lv in FAMS for k in range(n)]


def fake_rows(items: list[dict], seed: int) -> dict:
    """Per-item arrays of a model that is right most of the time, thinks on reasoning and on the
    hard graded items, and whose p_think separates no-think errors."""
    rng = np.random.default_rng(seed)
    n = len(items)
    tier = np.array([it["tier"] for it in items])
    hard = np.array([it["level"] == "hard" for it in items]) | (tier == "reasoning")
    rows = {}
    for mode in MODES:
        thought = np.full(n, mode == "think") if mode != "auto" else hard & (rng.random(n) < 0.97)
        p_right = np.where(hard & ~thought, 0.2, 0.96)
        rows[mode] = {"correct": rng.random(n) < p_right, "thought": thought,
                      "tokens": np.where(thought, rng.integers(25, 50, n), 5),
                      "unclosed": np.zeros(n, bool), "tags": np.zeros(n, bool)}
    wrong = ~rows["no-think"]["correct"]
    p = np.clip(np.where(wrong, 0.8, 0.1) + rng.normal(0, 0.15, n), 0, 1)
    rows["p_think"] = {"p": p, "own_choice": p >= 0.5}
    for t in (2, 3):
        rows[f"turn{t}"] = {k: v.copy() for k, v in rows["auto"].items()}
        rows[f"turn{t}"]["correct"] = rng.random(n) < 0.95
        rows[f"turn{t}"]["history_ok"] = rng.random(n) < 0.9
    return rows


@pytest.fixture(scope="module")
def results():
    items = fake_items()
    models = {name: summarize(items, fake_rows(items, k), {m: {"perception": [0.01, 0.02]} for m in MODES})
              for k, name in enumerate(("anneal", "bpo", "grpo"))}
    steps = list(range(0, 80, 10))
    return {"n_items": {"perception": 80, "reasoning": 80, "graded": 80}, "n_levels": {"easy": 40, "hard": 40},
            "per_family": 40, "seed": 1334, "ship": "bpo", "models": models,
            "grpo_curve": {"steps": steps, "perception": [0.01 * k for k in range(len(steps))],
                           "reasoning": [0.9] * len(steps), "graded": [0.5] * len(steps)}}


def target(res: dict, name_part: str, anneal: dict | None = None) -> tuple[bool, str]:
    hits = [(ok, v) for n, ok, v in targets(res, anneal) if name_part in n]
    assert len(hits) == 1, (name_part, [n for n, _, _ in targets(res, anneal)])
    return hits[0]


@pytest.mark.parametrize("path,at,above,below,name", [
    (("follow_up", "2", "graded", "accuracy"), 0.95, 0.951, 0.949, "2nd question of a chat, graded"),
    (("follow_up", "3", "perception", "accuracy"), 0.93, 0.931, 0.929, "3rd question of a chat, perception"),
    (("no-think", "perception", "accuracy"), 0.975, 0.976, 0.974, "perception accuracy >= 97.5%"),
    (("think", "reasoning", "accuracy"), 0.95, 0.96, 0.949, "reasoning think accuracy"),
    (("calibration", "graded", "auroc"), 0.9, 0.95, 0.899, "AUROC"),
    (("graded", "graded", "auto_thinks_if_no_think_wrong"), 0.9, 0.95, 0.899, "items no-think answers wrong"),
])
def test_targets_flip_at_their_bars(results, path, at, above, below, name):
    res = copy.deepcopy(results["models"]["bpo"])
    for mode in MODES:  # perception in every mode: only the probed mode decides
        res[mode]["perception"]["accuracy"] = 0.99
    res["think"]["reasoning"]["accuracy"] = 0.99
    node = res
    for k in path[:-1]:
        node = node[k]
    for v, want in ((at, True), (above, True), (below, False)):
        node[path[-1]] = v
        assert target(res, name)[0] is want, (name, v)
    node[path[-1]] = None  # not measured -> not met
    if path[-1] != "accuracy":
        assert target(res, name)[0] is False


def test_think_gap_tags_graded_tokens_and_bpo_targets(results):
    res = copy.deepcopy(results["models"]["bpo"])
    fu = res["follow_up"]["2"]["reasoning"]
    for gap, want in ((0.03, True), (-0.03, True), (0.031, False), (-0.0301, False)):
        fu["think_gap"] = gap
        assert target(res, "2nd question, reasoning: think-rate")[0] is want
    assert target(res, "no auto answer contains")[0] is True
    res["no-think"]["overall"]["think_tags"] = 2  # forced modes are reported, not part of the target
    ok, v = target(res, "no auto answer contains")
    assert ok is True and v.endswith("(forced modes: think 0, no-think 2)")
    res["follow_up"]["3"]["overall"]["think_tags"] = 1
    ok, v = target(res, "no auto answer contains")
    assert ok is False and v.startswith("1 of ")
    g = res["graded"]["graded"]
    g["mean_tokens_auto"], g["mean_tokens_think"] = 24.0, 40.0
    assert target(res, "0.6x")[0] is True
    g["mean_tokens_auto"] = 24.1
    assert target(res, "0.6x") == (False, "24.1 / 40.0 = 0.60x")
    g["accuracy_auto"], g["accuracy_think"] = 0.90, 0.91
    assert target(res, "graded: auto accuracy")[0] is True
    g["accuracy_think"] = 0.9101
    assert target(res, "graded: auto accuracy")[0] is False
    anneal = copy.deepcopy(res)
    assert target(res, "annealing-only", anneal)[0] is False  # equal is not an improvement
    anneal["auto"]["overall"]["accuracy"] -= 0.001
    assert target(res, "annealing-only", anneal)[0] is True
    assert not any("annealing-only" in n for n, _, _ in targets(res))


def card_inputs(results: dict) -> CardInputs:
    return CardInputs(
        results=results, timing={"stages": {"lm": 600.0, "pretrain": 1500.0, "anneal": 900.0, "bpo": 700.0,
                                            "grpo": 650.0, "eval": 300.0}},
        recipe=asdict(Recipe()), n_params=4_012_345,
        config={"text": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "head_dim": 64, "intermediate_size": 768, "vocab_size": 449},
                "vision": {"image_size": 64, "patch_size": 16, "hidden_size": 128, "num_hidden_layers": 2},
                "tokens_per_view": 16},
        example={"question": "What is the sum of all the digits?", "answer": "18",
                 "trace": "top-right yellow 8\nbottom-left purple 4\n8+4=12\n12+6=18"},
        tokens={"think_opening": 1, "no_think_opening": 3},
        curation={"digit": {"direct": 398, "think": 2}, "total": {"direct": 1010, "think": 990}},
        curation_levels={"total": {"easy": {"direct": 995, "think": 12}, "hard": {"direct": 15, "think": 978}}})


def test_card_holds_every_table(results):
    card = model_card(card_inputs(results))
    for name in ("anneal", "bpo", "grpo"):
        for mode in MODES:
            assert f"| {name} | {mode} | graded |" in card
        for turn in ("2nd", "3rd"):
            assert f"| {name} | {turn} | reasoning |" in card
        assert f"| {name} | hard |" in card and f"| {name} | graded | 80 |" in card  # graded + AUROC tables
    for s in ("| [0.9, 1.0] |", "| 0.50 |", "threshold_curve.png", "reliability.png", "| total (hard) | 15 | 978 |",
              "| total | 77.5 min |", "A one-token direct answer is 5 tokens", "| target | met | measured |",
              "`train reproduce` from scratch <= 2 h (all stages + eval) | yes | 77.5 min |"):
        assert s in card, s
    md = markdown(results, "bpo")
    rows = targets(results["models"]["bpo"], results["models"]["anneal"])
    assert len(rows) == 26 and all(f"| {n} | {'yes' if ok else 'NO'} | {v} |" in md for n, ok, v in rows)
    assert "| bpo | 3rd | graded |" in md and "| bpo | easy |" in md and "AUROC" in md and "own greedy choice" in md
    assert "53-60%" not in card and "26/40" not in card and "0.51x" not in card and "11.1%" not in card


NUM = re.compile(r"\d+(?:\.\d+)?")


def numbers(text: str) -> list[tuple[str, int]]:
    """Numeric tokens (value, position); digits inside names (Qwen3, R-4B, fp16, 2nd) are not numbers."""
    out = []
    for m in NUM.finditer(text):
        before, after = text[m.start() - 1:m.start()], text[m.end():m.end() + 1]
        if before.isalpha() or before == "-" and text[m.start() - 2:m.start() - 1].isalpha() or \
                (after.isalpha() and after not in "xM"):
            continue
        out.append((m.group(), m.start()))
    return out


def perturb(x, rng):
    """Every number moved (floats scaled and shifted, ints +1..3), digits of strings shifted."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, dict):
        return {k: perturb(v, rng) for k, v in x.items()}
    if isinstance(x, list):
        return [perturb(v, rng) for v in x]
    if isinstance(x, int):
        return x + int(rng.integers(1, 4)) + int(x * rng.uniform(0.05, 0.3))
    if isinstance(x, float):
        return x * float(rng.uniform(0.5, 1.5)) + float(rng.uniform(0.01, 0.05)) * max(1.0, abs(x))
    if isinstance(x, str):
        return re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), x)
    return x


def test_every_number_in_the_card_comes_from_its_inputs(results):
    """Render the card, then render it again from inputs with every number moved (3 seeds): each
    numeric token must change in at least one of them, unless it is a target's own bar (the target
    names are constants of the check, blanked out before comparing)."""
    base = card_inputs(results)
    names = [n for n, _, _ in targets(results["models"]["bpo"], results["models"]["anneal"])]
    names += ["`train reproduce` from scratch <= 2 h (all stages + eval)", "Families under 97.5% in some mode"]

    def tokens(inp: CardInputs) -> tuple[list[str], list[str]]:
        text = model_card(inp)
        for n in sorted(names, key=len, reverse=True):
            text = text.replace(n, " ")
        text = text.replace(inp.example["question"], " ")
        text = re.sub(r"\| \[\d\.\d, \d\.\d[)\]] \|", "| bin |", text)  # the reliability bins' edges (N_BINS)
        toks = re.findall(r"\d+(?:\.\d+)?|[^\d\s]+", text)
        nums = {p for _, p in numbers(text)}
        # keep a token's kind: numeric tokens are those numbers() accepts
        kinds, pos = [], 0
        for t in toks:
            pos = text.index(t, pos)
            kinds.append("N" if pos in nums else "T")
            pos += len(t)
        return toks, kinds

    a, kinds = tokens(base)
    unchanged = {i for i, k in enumerate(kinds) if k == "N"}
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        inp = CardInputs(**{k: perturb(copy.deepcopy(v), rng) for k, v in vars(base).items()})
        inp.results["ship"], inp.results["models"] = "bpo", {k: v for k, v in inp.results["models"].items()}
        b, _ = tokens(inp)
        same = set()
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if tag == "equal":
                same |= set(range(i1, i2))
        unchanged &= same
    stuck = [(a[i], " ".join(a[max(0, i - 8):i + 3])) for i in sorted(unchanged)]
    assert not stuck, stuck[:40]
    assert len([k for k in kinds if k == "N"]) > 500  # the card is full of numbers, all of them checked
