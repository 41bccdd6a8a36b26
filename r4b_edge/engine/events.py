"""Typed events of a generation stream and the final result with its stats.

A stream yields `Progress` while the prompt is read (vision views encoded, prefill
positions evaluated), then exactly one `Decision`, then any number of
`ReasoningDelta` / `AnswerDelta`, then one `Done` carrying the `Result`.
Benchmarks read the same `Stats` the API returns.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from .logprobs import TokenLogprob


#: the words every face shows for finish_reason "stop_in_reasoning"
STOPPED_IN_REASONING = "the model stopped while reasoning, before writing an answer"


@dataclass(frozen=True)
class Progress:
    """How far the prompt has been read, before the `Decision`: `stage` "vision" counts the
    image views encoded (`done` of `total`, per image), "prefill" the prompt positions
    evaluated (of those not reused from the cache). `elapsed_ms`: since the stage began."""

    stage: str
    done: int
    total: int
    elapsed_ms: float = 0.0

    def line(self) -> str:
        """`encoding image: view 3/7`, `reading prompt: 1,024/4,540 positions (23%)`."""
        if self.stage == "vision":
            return f"encoding image: view {self.done}/{self.total}"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"reading prompt: {self.done:,}/{self.total:,} positions ({pct:.0f}%)"


@dataclass(frozen=True)
class Decision:
    """Whether the reply thinks. `p_think` = 1 - P(empty think block | prompt);
    None when it was not measured (think/no-think mode without
    `measure_p_think`, or a prompt already past the decision point).
    `deadline`: with `deadline_ms`, the plan that chose (see `engine.deadline`)."""

    think: bool
    p_think: Optional[float]
    forced: bool
    deadline: "DeadlinePlan | None" = None


@dataclass(frozen=True)
class ReasoningDelta:
    """New reasoning text. With `logprobs=True`, `logprobs` holds the entries
    of the tokens sampled since the previous delta (text held back is
    reported with the delta that shows it)."""

    text: str
    logprobs: tuple["TokenLogprob", ...] = ()


@dataclass(frozen=True)
class AnswerDelta:
    """New answer text; `logprobs` as for `ReasoningDelta`."""

    text: str
    logprobs: tuple["TokenLogprob", ...] = ()


@dataclass
class Stats:
    """Per-call measurements; times in milliseconds, memory in MiB.

    Token counts partition the reply (`Result.token_ids`, every token after the
    prompt's `<think>`, forced ones included): `think_tokens` is the think block
    up to and including `</think>` (the budget's closing line too) when the reply
    thinks, else 0; `answer_tokens` is the rest (for a direct reply, its empty
    block `\n\n</think>\n\n` too) up to and including the end token.
    `prompt_tokens` ends at that `<think>`."""

    image_tokens: int = 0
    prompt_tokens: int = 0
    #: the prefill's positions (the prompt, plus a forced mode's opening) that were evaluated,
    #: and those kept from the cache (an earlier turn's: prefix reuse)
    positions_evaluated: int = 0
    positions_reused: int = 0
    vision_encode_ms: float = 0.0
    prefill_ms: float = 0.0
    decision_ms: float = 0.0
    ttft_ms: float = 0.0
    time_to_answer_ms: float = 0.0
    think_tokens: int = 0
    answer_tokens: int = 0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    decode_tps: float = 0.0
    total_ms: float = 0.0
    peak_rss_mb: float = 0.0
    budget_hit: bool = False
    #: "stop" | "length" | "stop_in_reasoning" (the model wrote its end token inside the think
    #: block: there is reasoning but no answer; `STOPPED_IN_REASONING` is what faces show)
    finish_reason: str = ""
    backend: str = ""
    device: str = ""

    def line(self) -> str:
        """One human-readable line (the CLI's --verbose output)."""
        return (
            f"image {self.image_tokens} tok | prompt {self.prompt_tokens} tok "
            f"({self.positions_evaluated} evaluated, {self.positions_reused} reused) | "
            f"vision {self.vision_encode_ms:.0f} ms | prefill {self.prefill_ms:.0f} ms | "
            f"ttft {self.ttft_ms:.0f} ms | answer after {self.time_to_answer_ms:.0f} ms | "
            f"think {self.think_tokens} + answer {self.answer_tokens} tok | "
            f"{self.decode_tps:.1f} tok/s | total {self.total_ms:.0f} ms | "
            f"peak RSS {self.peak_rss_mb:.0f} MiB | {self.backend}/{self.device}"
        )


@dataclass
class Result:
    """The outcome of one reply. `mode`: the mode asked for by its API name (auto |
    think | no-think) whichever alias was passed ("long" gives "think"); `thought`
    says what the reply did. `token_ids`: every token after the prompt's `<think>`
    (docs/design.md, "What the engine counts")."""

    answer: str
    reasoning: str
    thought: bool
    p_think: Optional[float]
    mode: str
    forced: bool
    stats: Stats = field(default_factory=Stats)
    token_ids: list[int] = field(default_factory=list)
    #: with `logprobs=True`: one entry per sampled answer / reasoning token (else None)
    logprobs: Optional[list["TokenLogprob"]] = None
    reasoning_logprobs: Optional[list["TokenLogprob"]] = None
    #: the stop string that ended the answer (finish_reason "stop"), else None
    stop_sequence: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Done:
    result: Result


Event = Union[Progress, Decision, ReasoningDelta, AnswerDelta, Done]
