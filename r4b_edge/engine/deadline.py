"""Deadline mode: a latency budget picks the mode.

With `deadline_ms=T` the engine, once it has prefilled the prompt and computed the decision's
`p_think`, plans the reply: no-think, or think with a reasoning budget sized so that the
closing line and the answer still arrive before T. The plan uses

- the time already spent (prefill + decision), measured,
- the decode speed: the median time of the engine's recent decode steps (one sampled token
  and its forward; the tracker keeps the last `WINDOW`). Steps are timed one by one: a batch
  (the budget's closing line, fed at once) is timed as its own cost, never divided among
  its tokens, which would make decoding look faster than it is. A fresh process has timed
  none: its first plan knows only that a step costs at least the prefill's time per position
  (a batch never costs more per token) and at most about the decision forward's, a batch of
  three that is also the first forward of its shape (the bundled model on a busy 2-core
  machine: torch 4-6 ms against 2-4 ms steps, 38 ms against ~17 at a busier moment; llama.cpp
  1.3-1.6 ms against 0.2-0.8 ms). Where the choice is the same at both bounds it is made
  at once (at the decision forward's pace); where it is not (`pace_decides`) the engine first
  times up to `PROBE_STEPS` decode steps at the reply's own position and rolls them back
  (their time counts in the reply's), stopping as soon as the median of two or more of its
  steps says thinking cannot fit (so at a tight deadline it costs two steps), so `--deadline`
  plans with this device's measured pace on its first call,
- expected token counts: reasoning length L of replies that closed their reasoning
  themselves, answer length after thinking and without (moving averages of the replies served).
  Before any, the model's own lengths (`r4b_edge.model.reply_lengths`: from its eval results,
  carried by its GGUF/ONNX exports), so a fresh process (a one-shot `chat --deadline`) plans from
  the model, not from a constant: priors of 64-token answers made the bundled model expect
  328 ms for a 5-token direct answer and refuse, at 400 ms, a thinking reply that takes 147 ms.
  A model without eval results (a real R-4B) starts from `DEFAULT_ANSWER_TOKENS` answers and an
  unknown L: the plan then thinks wherever at least `EXPLORE_MIN_TOKENS` of reasoning fit (or
  the user's `max_think_tokens` says how long it may be), with the budget that fits, and so
  learns L (a made-up prior would decide every reply of a fresh process: one of 512 tokens made
  `chat --deadline 1000` never think on a model whose reasoning takes 45),
- an expected-accuracy model read off `p_think` (the model's own probability that the
  question needs reasoning): no-think ``1 - p_think``; think with budget B ``1`` if B covers
  the expected reasoning length L, else ``1 - p_think`` (reasoning cut short is counted as
  no gain: 61 of 64 budget-cut replies of the bundled model's deadline sweep were wrong). So
  deadline mode thinks only where the usual reasoning fits, and is never expected to do
  worse than no-think.

It takes the option with the best expected accuracy that fits in `SAFETY * T` (ties, and gains
under `MIN_GAIN`, go to the faster no-think); if nothing fits, the fastest.

Before the prefill, in auto mode, `plan_before_prefill` asks whether the usual reasoning could fit
even if the prefill and the decision took no time at all. If not, the plan above can only choose
no-think, so the engine decides it there and then: it prefills the prompt with the empty think
block, as fixed no-think does, and skips the decision forward (its `p_think` is not measured).
At tight deadlines that forward is a large share of a direct reply.

While the reasoning runs, the engine re-measures every step and closes the reasoning early
(`must_close`) as soon as one more token, the closing batch and the answer might not fit in
`LIVE_SAFETY * T` at a conservative pace: the slower of the `QUANTILE` of recent step times and
this reply's own moving average, the slowest closing batch seen recently, and the `QUANTILE`
of recent answer lengths. A machine that slows down mid-reply (load) thus shortens the
reasoning instead of delivering late; the plan's median pace only sizes the budget's ceiling
(`max_think_tokens`: what fits in the whole of T).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .events import Decision
    from ..model.reply_lengths import ReplyLengths

SAFETY = 0.9  # plan to be done at 90% of the deadline
LIVE_SAFETY = 0.95  # the live check, which already assumes a slow pace, closes at 95% of it
MIN_GAIN = 0.02  # think only if it is expected to add at least 2 points of accuracy
CLOSE_COST_TOKENS = 2.0  # the closing line + `</think>` go in one batch: two steps until one is timed
OPEN_COST_TOKENS = 1.0  # choosing think re-feeds the think opening: one batch, about one step
EMA = 0.3  # weight of the newest reply (or step, live) in the moving averages
QUANTILE = 90.0  # percentile of recent step times and answer lengths the live check assumes
WINDOW = 512  # recent decode steps kept
MIN_STEPS = 4  # steps measured before they replace the decision forward's time
PROBE_STEPS = 5  # a fresh engine's pace probe: decode steps timed, then rolled back (see `pace_decides`)
EXPLORE_MIN_TOKENS = 16  # while L is unknown: the least reasoning budget worth thinking for
DEFAULT_ANSWER_TOKENS = 64.0  # answer length prior of a model without eval results (model.reply_lengths)


def percentile(values, q: float) -> float:
    """numpy's default (linear) percentile in plain Python: numpy's first median or percentile
    call in a process costs ~10 ms, which a fresh process's first plan would pay."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


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
    #                               (while none has: the budget the plan hands out, or 0)
    expected_answer_tokens: float  # of the chosen option
    expected_accuracy: dict  # {"no-think": a, "think": b or None if it does not fit}
    expected_total_ms: float  # of the chosen option
    reason: str
    step_ms_conservative: float = 0.0  # the live check's pace: the QUANTILE of recent steps (ms)
    lengths_source: str = ""  # where the expected lengths came from (the model's eval, replies served, defaults)


