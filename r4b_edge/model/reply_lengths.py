"""The model's own reply lengths: what deadline mode plans a fresh process with (no torch).

Deadline mode (`r4b_edge.engine.deadline`) plans with three lengths, in the engine's units
(docs/design.md, "What the engine counts"):

- `think_tokens` (L): the reasoning of a reply that thinks, the tokens before `</think>` (what
  `max_think_tokens` counts);
- `answer_tokens_think`: what follows `</think>` in such a reply (separator, answer, end token);
- `answer_tokens_no_think`: a whole direct reply, its empty think block included.

A process that has served replies knows them (moving averages of its own replies). A fresh one
(every one-shot `chat`) reads them here, from the model's own evaluation: `r4b-edge train`'s eval
(train/evaluate.py) writes, per stage model, mode and tier, the mean whole-reply length
(`mean_tokens`, the same count as `Result.token_ids`) and the think-rate into
`eval/results.json` of the shipped folder. From the shipped stage's `overall` rows:

- a direct reply: no-think's mean length D;
- a reply that thinks: auto's thinking replies, R = (M - (1 - r) D) / r from auto's mean length M
  and think-rate r (its direct replies taken as D long); where auto never thinks, think mode's
  mean length;
- the answer after thinking: D less the empty think block plus the separator (the same answer
  either way); L = R - that answer - 1 (`</think>`).

On the bundled model: D = 5.0, M = 20.8, r = 0.385, so R = 46.1, an answer of 3.0 after thinking
and L = 42.0; its replies to 36 held-out items (4 per family) through the engine: 15 thought, with
41.6 tokens of reasoning and 3.7 after it (two-digit sums take one more), 21 answered directly in 5.0.

Exports carry the same summary, since the eval folder does not travel with them: GGUF as the text
model's `formats.GGUF_REPLY_LENGTHS_KEY` metadata, ONNX as `formats.ONNX_REPLY_LENGTHS_FILE`
beside the graphs; `r4b-edge export` writes both from `eval_reply_lengths(source folder)`.

A model without eval results (a real YannQi/R-4B folder, a GGUF pulled from the Hub, an export of
such a folder) has none: `read_reply_lengths` gives None and the planner keeps its fallback
(`engine.deadline`): answers of 64 tokens, and a reasoning length it learns from the first reply
that closes its reasoning itself.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelFormatError
from ..formats import GGUF_REPLY_LENGTHS_KEY, ONNX_GENAI_CONFIG, ONNX_REPLY_LENGTHS_FILE
from .reply import ANSWER_SEPARATOR, EMPTY_THINK_CONTINUATION

#: Where a model folder keeps its eval results (written by `r4b-edge train eval`, copied by `train ship`).
EVAL_RESULTS = Path("eval") / "results.json"


@dataclass(frozen=True)
class ReplyLengths:
    """Mean reply lengths in the engine's units (see the module docstring), and where they came from."""

    think_tokens: float
    answer_tokens_think: float
    answer_tokens_no_think: float
    source: str = ""

    def to_dict(self) -> dict:
        """The summary an export carries (JSON)."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ReplyLengths":
        """Read an export's summary; a malformed one raises ModelFormatError naming `where`."""
        names = ("think_tokens", "answer_tokens_think", "answer_tokens_no_think")
        vals = [d.get(n) if isinstance(d, dict) else None for n in names]
        if not all(_positive(v) for v in vals):
            raise ModelFormatError(f"{where}: the reply-length summary is malformed (want positive numbers "
                                   f"{', '.join(names)}; got {d!r}): re-export the model with `r4b-edge export`")
        src = d.get("source")
        return cls(*(float(v) for v in vals), source=f"{where} ({src})" if isinstance(src, str) and src else where)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def from_eval_results(results: Any, tokenizer: Any, where: str = "eval results") -> Optional[ReplyLengths]:
    """The lengths from an `eval/results.json` document (see the module docstring), or None
    when it lacks the shipped stage's auto and no-think rows."""
    try:
        m = results["models"][results["ship"]]
        auto, direct = m["auto"]["overall"], m["no-think"]["overall"]
        total, rate, d = float(auto["mean_tokens"]), float(auto["think_rate"]), float(direct["mean_tokens"])
        thinking = (total - (1.0 - rate) * d) / rate if rate > 0 else float(m["think"]["overall"]["mean_tokens"])
    except (KeyError, TypeError, ValueError):
        return None
    n_empty = len(tokenizer.encode(EMPTY_THINK_CONTINUATION))
    answer_think = d - n_empty + len(tokenizer.encode(ANSWER_SEPARATOR))
    think = thinking - answer_think - 1.0
    if not all(_positive(v) for v in (think, answer_think, d)):
        return None
    how = (f"auto think-rate {rate:.3f}, thinking replies {thinking:.1f} tokens" if rate > 0
           else f"think mode {thinking:.1f} tokens")
    return ReplyLengths(think, answer_think, d, f"{where}: stage {results['ship']}, {how}, direct {d:.1f}")


def eval_reply_lengths(folder: str | Path, tokenizer: Any) -> Optional[ReplyLengths]:
    """The lengths of an R-4B checkpoint folder from its `eval/results.json`; None without one (or
    when it is not a readable eval report)."""
    p = Path(folder) / EVAL_RESULTS
    try:
        results = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return from_eval_results(results, tokenizer, str(EVAL_RESULTS))


def read_reply_lengths(model_path: str | Path, tokenizer: Any) -> Optional[ReplyLengths]:
    """The lengths a loaded model carries: a GGUF text file's metadata key, an ONNX folder's
    summary file, or a checkpoint folder's eval results; None when it has none."""
    p = Path(model_path)
    if p.is_file() and p.suffix == ".gguf":
        from ..backends.gguf_pair import read_header_keys

        try:
            raw = read_header_keys(p, [GGUF_REPLY_LENGTHS_KEY]).get(GGUF_REPLY_LENGTHS_KEY)
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{p}: not a readable GGUF header ({e})") from None
        if raw is None:
            return None
        try:
            d = json.loads(raw)
        except ValueError:
            d = raw
        return ReplyLengths.from_dict(d, f"{p.name} {GGUF_REPLY_LENGTHS_KEY}")
    if p.is_dir() and (p / ONNX_GENAI_CONFIG).is_file():
        f = p / ONNX_REPLY_LENGTHS_FILE
        if not f.is_file():
            return None
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{f} is not readable JSON ({e}): re-export the model") from None
        return ReplyLengths.from_dict(d, ONNX_REPLY_LENGTHS_FILE)
    if p.is_dir():
        return eval_reply_lengths(p, tokenizer)
    return None
