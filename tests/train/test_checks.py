"""Answer checks (train/checks.py): each kind's accept/reject table, spec errors naming the field,
and the world's records scoring exactly as the world's own `check_answer`."""
from __future__ import annotations

import sys

import pytest

from r4b_edge.errors import TrainingError
from r4b_edge.train import world as W
from r4b_edge.train.checks import PASS, RecordError, check, compile_check, extract_choice, parse_number

DATE = r"\d{4}-\d{2}-\d{2}"
CASES = [  # (spec, gold, answer, score)
    *[({"kind": "exact", "answers": ["NYC"]}, "New York", a, s) for a, s in [
        ("New York", 1), ("new york", 1), (" New   York. ", 1), ('"New York"', 1), ("**New York**", 1),
        ("(new york)!", 1), ("NYC", 1), ("\uff2e\uff39\uff23", 1), ("New York City", 0), ("York", 0), ("", 0)]],
    (None, "-3", "3", 0), (None, "-3", "-3.", 1), (None, "12%", "12", 0), (None, "Straße", "STRASSE", 1),
    ({"kind": "exact", "case_sensitive": True}, "CO", "Co", 0), ({"kind": "exact", "case_sensitive": True}, "CO", "CO.", 1),
    *[({"kind": "numeric"}, "1,234", a, s) for a, s in [
        ("1234", 1), ("1,234", 1), ("1234.0", 1), ("The answer is 1,234.", 1), ("1.234e3", 1), ("\\boxed{1234}", 1),
        ("12 then 1234", 1), ("1234 then 12", 0), ("1,235", 0), ("12,34", 0), ("one thousand", 0), ("", 0)]],
    *[({"kind": "numeric", "tolerance": 0.01}, "3.5", a, s) for a, s in [("3.505", 1), ("3.49", 1), ("3.52", 0), (".5", 0)]],
    *[({"kind": "numeric", "rel_tolerance": 0.01}, "1000", a, s) for a, s in [("1009", 1), ("990", 1), ("1011", 0)]],
    ({"kind": "numeric"}, "12", "12%", 1), ({"kind": "numeric"}, "-2", "\u22122", 1), ({"kind": "numeric"}, "-2", "2", 0),
    ({"kind": "numeric"}, "0.75", "3/4", 1), ({"kind": "numeric"}, "4", "x4", 0), ({"kind": "numeric"}, "1000", "1e3 g", 1),
    *[({"kind": "choice"}, "B", a, s) for a, s in [
        ("B", 1), ("b", 1), ("(b)", 1), ("B)", 1), ("B.", 1), ("[B]", 1), ("B) cat", 1), ("(B) a cat", 1), ("b) cat", 1),
        ("B. cat", 1), ("The answer is B.", 1), ("answer: (b)", 1), ("**B**", 1), ("Option B is right.", 1),
        ("A, no: the answer is B", 1), ("A", 0), ("A) cat", 0), ("The answer is A", 0), ("b. cat", 0), ("cat", 0),
        ("Bob", 0), ("", 0), ("the answer is bad", 0)]],
    ({"kind": "choice", "options": "ABCD"}, "b", "E", 0), ({"kind": "choice", "options": 2}, "B", "(B)", 1),
    *[({"kind": "regex", "pattern": DATE}, "2024-05-01", a, s) for a, s in [
        ("2024-05-01", 1), (" 1999-12-31\n", 1), ("on 2024-05-01", 0), ("2024-5-01", 0)]],
    ({"kind": "regex", "pattern": "yes|no", "ignore_case": True}, "yes", "YES", 1),
    ({"kind": "regex", "pattern": "yes|no"}, "yes", "YES", 0),
]


@pytest.mark.parametrize("spec,gold,answer,score", CASES)
def test_check_kinds_accept_and_reject(spec, gold, answer, score):
    rec = {"id": "r", "answer": gold, **({"check": spec} if spec else {})}
    assert check(rec, answer) == score


def test_no_answer_scores_zero_and_the_parsers():
    assert check({"answer": "x"}, None) == 0.0
    assert parse_number("between 3 and 5, so 4.5%") == 4.5 and parse_number("none") is None
    assert parse_number("1/0 or 7") == 7 and parse_number("1,234,567.5") == 1234567.5
    assert extract_choice("The answer is C", "AB") is None and extract_choice("c)", "ABC") == "C"