class DeadlineTracker:
    """The engine's running measurements for deadline planning (see the module docstring)."""

    def __init__(self, think_tokens: float | None = None, answer_tokens_think: float = DEFAULT_ANSWER_TOKENS,
                 answer_tokens_no_think: float = DEFAULT_ANSWER_TOKENS, source: str | None = None) -> None:
        self.steps: deque[float] = deque(maxlen=WINDOW)  # seconds per decode step, newest last
        self.closes: deque[float] = deque(maxlen=32)  # seconds of the budget's closing batch
        self.think_tokens = None if think_tokens is None else float(think_tokens)  # L; None: not known yet
        self.answer_tokens = {True: float(answer_tokens_think), False: float(answer_tokens_no_think)}
        self.answers: deque[int] = deque(maxlen=64)  # answer lengths after thinking, newest last
        self.n_think = 0
        self.n_answer = {True: 0, False: 0}
        self.prefill_ms: float | None = None  # moving average of prefill (+ decision) times
        self._live: tuple[float | None, float] | None = None  # must_close's (close s, answer tokens)
        self.prior_source = source or (f"defaults: answers {DEFAULT_ANSWER_TOKENS:.0f} tokens, reasoning "
                                       "unknown until a reply closes its own (the model has no eval results)")

    @classmethod
    def from_lengths(cls, lengths: "ReplyLengths | None") -> "DeadlineTracker":
        """A tracker whose priors are the model's own reply lengths (`model.reply_lengths`), or
        the defaults when the model has none."""
        if lengths is None:
            return cls()
        return cls(lengths.think_tokens, lengths.answer_tokens_think, lengths.answer_tokens_no_think,
                   f"the model's {lengths.source}")

    @property
    def lengths_source(self) -> str:
        """Where the lengths a plan uses now come from."""
        n = self.n_answer[True] + self.n_answer[False]
        return f"replies served ({n}; before them {self.prior_source})" if n else self.prior_source

    @staticmethod
    def _ema(old: float, new: float, n: int) -> float:
        return new if n == 0 else (1.0 - EMA) * old + EMA * new

    def observe_step(self, seconds: float) -> None:
        """One decode step (sample a token, file it, feed it): its time."""
        self.steps.append(seconds)

    def observe_close(self, seconds: float) -> None:
        """The budget's closing batch (closing line, `</think>`, separator): its time."""
        self.closes.append(seconds)
        self._live = None

    def observe_prefill(self, ms: float) -> None:
        """A reply's time from its start to the end of its prefill (and decision, if any)."""
        self.prefill_ms = ms if self.prefill_ms is None else (1.0 - EMA) * self.prefill_ms + EMA * ms

    def observe(self, thought: bool, think_tokens: int, closed_itself: bool, answer_tokens: int) -> None:
        """File one finished reply's token counts."""
        if thought and closed_itself and think_tokens > 0:
            old = self.think_tokens
            self.think_tokens = self._ema(0.0 if old is None else old, float(think_tokens),
                                          self.n_think if old is not None else 0)
            self.n_think += 1
        if answer_tokens > 0:
            self.answer_tokens[thought] = self._ema(self.answer_tokens[thought], float(answer_tokens),
                                                    self.n_answer[thought])
            self.n_answer[thought] += 1
            if thought:
                self.answers.append(answer_tokens)
            self._live = None

    def speed(self, fallback_s: float | None) -> tuple[float, str]:
        """Seconds per decode step to plan with (the median of recent steps), and its source."""
        if len(self.steps) >= MIN_STEPS:
            return float(statistics.median(self.steps)), f"measured decode (median of {len(self.steps)} steps)"
        if fallback_s is not None and fallback_s > 0:
            return fallback_s, "decision forward (no decode measured yet)"
        return 0.05, "default 20 tok/s (nothing measured yet)"

    def pace_decides(self, deadline_ms: float, elapsed_ms: float, p_think: float, slow_s: float, fast_s: float,
                     user_budget: int | None = None) -> bool:
        """Before `MIN_STEPS` decode steps are measured (a fresh process): would the plan think at
        the fast bound of a step's time (`fast_s`, after a probe at that pace) but not at the slow
        one (`slow_s`)? Then the pace decides, and the engine measures it first (the probe: see
        `Engine._probe_pace`). Otherwise the choice is the same at any pace between the bounds."""
        if len(self.steps) >= MIN_STEPS or not 0 < fast_s < slow_s:
            return False
        fast = self.plan(deadline_ms, elapsed_ms + PROBE_STEPS * fast_s * 1000.0, p_think, fast_s,
                         user_budget=user_budget)
        slow = self.plan(deadline_ms, elapsed_ms, p_think, slow_s, user_budget=user_budget)
        return fast.think != slow.think

    def conservative_step_s(self, spt: float) -> float:
        """The live check's pace: the QUANTILE of recent step times, at least `spt`."""
        if len(self.steps) >= MIN_STEPS:
            return max(spt, percentile(self.steps, QUANTILE))
        return spt

    def usual(self, user_budget: int | None = None) -> float | None:
        """L, the usual reasoning length (capped by the user's budget; the budget alone while no
        reply has been measured), or None when nothing says it yet."""
        if self.think_tokens is None:
            return None if user_budget is None else max(1.0, float(user_budget))
        return max(1.0, self.think_tokens if user_budget is None else min(self.think_tokens, user_budget))

    def plan_before_prefill(self, deadline_ms: float, user_budget: int | None = None) -> DeadlinePlan | None:
        """Auto mode, before the prefill: a no-think plan if the usual reasoning could not fit in
        `SAFETY * T` even with no time spent on the prefill and the decision (then `plan` would
        choose no-think whatever `p_think` is), else None (prefill, decide, then `plan`). None also
        while fewer than `MIN_STEPS` decode steps are measured."""
        if len(self.steps) < MIN_STEPS:
            return None
        spt, source = self.speed(None)
        L = self.usual(user_budget)
        close = max(self.closes) / spt if self.closes else CLOSE_COST_TOKENS
        budget = math.floor(SAFETY * deadline_ms / (spt * 1000.0) - self.answer_tokens[True] - close
                            - OPEN_COST_TOKENS)
        if user_budget is not None:
            budget = min(budget, int(user_budget))
        if budget >= (L if L is not None else EXPLORE_MIN_TOKENS):
            return None
        a_no = self.answer_tokens[False]
        prefill = self.prefill_ms or 0.0
        what = (f"the usual reasoning ({L:.0f} tokens)" if L is not None
                else f"{EXPLORE_MIN_TOKENS} tokens of reasoning (no reasoning length measured yet)")
        why = (f"decided before the prefill: even with no prefill {what} would not "
               f"fit (a budget of {max(budget, 0)}), so no-think without the decision forward (p_think not measured)")
        return DeadlinePlan(deadline_ms=float(deadline_ms), elapsed_ms=0.0, tok_s=1.0 / spt, tok_s_source=source,
                            think=False, max_think_tokens=None, expected_think_tokens=L or 0.0,
                            expected_answer_tokens=a_no, expected_accuracy={"no-think": None, "think": None},
                            expected_total_ms=prefill + a_no * spt * 1000.0, reason=why,
                            step_ms_conservative=self.conservative_step_s(spt) * 1000.0,
                            lengths_source=self.lengths_source)

    def plan(self, deadline_ms: float, elapsed_ms: float, p_think: float, fallback_s: float | None,
             allow: tuple[bool, ...] = (False, True), user_budget: int | None = None) -> DeadlinePlan:
        """Choose among `allow` (False = no-think, True = think) for a reply due at `deadline_ms`."""
        spt, source = self.speed(fallback_s)
        L = self.usual(user_budget)
        need = L if L is not None else EXPLORE_MIN_TOKENS  # the reasoning a think must have room for
        a_no, a_th = self.answer_tokens[False], self.answer_tokens[True]
        left_tokens = (SAFETY * deadline_ms - elapsed_ms) / (spt * 1000.0)
        acc_no = 1.0 - p_think
        close = max(self.closes) / spt if self.closes else CLOSE_COST_TOKENS  # in steps
        budget = math.floor(left_tokens - a_th - close - OPEN_COST_TOKENS)  # what fits in SAFETY * T
        # The budget handed to the reply (its cap) is what fits in the whole of T at the median pace:
        # the live check (`must_close`) closes the reasoning earlier if a slower pace needs it, so a
        # reasoning longer than the usual one is not cut while it can still finish in time.
        cap = math.floor((deadline_ms - elapsed_ms) / (spt * 1000.0) - a_th - close - OPEN_COST_TOKENS)
        if user_budget is not None:
            budget, cap = min(budget, int(user_budget)), min(cap, int(user_budget))
        think_fits = True in allow and budget >= 1
        # Reasoning cut short of its usual length is counted as no gain: on the bundled model 61 of 64
        # budget-cut replies of the deadline sweep were wrong, so a cut think is no better than no-think.
        acc_th = 1.0 - p_think * (1.0 if budget < need else 0.0) if think_fits else None
        no_fits = False in allow and a_no <= left_tokens
        ms = spt * 1000.0
        if think_fits and (False not in allow or acc_th - acc_no >= MIN_GAIN or not no_fits):
            think = True
            usual = f"expected reasoning {L:.0f}" if L is not None else "no reasoning length measured yet"
            why = (f"think fits with a budget of {budget} tokens ({usual}; cap {cap} at T, "
                   f"closed earlier live if the pace needs it): expected accuracy {acc_th:.3f}"
                   + (f" vs no-think {acc_no:.3f}" if False in allow else ""))
        elif False in allow:
            think = False
            if not no_fits:
                why = (f"nothing fits in {deadline_ms:.0f} ms ({elapsed_ms:.0f} ms spent, {1.0 / spt:.1f} tok/s): "
                       "no-think is the fastest")
            elif think_fits and budget < need:
                what = (f"the usual reasoning ({L:.0f} tokens)" if L is not None
                        else f"{EXPLORE_MIN_TOKENS} tokens of reasoning (no reasoning length measured yet)")
                why = (f"{what} does not fit (a budget of {budget}) and reasoning "
                       f"cut short is counted as no gain: no-think, expected accuracy {acc_no:.3f}")
            elif think_fits:
                why = (f"thinking would add {acc_th - acc_no:.3f} expected accuracy (< {MIN_GAIN}): "
                       f"no-think, expected accuracy {acc_no:.3f}")
            else:
                why = (f"no room to think ({left_tokens:.0f} tokens left, the answer after thinking needs "
                       f"{a_th + close + OPEN_COST_TOKENS:.0f}): no-think, expected accuracy "
                       f"{acc_no:.3f}")
        else:
            think = True
            budget = cap = max(0, budget)
            why = f"think forced, nothing fits: the smallest budget ({budget} tokens)"
        exp_answer = a_th if think else a_no
        exp_think = L if L is not None else (float(max(budget, 0)) if think else 0.0)
        total = elapsed_ms + ((min(budget, exp_think) + close + OPEN_COST_TOKENS if think else 0.0)
                              + exp_answer) * ms
        return DeadlinePlan(deadline_ms=float(deadline_ms), elapsed_ms=float(elapsed_ms), tok_s=1.0 / spt,
                            tok_s_source=source, think=think, max_think_tokens=int(max(cap, budget)) if think else None,
                            expected_think_tokens=exp_think, expected_answer_tokens=exp_answer,
                            expected_accuracy={"no-think": acc_no if False in allow else None, "think": acc_th},
                            expected_total_ms=total, reason=why,
                            step_ms_conservative=self.conservative_step_s(spt) * 1000.0,
                            lengths_source=self.lengths_source)

    def must_close(self, deadline_ms: float, elapsed_ms: float, s_per_step: float) -> bool:
        """During the reasoning: might one more token, the closing batch and the answer miss
        `LIVE_SAFETY * T` at `s_per_step` (the caller's conservative pace, see the module
        docstring)? The closing batch costs the slowest recently timed one (two steps before
        any), the answer the QUANTILE of recent answer lengths after thinking (the prior
        before any)."""
        if self._live is None:  # called every reasoning step: recomputed only when a reply is filed
            self._live = (max(self.closes) if self.closes else None,
                          percentile(self.answers, QUANTILE) if self.answers else self.answer_tokens[True])
        close_s, answer = self._live
        if close_s is None:
            close_s = CLOSE_COST_TOKENS * s_per_step
        need = ((1.0 + answer) * s_per_step + close_s) * 1000.0
        return elapsed_ms + need >= LIVE_SAFETY * deadline_ms


