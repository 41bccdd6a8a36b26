"""Answer checks: how a model's answer is scored against a record's gold answer (spec:
docs/data-format.md "Answer checks"). One function scores every answer, the world's and users':
`check(record, answer) -> float in [0, 1]`; annealing curation and the BPO/GRPO reward call it.

A record's `check` field picks the kind (absent or null: `{"kind": "exact"}`):

- `exact`: equal after `normalize_text` (NFKC, case folded unless `case_sensitive`, whitespace runs
  collapsed, surrounding whitespace and `STRIP` punctuation dropped); `answers` lists more accepted
  answers besides the gold one.
- `numeric`: the answer's number (`parse_number`) within `tolerance` (absolute, default 0) or
  `rel_tolerance` (relative to the gold, default 1e-9) of the gold's number.
- `choice`: the letter the answer chooses (`extract_choice`) equals the gold letter; `options`
  (a string of letters, or a count n: the first n letters) limits the letters, default A-Z.
- `regex`: the answer, stripped of surrounding whitespace, fully matches `pattern`
  (`ignore_case` optional).
- `python`: `function` is "module:function", imported once and called as
  `fn(answer: str, record: dict) -> bool | float in [0, 1]`; the spec may hold more keys, which the
  function reads from `record["check"]`.

Specs are compiled once (regexes compiled, functions imported) and cached by their JSON text. A
bad spec raises `RecordError` naming the record field (`check.kind`, `check.pattern`, ...)."""
from __future__ import annotations

import importlib
import json
import math
import re
import string
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from r4b_edge.errors import TrainingError

KINDS = ("exact", "numeric", "choice", "regex", "python")
#: A score at or above PASS counts as a correct answer (curation's "all N wrong" rule).
PASS = 0.5
#: Characters `exact` drops around an answer (with whitespace): sentence punctuation, quotes,
#: brackets and markdown emphasis. Never signs, `%`, `$` or `#`: "-3" and "3" stay different.
STRIP = ".,;:!?'\"`*_()[]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e\u3002\u3001\uff0c\uff1a\uff1b\uff01\uff1f"
_OPTIONS = {"exact": ("answers", "case_sensitive"), "numeric": ("tolerance", "rel_tolerance"),
            "choice": ("options",), "regex": ("pattern", "ignore_case"), "python": ("function",)}


