"""OpenAI's `stop`, `logprobs` and `top_logprobs` for the chat-completions server:
request fields -> engine options, engine entries -> OpenAI's response shape.

Response shape (`choices[0].logprobs`, and the same per streamed chunk):
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
"refusal": null}`, one entry per answer token; when the reply thought, the
reasoning tokens' entries are in `reasoning_content` beside `content` (an
extra field, as the message's `reasoning_content` is).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from r4b_edge.engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from r4b_edge.engine.stop import normalize_stop
from r4b_edge.errors import GenerationOptionError

#: OpenAI's floor for a logprob too small to print (JSON has no -Infinity)
MIN_LOGPROB = -9999.0


def parse_stop_logprobs(body: dict, bad: Any) -> dict[str, Any]:
    """Engine options from the request's `stop`, `logprobs`, `top_logprobs`;
    `bad(message, param, code)` builds the 400 error."""
    out: dict[str, Any] = {}
    try:
        out["stop"] = normalize_stop(body.get("stop"))
    except GenerationOptionError as e:
        raise bad(f"'stop': {e}", "stop", "invalid_value") from None
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise bad(f"'logprobs' must be a boolean, got {type(lp).__name__}", "logprobs", "invalid_type")
    k = body.get("top_logprobs")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool):
            raise bad(f"'top_logprobs' must be an integer, got {type(k).__name__}", "top_logprobs", "invalid_type")
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}", "top_logprobs")
        if not lp:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    out["logprobs"] = bool(lp)
    out["top_logprobs"] = int(k or 0)
    return out


def _lp(x: float) -> float:
    if math.isnan(x):
        raise ValueError("a logprob is NaN: the model's logits hold NaN")
    return max(float(x), MIN_LOGPROB)


def entry_json(e: TokenLogprob) -> dict:
    """One OpenAI `ChatCompletionTokenLogprob`."""
    return {"token": e.token, "logprob": _lp(e.logprob), "bytes": list(e.bytes),
            "top_logprobs": [{"token": t.token, "logprob": _lp(t.logprob), "bytes": list(t.bytes)}
                             for t in e.top_logprobs]}


def choice_logprobs(content: Iterable[TokenLogprob],
                    reasoning: Optional[Iterable[TokenLogprob]] = None) -> dict:
    """`choices[i].logprobs` for answer entries (+ reasoning entries when there are any)."""
    out: dict[str, Any] = {"content": [entry_json(e) for e in content], "refusal": None}
    reasoning = list(reasoning or ())
    if reasoning:
        out["reasoning_content"] = [entry_json(e) for e in reasoning]
    return out