def test_python_check_imported_once_and_called_with_answer_and_record(tmp_path, monkeypatch):
    (tmp_path / "pycheck_mod_a.py").write_text(
        "CALLS = []\n"
        "def score(answer, record):\n"
        "    CALLS.append(record['id'])\n"
        "    return 0.25 if record['check'].get('half') else answer == record['answer']\n"
        "def bad(answer, record):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {"kind": "python", "function": "pycheck_mod_a:score", "half": True}
    assert check({"id": "a", "answer": "x", "check": spec}, "y") == 0.25
    assert compile_check(spec) is compile_check(dict(spec))  # compiled once per spec
    assert check({"id": "b", "answer": "x", "check": {"kind": "python", "function": "pycheck_mod_a:score"}}, "x") == 1.0
    assert sys.modules["pycheck_mod_a"].CALLS == ["a", "b"]
    with pytest.raises(TrainingError, match=r"record 'c': check pycheck_mod_a:bad returned 'yes'; a check returns a "
                                            r"bool or a number in \[0, 1\]"):
        check({"id": "c", "answer": "x", "check": {"kind": "python", "function": "pycheck_mod_a:bad"}}, "x")


@pytest.mark.parametrize("spec,field,reason", [
    ({"kind": "numbr"}, "check.kind", "unknown kind 'numbr' (expected exact, numeric, choice, regex, python)"),
    ("exact", "check", 'must be an object like {"kind": "exact"}, got "exact"'),
    ({"kind": "numeric", "tolerence": 1}, "check.tolerence", "unknown for kind 'numeric' (expected tolerance, rel_tolerance)"),
    ({"kind": "numeric", "tolerance": -1}, "check.tolerance", "must be a number >= 0, got -1"),
    ({"kind": "numeric", "rel_tolerance": "1%"}, "check.rel_tolerance", 'must be a number >= 0, got "1%"'),
    ({"kind": "exact", "answers": "NYC"}, "check.answers", 'must be a list of strings, got "NYC"'),
    ({"kind": "exact", "case_sensitive": "yes"}, "check.case_sensitive", 'must be true or false, got "yes"'),
    ({"kind": "choice", "options": "AB1"}, "check.options", 'must be letters ("ABCD") or a count 1-26, got "AB1"'),
    ({"kind": "regex"}, "check.pattern", "a regex check needs a pattern string, got null"),
    ({"kind": "regex", "pattern": "(a"}, "check.pattern", "bad regex '(a': missing ), unterminated subpattern at position 0"),
    ({"kind": "python", "function": "nomodule_xyz_q:f"}, "check.function",
     "cannot import module 'nomodule_xyz_q' (ModuleNotFoundError: No module named 'nomodule_xyz_q')"),
    ({"kind": "python", "function": "json:nope"}, "check.function", "module 'json' has no function 'nope'"),
    ({"kind": "python", "function": "json:__doc__"}, "check.function", "json:__doc__ is not callable"),
    ({"kind": "python", "function": "json.loads"}, "check.function", "expected 'module:function', got \"json.loads\""),
])
def test_bad_specs_name_the_field(spec, field, reason):
    for _ in range(2):  # a failure is cached and raised again the same way
        with pytest.raises(RecordError) as e:
            compile_check(spec)
        assert (e.value.field, e.value.reason) == (field, reason)
        assert str(e.value) == f"field {field!r}: {reason}"


def test_world_records_check_exactly_as_the_world(tmp_path):
    """Every eval item's record (as written, with its `check`; and a record written before records
    named their check, as rollouts see it) scores answers exactly as `world.check_answer`."""
    pytest.importorskip("torch")
    from r4b_edge.train.data import read_jsonl
    from r4b_edge.train.rollout import items_from_records

    recs = read_jsonl(W.write_world(tmp_path, W.EVAL_SEED, {f: 5 for f in W.FAMILIES}, "eval"))
    items = W.eval_items(per_family=5)
    assert [r["id"] for r in recs] == [it["id"] for it in items] and all(r["check"] == W.CHECK for r in recs)
    legacy = items_from_records([{k: v for k, v in r.items() if k != "check"} for r in recs])
    golds = sorted({it["answer"] for it in items})
    n = 0
    for rec, old, it in zip(recs, legacy, items):
        g = it["answer"]
        preds = [g, f" {g}. ", f"0{g}", g.upper(), f"{g}!", f"({g})", f"{g} {g}", f"{g}.0", f"-{g}", "",
                 g.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789"}), *golds[:12]]
        for p in preds:
            want = float(W.check_answer(p, g))
            assert check(rec, p) == want == check(old["record"], p), (rec["id"], p)
            n += want
    assert n > len(items)  # both outcomes covered
    assert PASS == 0.5
