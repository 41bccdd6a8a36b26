"""Deadline mode: a latency budget picks the mode.

With `deadline_ms=T` the engine, once it has prefilled the prompt and computed the decision's
`p_think`, plans the reply: no-think, or think with a reasoning budget sized so that the
closing line and the answer still arrive before T. The plan uses

- the time already spent (prefill + decision), measured,
- the decode speed: the mean seconds per token of earlier replies' decode loops (an
  exponential moving average the engine keeps), or, before any reply, the decision
  forward's time taken as the cost of one decode step,
- expected token counts: reasoning length of replies that closed their reasoning
  themselves, answer length after thinking and without (moving averages, from priors),
- an expected-accuracy model read off `p_think` (the model's own probability that the
  question needs reasoning): no-think ``1 - p_think``; think with budget B
  ``1 - p_think * (1 - min(1, B / L))`` for expected reasoning length L.

It takes the option with the best expected accuracy that fits in `SAFETY * T` (ties, and gains
under `MIN_GAIN`, go to the faster no-think); if nothing fits, the fastest. While the reasoning
runs, the engine closes it early if the measured speed says the answer would be late.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SAFETY = 0.9  # plan to be done at 90% of the deadline: decode times vary from token to token
MIN_GAIN = 0.02  # think only if it is expected to add at least 2 points of accuracy
CLOSE_COST_TOKENS = 2.0  # the closing line + `</think>` go in one batch: about two decode steps
OPEN_COST_TOKENS = 1.0  # choosing think re-feeds the think opening: one batch, about one step
EMA = 0.3  # weight of the newest reply in the moving averages


@dataclass(frozen=True)
class DeadlinePlan:
    """What deadline mode chose and why (reported in the `Decision` event)."""

    deadline_ms: float
    elapsed_ms: float  # prefill + decision, measured, when the plan was made
    tok_s: float  # decode speed the plan used
    tok_s_source: str  # "measured decode (n replies)" | "decision forward (no decode measured yet)"
    think: bool
    max_think_tokens: int | None  # the reasoning budget (think) or None
    expected_think_tokens: float  # L: mean reasoning length of replies that closed it themselves
    expected_answer_tokens: float  # of the chosen option
    expected_accuracy: dict  # {"no-think": a, "think": b or None if it does not fit}
    expected_total_ms: float  # of the chosen option
    reason: str


class DeadlineTracker:
    """The engine's running measurements for deadline planning (see the module docstring)."""

    def __init__(self, think_tokens: float = 512.0, answer_tokens_think: float = 64.0,
                 answer_tokens_no_think: float = 64.0) -> None:
        self.s_per_token: float | None = None
        self.n_speed = 0
        self.think_tokens = float(think_tokens)
        self.answer_tokens = {True: float(answer_tokens_think), False: float(answer_tokens_no_think)}
        self.n_think = 0
        self.n_answer = {True: 0, False: 0}

    @staticmethod
    def _ema(old: float, new: float, n: int) -> float:
        return new if n == 0 else (1.0 - EMA) * old + EMA * new

    def observe(self, decode_s: float, decode_tokens: int, thought: bool, think_tokens: int,
                closed_itself: bool, answer_tokens: int) -> None:
        """File one finished reply: its decode loop time and its token counts. The loop's last
        token is never fed back, so it ran `decode_tokens - 1` forward steps."""
        if decode_tokens >= 3 and decode_s > 0:
            self.s_per_token = self._ema(self.s_per_token or 0.0, decode_s / (decode_tokens - 1), self.n_speed)
            self.n_speed += 1
        if thought and closed_itself and think_tokens > 0:
            self.think_tokens = self._ema(self.think_tokens, float(think_tokens), self.n_think)
            self.n_think += 1
        if answer_tokens > 0:
            self.answer_tokens[thought] = self._ema(self.answer_tokens[thought], float(answer_tokens),
                                                    self.n_answer[thought])
            self.n_answer[thought] += 1

    def speed(self, fallback_s: float | None) -> tuple[float, str]:
        """Seconds per decode step to plan with, and where it comes from."""
        if self.s_per_token is not None:
            return self.s_per_token, f"measured decode ({self.n_speed} replies)"
        if fallback_s is not None and fallback_s > 0:
            return fallback_s, "decision forward (no decode measured yet)"
        return 0.05, "default 20 tok/s (nothing measured yet)"

    def plan(self, deadline_ms: float, elapsed_ms: float, p_think: float, fallback_s: float | None,
             allow: tuple[bool, ...] = (False, True), user_budget: int | None = None) -> DeadlinePlan:
        """Choose among `allow` (False = no-think, True = think) for a reply due at `deadline_ms`."""
        spt, source = self.speed(fallback_s)
        L = max(1.0, self.think_tokens)
        a_no, a_th = self.answer_tokens[False], self.answer_tokens[True]
        left_tokens = (SAFETY * deadline_ms - elapsed_ms) / (spt * 1000.0)
        acc_no = 1.0 - p_think
        budget = math.floor(left_tokens - a_th - CLOSE_COST_TOKENS - OPEN_COST_TOKENS)
        if user_budget is not None:
            budget = min(budget, int(user_budget))
        think_fits = True in allow and budget >= 1
        acc_th = 1.0 - p_think * (1.0 - min(1.0, budget / L)) if think_fits else None
        no_fits = False in allow and a_no <= left_tokens
        ms = spt * 1000.0
        if think_fits and (False not in allow or acc_th - acc_no >= MIN_GAIN or not no_fits):
            think = True
            why = (f"think fits with a budget of {budget} tokens (expected reasoning {L:.0f}): expected "
                   f"accuracy {acc_th:.3f}" + (f" vs no-think {acc_no:.3f}" if False in allow else ""))
        elif False in allow:
            think = False
            if not no_fits:
                why = (f"nothing fits in {deadline_ms:.0f} ms ({elapsed_ms:.0f} ms spent, {1.0 / spt:.1f} tok/s): "
                       "no-think is the fastest")
            elif think_fits:
                why = (f"thinking would add {acc_th - acc_no:.3f} expected accuracy (< {MIN_GAIN}): "
                       f"no-think, expected accuracy {acc_no:.3f}")
            else:
                why = (f"no room to think ({left_tokens:.0f} tokens left, the answer after thinking needs "
                       f"{a_th + CLOSE_COST_TOKENS + OPEN_COST_TOKENS:.0f}): no-think, expected accuracy "
                       f"{acc_no:.3f}")
        else:
            think = True
            budget = max(0, budget)
            why = f"think forced, nothing fits: the smallest budget ({budget} tokens)"
        exp_answer = a_th if think else a_no
        total = elapsed_ms + ((min(budget, L) + CLOSE_COST_TOKENS + OPEN_COST_TOKENS if think else 0.0)
                              + exp_answer) * ms
        return DeadlinePlan(deadline_ms=float(deadline_ms), elapsed_ms=float(elapsed_ms), tok_s=1.0 / spt,
                            tok_s_source=source, think=think, max_think_tokens=int(budget) if think else None,
                            expected_think_tokens=L, expected_answer_tokens=exp_answer,
                            expected_accuracy={"no-think": acc_no if False in allow else None, "think": acc_th},
                            expected_total_ms=total, reason=why)

    def must_close(self, deadline_ms: float, elapsed_ms: float, s_per_token: float) -> bool:
        """During the reasoning: would the closing line and the answer miss `SAFETY * T` if it
        went on one more token?"""
        need = (1.0 + CLOSE_COST_TOKENS + self.answer_tokens[True]) * s_per_token * 1000.0
        return elapsed_ms + need >= SAFETY * deadline_ms
