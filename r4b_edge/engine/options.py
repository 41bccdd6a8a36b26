"""Generation options and their checks: every option and every text the engine
is given is checked once per call, and a bad one raises `GenerationOptionError`
(an `R4BError`) that names the option, the value and what is allowed."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import GenerationOptionError
from ..model.template import api_mode
from .logprobs import check_top_logprobs
from .sampling import SamplingParams
from .stop import normalize_stop

DEFAULT_BUDGET_CLOSING = "\n\nThe thinking budget is used up, so I answer now.\n"


@dataclass
class GenerationOptions:
    """How to reply.

    `mode`: auto | think | no-think (any alias in `template.MODE_ALIASES` is accepted;
    `validate()` sets the API name, the one the engine and `Result.mode` speak). `think_threshold`: think iff
    p_think >= threshold (auto mode only; ignored in think/no-think).
    `max_think_tokens`: close the reasoning at this many tokens.
    `max_tokens`: hard bound on the whole reply (`Result.token_ids`), forced
    tokens included. `measure_p_think`: in think/no-think, also run the decision
    forward so that `p_think` is reported (auto mode always measures it).
    `stop`: a string or list of strings that end the answer (engine/stop.py).
    `logprobs`/`top_logprobs`: per-token log-probabilities (engine/logprobs.py).
    `deadline_ms`: a latency budget for the whole reply; in auto mode it picks
    no-think or think with a fitting reasoning budget (`engine.deadline`); it
    runs the decision forward in every mode (the plan reads p_think and its time)."""

    mode: str = "auto"
    think_threshold: float | None = None
    max_think_tokens: int | None = None
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    budget_closing: str = DEFAULT_BUDGET_CLOSING
    stop: Any = None
    logprobs: bool = False
    top_logprobs: int = 0
    deadline_ms: float | None = None
    measure_p_think: bool = False

    def validate(self) -> "GenerationOptions":
        """Check every field's type and range and spell `mode` by its API name; returns self."""
        self.mode = api_mode(self.mode)
        t = self.think_threshold
        if t is not None and not (_is_real(t) and 0.0 <= float(t) <= 1.0):
            raise GenerationOptionError(f"think_threshold must be None or a number within [0, 1], got {t!r}")
        _check_int("max_think_tokens", self.max_think_tokens, 0, optional=True)
        _check_int("max_tokens", self.max_tokens, 1)
        if not _is_real(self.temperature) or not math.isfinite(float(self.temperature)) or self.temperature < 0:
            raise GenerationOptionError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < float(self.top_p) <= 1.0:
            raise GenerationOptionError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, 0)
        if self.seed is not None and not (_is_int(self.seed) and self.seed >= 0):
            raise GenerationOptionError(f"seed must be a non-negative integer, got {self.seed!r}")
        check_text("budget_closing", self.budget_closing)
        d = self.deadline_ms
        if d is not None and not (_is_real(d) and math.isfinite(float(d)) and d > 0):
            raise GenerationOptionError(f"deadline_ms must be a positive number of milliseconds, got {d!r}")
        if not isinstance(self.measure_p_think, bool):
            raise GenerationOptionError(f"measure_p_think must be True or False, got {self.measure_p_think!r}")
        self.sampling.validate()
        self.stop = normalize_stop(self.stop)
        check_top_logprobs(self.logprobs, self.top_logprobs)
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(float(self.temperature), float(self.top_p), int(self.top_k), self.seed)


def options_from(kw: Mapping[str, Any]) -> GenerationOptions:
    """`GenerationOptions` from keyword arguments; unknown names raise
    `GenerationOptionError` listing the known ones. The values are checked by
    `validate()`, which the engine calls once per reply."""
    known = [f.name for f in fields(GenerationOptions)]
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise GenerationOptionError(
            f"unknown generation option(s): {', '.join(unknown)}; the options are {', '.join(known)}")
    return GenerationOptions(**kw)


def check_text(name: str, value: Any) -> str:
    """`value` must be a str that is valid Unicode (no lone surrogates)."""
    if not isinstance(value, str):
        raise GenerationOptionError(f"{name} must be a string, got {type(value).__name__} {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationOptionError(
            f"{name} is not valid Unicode: a lone surrogate {value[e.start]!r} at character {e.start}; "
            "pass text that encodes to UTF-8") from None
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int(name: str, v: Any, lo: int, optional: bool = False) -> None:
    if v is None and optional:
        return
    if not _is_int(v) or v < lo:
        what = f"an integer >= {lo}" + (" or None" if optional else "")
        raise GenerationOptionError(f"{name} must be {what}, got {_short(v)}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."