class RecordError(TrainingError):
    """A bad record: `field` names the record field ('check.kind', 'images[1]', ...; None: the
    record as a whole), `reason` says what is wrong. Readers prefix the file and line."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}" if field else reason)
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Check:
    """A compiled spec: `score(answer, gold, record)` -> float in [0, 1]."""

    kind: str
    spec: dict
    score: Callable[[str, Any, dict], float]


# ---- the parsers -----------------------------------------------------------------------------

def normalize_text(text: str, case_sensitive: bool = False) -> str:
    """NFKC, whitespace runs -> one space, `STRIP` characters and whitespace dropped at both ends,
    case folded (unless `case_sensitive`)."""
    s = " ".join(unicodedata.normalize("NFKC", text).split()).strip(STRIP + " ")
    return s if case_sensitive else s.casefold()


# A number: sign (also U+2212), digits with optional ',' thousands groups, optional '.' decimals,
# optional exponent, optional '/denominator'; not glued to a letter, digit or '.' before it.
_NUM = re.compile(r"(?<![\w.])([-+\u2212]?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
                  r"(?:[eE]([-+]?\d+))?(?:\s*/\s*(\d+)(?![\d.]))?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_number(text: str) -> float | None:
    """The last number in `text` (inside the last `\\boxed{...}` when there is one), or None.

    Reads "1,234" (',' only as a thousands separator), "3.5", ".5", "-2", "1e3", "3/4" (0.75);
    a '%' is ignored ("12%" reads 12); fullwidth digits via NFKC."""
    s = unicodedata.normalize("NFKC", text)
    boxed = _BOXED.findall(s)
    if boxed:
        s = boxed[-1]
    found = None
    for m in _NUM.finditer(s):
        sign, body, exp, den = m.groups()
        v = float(body.replace(",", "")) * (10.0 ** int(exp) if exp else 1.0)
        if den is not None:
            if int(den) == 0:
                continue
            v /= int(den)
        found = -v if sign in ("-", "\u2212") else v
    return found if found is None or math.isfinite(found) else None


_CHOICE_WHOLE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?")
_CHOICE_LEAD = re.compile(r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])\)|([A-Z])[.:])\s")
_CHOICE_PHRASE = re.compile(r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is))?\s*:?\s*"
                            r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![\w']))")


def extract_choice(text: str, letters: str = string.ascii_uppercase) -> str | None:
    """The letter (upper case) an answer chooses, or None; markdown `*` and `_` are ignored.

    1. the whole answer is a letter, optionally bracketed or followed by ')', '.' or ':':
       "B", "b", "(b)", "[B]", "B)", "B.";
    2. it starts with "(b) ", "[b] ", "b) " or (upper case only) "B. ", "B: ": "B) cat";
    3. else the last "answer is B", "answer: (b)", "option B", "choice B" (the phrase in any case;
       a bare letter upper case): "The answer is B.".
    A letter outside `letters` chooses nothing."""
    s = unicodedata.normalize("NFKC", text).replace("*", "").replace("_", "").strip()
    m = _CHOICE_WHOLE.fullmatch(s) or _CHOICE_LEAD.match(s + " ")
    if m is None:
        hits = list(_CHOICE_PHRASE.finditer(s))
        m = hits[-1] if hits else None
    if m is None:
        return None
    got = next(g for g in m.groups() if g).upper()
    return got if got in letters else None


# ---- compiling a spec ------------------------------------------------------------------------

_CACHE: dict[str, Check | RecordError] = {}  # by spec JSON: the check, or why it does not compile


def _num(spec: dict, key: str, default: float) -> float:
    v = spec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise RecordError(f"check.{key}", f"must be a number >= 0, got {json.dumps(v)}")
    return float(v)


def _flag(spec: dict, key: str) -> bool:
    v = spec.get(key, False)
    if not isinstance(v, bool):
        raise RecordError(f"check.{key}", f"must be true or false, got {json.dumps(v)}")
    return v


def _gold(gold: Any) -> str:
    if gold is None:
        raise TrainingError("this check compares with a gold answer, and the record's answer is null")
    return str(gold)


def _exact(spec: dict) -> Callable[[str, Any, dict], float]:
    cs = _flag(spec, "case_sensitive")
    extra = spec.get("answers", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise RecordError("check.answers", f"must be a list of strings, got {json.dumps(extra)}")
    accepted = {normalize_text(a, cs) for a in extra}
    return lambda ans, gold, rec: float(normalize_text(ans, cs) in accepted | {normalize_text(_gold(gold), cs)})


def _numeric(spec: dict) -> Callable[[str, Any, dict], float]:
    tol, rel = _num(spec, "tolerance", 0.0), _num(spec, "rel_tolerance", 1e-9)

    def score(ans: str, gold: Any, rec: dict) -> float:
        g = parse_number(_gold(gold))
        a = parse_number(ans)
        if g is None:
            raise TrainingError(f"the gold answer {gold!r} holds no number for the numeric check")
        return float(a is not None and abs(a - g) <= max(tol, rel * abs(g)))
    return score


def _letters(spec: dict) -> str:
    opt = spec.get("options", string.ascii_uppercase)
    if isinstance(opt, int) and not isinstance(opt, bool) and 1 <= opt <= 26:
        return string.ascii_uppercase[:opt]
    if isinstance(opt, str) and opt.isascii() and opt.isalpha():
        return opt.upper()
    raise RecordError("check.options", f"must be letters (\"ABCD\") or a count 1-26, got {json.dumps(opt)}")


def _choice(spec: dict) -> Callable[[str, Any, dict], float]:
    letters = _letters(spec)
    return lambda ans, gold, rec: float(extract_choice(ans, letters) == _gold(gold).strip().upper())


def _regex(spec: dict) -> Callable[[str, Any, dict], float]:
    pat = spec.get("pattern")
    if not isinstance(pat, str):
        raise RecordError("check.pattern", f"a regex check needs a pattern string, got {json.dumps(pat)}")
    try:
        rx = re.compile(pat, re.IGNORECASE if _flag(spec, "ignore_case") else 0)
    except re.error as e:
        raise RecordError("check.pattern", f"bad regex {pat!r}: {e}") from None
    return lambda ans, gold, rec: float(rx.fullmatch(ans.strip()) is not None)


def load_function(ref: Any, folder: str | Path | None = None) -> Callable[..., Any]:
    """Import "module:function" (a dotted attribute path after ':'); `folder` (the data file's)
    is searched after sys.path. Raises RecordError on field 'check.function'."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise RecordError("check.function", f"expected 'module:function', got {json.dumps(ref)}")
    mod_name, attr = ref.split(":")
    extra = str(folder) if folder is not None and str(folder) not in sys.path else None
    if extra:
        sys.path.append(extra)
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # the user's module: any error while importing it is theirs
        raise RecordError("check.function", f"cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    finally:
        if extra:
            sys.path.remove(extra)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecordError("check.function", f"module {mod_name!r} has no function {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecordError("check.function", f"{ref} is not callable")
    return obj


def _python(spec: dict, folder: str | Path | None) -> Callable[[str, Any, dict], float]:
    ref = spec.get("function")
    fn = load_function(ref, folder)

    def score(ans: str, gold: Any, rec: dict) -> float:
        v = fn(ans, rec)
        if isinstance(v, bool) or (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            return float(v)
        raise TrainingError(f"check {ref} returned {v!r}; a check returns a bool or a number in [0, 1]")
    return score


def compile_check(spec: Any, folder: str | Path | None = None) -> Check:
    """The compiled check of a spec (None: exact), cached by the spec's JSON text."""
    if spec is None:
        spec = {"kind": "exact"}
    if not isinstance(spec, dict):
        raise RecordError("check", f"must be an object like {{\"kind\": \"exact\"}}, got {json.dumps(spec)}")
    try:
        key = json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise RecordError("check", f"must be plain JSON ({e})") from None
    if key not in _CACHE:
        try:
            _CACHE[key] = _compile(spec, folder)
        except RecordError as e:
            _CACHE[key] = e
    got = _CACHE[key]
    if isinstance(got, RecordError):
        raise RecordError(got.field, got.reason)
    return got


def _compile(spec: dict, folder: str | Path | None) -> Check:
    kind = spec.get("kind", "exact")
    if kind not in KINDS:
        raise RecordError("check.kind", f"unknown kind {kind!r} (expected {', '.join(KINDS)})")
    if kind != "python":  # python specs may carry the function's own keys
        for k in spec:
            if k != "kind" and k not in _OPTIONS[kind]:
                raise RecordError(f"check.{k}", f"unknown for kind {kind!r} (expected {', '.join(_OPTIONS[kind])})")
    builders: dict[str, Callable[[dict], Callable[[str, Any, dict], float]]] = {
        "exact": _exact, "numeric": _numeric, "choice": _choice, "regex": _regex,
        "python": lambda s: _python(s, folder)}
    return Check(kind, spec, builders[kind](spec))


_CALLED: set[str] = set()  # python checks already tried on a gold answer


def validate_check(rec: dict, folder: str | Path | None = None) -> Check:
    """Compile `rec["check"]` and try it on the record's gold answer: numeric golds must hold a
    number, choice golds be one of the letters, regex golds match; a python function is called
    once per spec (on the first record that uses it) to catch a wrong signature or return value.
    Raises RecordError naming the field."""
    c = compile_check(rec.get("check"), folder)
    gold = rec.get("answer")
    if gold is None:
        if c.kind != "python" and rec.get("check") is not None:
            raise RecordError("answer", f"a {c.kind} check needs a gold answer, got null")
        return c
    if c.kind == "numeric" and parse_number(gold) is None:
        raise RecordError("answer", f"the numeric check needs a number, got {gold!r}")
    if c.kind == "choice" and not (len(gold.strip()) == 1 and gold.strip().upper() in _letters(c.spec)):
        raise RecordError("answer", f"the choice check needs one of the letters {_letters(c.spec)}, got {gold!r}")
    if c.kind == "regex" and not c.score(gold, gold, rec):
        raise RecordError("answer", f"the gold answer {gold!r} does not fully match check.pattern {c.spec['pattern']!r}")
    key = json.dumps(c.spec, sort_keys=True)
    if c.kind == "python" and key not in _CALLED:
        try:
            c.score(gold, gold, rec)
        except TrainingError as e:
            raise RecordError("check.function", f"on the gold answer: {e}") from None
        except Exception as e:  # the user's function: report its error in one line
            raise RecordError("check.function", f"{c.spec['function']} raised {type(e).__name__} on the gold "
                              f"answer: {e}") from None
        _CALLED.add(key)
    return c


def check(record: dict, answer: str | None) -> float:
    """Score `answer` against `record` with the record's check: a float in [0, 1] (no answer, e.g.
    a think block that never closed: 0). The reward of BPO/GRPO and curation's correctness."""
    if answer is None:
        return 0.0
    try:
        return compile_check(record.get("check")).score(answer, record.get("answer"), record)
    except TrainingError as e:
        raise TrainingError(f"record {record.get('id')!r}: {e}") from None