class DeadlineController:
    """Deadline mode over one reply, at its four points: `before_prefill` (auto mode may
    decide no-think there), the decision (`at_decision`, auto mode's planner; `after_decision`
    plans the budget of a forced mode and reports the plan in the `Decision`), `must_close`
    before each reasoning step and `after_step` after each timed step (the live pace).
    The `DeadlineTracker` it plans with is the engine's, which also times every reply."""

    def __init__(self, tracker: DeadlineTracker, deadline_ms: float, user_budget: int | None,
                 clock: Callable[[], float], c0: float) -> None:
        self.tracker, self.deadline_ms, self.user_budget, self.clock = tracker, deadline_ms, user_budget, clock
        self.c0 = c0  # engine clock at the start of the reply
        self.c_dec = c0  # engine clock at the start of the decision (`decision_starts`)
        self.plan: DeadlinePlan | None = None
        self.s_per_token = 0.0  # live decode pace: this reply's moving average of steps
        self.s_conservative = 0.0  # the plan's conservative pace (a quantile of recent steps)

    def _elapsed_ms(self, now: float) -> float:
        return (now - self.c0) * 1000.0

    def before_prefill(self) -> DeadlinePlan | None:
        """Auto mode: a no-think plan made before the prefill (`DeadlineTracker.plan_before_prefill`),
        or None (prefill, decide, then plan)."""
        self.plan = self.tracker.plan_before_prefill(self.deadline_ms, self.user_budget)
        return self.plan

    def decision_starts(self) -> None:
        self.c_dec = self.clock()

    def at_decision(self, p_think: float, fast_s: float,
                    probe: Callable[[Callable[[float], bool]], None]) -> bool:
        """Auto mode, right after the decision forward: plan, and say whether to think. `fast_s`:
        the least a step can take (the prefill's time per position). Where the pace decides
        (`DeadlineTracker.pace_decides`), `probe(worth)` times decode steps first."""
        t, budget = self.tracker, self.user_budget
        now = self.clock()
        if t.pace_decides(self.deadline_ms, self._elapsed_ms(now), p_think, now - self.c_dec, fast_s, budget):
            probe(lambda s: t.plan(self.deadline_ms, self._elapsed_ms(self.clock()), p_think, s,
                                   user_budget=budget).think)
            now = self.clock()
        self.plan = t.plan(self.deadline_ms, self._elapsed_ms(now), p_think, now - self.c_dec, user_budget=budget)
        return self.plan.think

    def after_decision(self, decision: "Decision", timed: bool) -> "Decision":
        """The reply's mode is settled: file the prefill's (and decision's) time, plan the budget
        of a mode the planner did not choose (forced, or set by the prompt: `timed` False when no
        decision forward ran) and return `decision` with the plan."""
        t = self.tracker
        t.observe_prefill(self._elapsed_ms(self.clock()))
        if self.plan is None:  # forced mode (or a prompt that set the phase): only the budget is planned
            now = self.clock()
            p = decision.p_think if decision.p_think is not None else float(decision.think)
            self.plan = t.plan(self.deadline_ms, self._elapsed_ms(now), p, (now - self.c_dec) if timed else None,
                               allow=(decision.think,), user_budget=self.user_budget)
        self.s_per_token = 1.0 / self.plan.tok_s
        self.s_conservative = self.plan.step_ms_conservative / 1000.0
        return dataclasses.replace(decision, deadline=self.plan)

    def think_budget(self) -> int | None:
        """The reasoning budget: the plan's when it thinks, else the user's."""
        return self.plan.max_think_tokens if self.plan.think else self.user_budget

    def must_close(self) -> bool:
        """Before a reasoning step: close the reasoning now (`DeadlineTracker.must_close`)?"""
        return self.tracker.must_close(self.deadline_ms, self._elapsed_ms(self.clock()),
                                       max(self.s_per_token, self.s_conservative))

    def after_step(self, dt: float) -> None:
        """A timed step of `dt` seconds: the live pace's moving average."""
        self.s_per_token = (1.0 - EMA) * self.s_per_token + EMA * dt
