"""The generation engine: think-or-not decision, budget, events, stats.

Three layers, each on top of the one below:
- `Engine.step(state)`: sample one token from the current logits, file it as
  reasoning or answer, feed it to the backend; returns the text events.
- `Engine.stream(...)`: prefill, decide, then step until done, yielding typed
  events (`Decision` first, deltas, `Done` last).
- `Engine.generate(...)`: the blocking call, which drains `stream`.

The engine sees only numpy logits through the `Backend` contract, so every
backend gets the same decision, budget and reasoning/answer split.

What a reply is (`model/reply.py`, docs/design.md "What the engine counts"): every token after
the prompt's `<think>`, forced or sampled, is one entry of `Result.token_ids`:
the think block (the mode's forced opening, the reasoning, the budget's
closing line), `</think>`, the answer and the end token. `max_tokens` bounds
`len(token_ids)`; `think_tokens + answer_tokens == len(token_ids)`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..backends.base import Backend
from ..errors import ContextLengthError, GenerationOptionError
from ..model.processing import PreparedImage
from ..model.reply import (
    ANSWER_SEPARATOR, EMPTY_THINK_CONTINUATION, IM_START, IMAGE_PLACEHOLDER, THINK_OPEN, THINK_TAGS, forced_opening,
)
from ..model.reply_lengths import ReplyLengths
from ..model.template import Message, phase_after, render_prompt, template_mode
from ..model.tokenizer import StreamDecoder
from .deadline import EMA as DEADLINE_EMA
from .deadline import PROBE_STEPS, DeadlinePlan, DeadlineTracker
from .events import AnswerDelta, Decision, Done, Event, ReasoningDelta, Result, Stats
from .logprobs import LogprobRecorder
from .memory import peak_rss_mb
from .options import DEFAULT_BUDGET_CLOSING, GenerationOptions, check_text
from .sampling import Sampler, token_logprobs
from .stop import StopFilter
from .text import TrimmedText

__all__ = ["DEFAULT_BUDGET_CLOSING", "Engine", "GenerationOptions"]


@dataclass
class _State:
    """Everything one reply carries between steps."""

    logits: np.ndarray
    phase: str
    thinks: bool
    chat: bool
    sampler: Sampler
    options: GenerationOptions
    n_ctx: int
    stats: Stats
    decoders: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    reply_ids: list[int] = field(default_factory=list)
    n_reasoning: int = 0  # reasoning tokens written before any budget close (the budget's count)
    done: bool = False
    finish_reason: str = ""
    first_answer_at: float | None = None
    first_token_at: float | None = None
    think_budget: int | None = None  # options' max_think_tokens, or the deadline plan's
    deadline_ms: float | None = None
    c0: float = 0.0  # engine clock at the start of the reply
    s_per_token: float = 0.0  # live decode pace (deadline mode): this reply's moving average of steps
    s_conservative: float = 0.0  # the plan's conservative pace (a quantile of recent steps)
    closed_itself: bool = False  # the model wrote `</think>` itself
    stop: StopFilter = field(default_factory=StopFilter)
    recorder: LogprobRecorder | None = None
    entries: dict = field(default_factory=lambda: {"reasoning": [], "answer": []})
    unsent: dict = field(default_factory=lambda: {"reasoning": [], "answer": []})


@dataclass(frozen=True)
class _Start:
    """Where a reply starts: the decision point (`mode` auto/think/no-think), or a
    prompt already past it (`mode` None, `phase` from the prompt's text).
    `chat`: the reply is an assistant turn, whose answer never holds a think
    tag; False for a raw completion (a prompt with no assistant header)."""

    mode: str | None
    phase: str = "reasoning"
    chat: bool = True


class Engine:
    """Runs R-4B's think-or-not decision and generation on any backend."""

    def __init__(self, backend: Backend, reply_lengths: ReplyLengths | None = None):
        """`reply_lengths`: the model's own mean reply lengths (`model.reply_lengths`), deadline
        mode's priors before this engine has served a reply; None: the defaults."""
        self.backend = backend
        self.tok = backend.tokenizer
        self._suffix_ids = self.tok.encode(EMPTY_THINK_CONTINUATION)
        # What each forced mode writes after the prompt's `<think>` (`reply` keys it by template name).
        self._opening = {m: self.tok.encode(forced_opening(template_mode(m))) for m in ("think", "no-think")}
        self._after_close = self.tok.encode(ANSWER_SEPARATOR)
        self._piece_len: dict[int, int] = {}  # the stream decoders' shared len(decode([id])) cache
        # Tokens `_accept` treats specially (end tokens, think tags): one set lookup per token.
        self._marked = frozenset(self.tok.eos_ids) | {self.tok.think, self.tok.end_think}
        self.clock: Callable[[], float] = time.perf_counter  # deadline mode's clock (tests inject one)
        self.deadline = DeadlineTracker.from_lengths(reply_lengths)

    # ---- prompt ---------------------------------------------------------
    def _segments(self, prompt: str, images: Sequence[PreparedImage]) -> list:
        parts = prompt.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(images):
            raise GenerationOptionError(
                f"the prompt has {len(parts) - 1} image placeholders but {len(images)} images were given"
            )
        segs: list = []
        for i, text in enumerate(parts):
            if text:
                segs.append(self.tok.encode(text))
            if i < len(images):
                segs.append(images[i])
        return segs

    def _check_context(self, segs: list, reserve: int) -> None:
        """The prompt plus `reserve` positions (the think block's opening and
        one reply token) must fit the context, or nothing is generated."""
        n_img = sum(self.backend.image_token_count(s) for s in segs if isinstance(s, PreparedImage))
        n_txt = sum(len(s) for s in segs if not isinstance(s, PreparedImage))
        n_ctx = self.backend.n_ctx
        if n_img + n_txt + reserve > n_ctx:
            raise ContextLengthError(
                f"the prompt needs {n_txt} text + {n_img} image = {n_txt + n_img} tokens, plus {reserve} for "
                f"the reply to start, but the model's context is {n_ctx} tokens: shorten the conversation "
                "or use a smaller image"
            )

    def _probe_pace(self, worth: Callable[[float], bool]) -> None:
        """Deadline mode in a fresh engine (`DeadlineTracker.pace_decides`): time up to
        `PROBE_STEPS` single-token decode steps at the current position, then roll them back
        (their logits are not used). `worth(s)`: would thinking still fit at `s` seconds a step?
        From the second step on, the probe stops as soon as it would not at the median of the
        probe's steps (one slow step alone does not stop it)."""
        be = self.backend
        n0 = be.n_past
        if be.n_ctx - n0 < PROBE_STEPS:
            return
        probe: list[float] = []
        for _ in range(PROBE_STEPS):
            c = self.clock()
            be.forward_last(self._suffix_ids[-1:])
            probe.append(self.clock() - c)
            self.deadline.observe_step(probe[-1])
            if len(probe) >= 2 and not worth(statistics.median(probe)):
                break
        be.truncate(n0)

    # ---- decision --------------------------------------------------------
    def _decide(self, logits: np.ndarray, mode: str, opts: GenerationOptions, sampler: Sampler,
                choose: Callable[[float], bool] | None = None,
                ) -> tuple[Decision, np.ndarray, list[int], bool, np.ndarray | None]:
        """At a prompt ending in `<think>`: teacher-force the empty-think
        continuation to get p_think, then settle the mode. Returns the decision,
        the logits to continue from, the reply tokens it produced, whether the
        last of them is still to be fed to the backend, and the logits the
        model's own sampled choice drew them from (None when forced).
        `choose(p_think) -> think`: deadline mode's planner (auto mode)."""
        be, sfx = self.backend, self._suffix_ids
        n0 = be.n_past
        sfx_logits = be.forward(sfx)
        rows = np.vstack([logits[None, :], sfx_logits[:-1]])
        lp = token_logprobs(rows, sfx)
        p_think = float(min(1.0, max(0.0, 1.0 - math.exp(float(lp.sum())))))

        if mode == "auto" and opts.think_threshold is None and choose is None:
            for i, want in enumerate(sfx):  # the model's own sampled choice
                got = sampler(rows[i])
                if got != want:
                    be.truncate(n0 + i)
                    return Decision(True, p_think, False), rows[i], list(sfx[:i]) + [got], True, rows[:i + 1]
            return Decision(False, p_think, False), sfx_logits[-1], list(sfx), False, None

        if mode != "auto":
            think = mode == "think"
        elif choose is not None:
            think = choose(p_think)
        else:
            think = p_think >= float(opts.think_threshold)
        if not think:
            return Decision(False, p_think, True), sfx_logits[-1], list(sfx), False, None
        be.truncate(n0)
        opening = self._opening["think"]
        return Decision(True, p_think, True), be.forward_last(opening), list(opening), False, None

    # ---- step ------------------------------------------------------------
    def _emit(self, st: _State, phase: str, token_ids: Sequence[int], row: np.ndarray | None = None) -> list[Event]:
        """Text of `token_ids`. `row`: the logits the (single) token was sampled
        from, for its logprob entry; forced tokens have none. The answer's text
        passes the stop filter, which also ends it at a think tag written as text."""
        if row is not None and st.recorder is not None:
            e = st.recorder.entry(row, token_ids[0])
            st.entries[phase].append(e)
            st.unsent[phase].append(e)
        events: list[Event] = []
        dec = st.decoders[phase]
        for t in token_ids:
            piece = dec.push(t)
            if piece and phase == "answer":
                piece = st.stop.push(piece)
                if st.stop.hit is not None:
                    st.done, st.finish_reason = True, "stop"
            if piece:
                events.extend(self._delta(st, phase, st.texts[phase].push(piece)))
        return events

    def _delta(self, st: _State, phase: str, text: str) -> list[Event]:
        """A delta event for `text` (none if empty), carrying the entries not sent yet."""
        if not text:
            return []
        unsent = st.unsent[phase]
        lps = tuple(unsent) if unsent else ()
        unsent.clear()
        return [ReasoningDelta(text, lps) if phase == "reasoning" else AnswerDelta(text, lps)]

    def _count(self, st: _State, t: int) -> None:
        """File token `t` in the reply and its stats (see the module docstring)."""
        st.reply_ids.append(t)
        if st.thinks and st.phase == "reasoning":
            st.stats.think_tokens += 1  # the think block up to and including `</think>`
        else:
            st.stats.answer_tokens += 1

    def _close_reasoning(self, st: _State) -> list[Event]:
        """Budget reached: write the closing line, `</think>` and the separator,
        all of it or none: if it does not fit `max_tokens` or the context, the
        reply ends here with finish_reason "length"."""
        closing = self.tok.encode(st.options.budget_closing) if st.options.budget_closing else []
        ids = closing + [self.tok.end_think] + self._after_close
        room = min(st.options.max_tokens - len(st.reply_ids), st.n_ctx - self.backend.n_past)
        st.stats.budget_hit = True
        if len(ids) > room:
            st.done, st.finish_reason = True, "length"
            return []
        events = self._emit(st, "reasoning", closing)
        for t in closing + [self.tok.end_think]:
            self._count(st, t)
        st.phase = "answer"
        for t in self._after_close:
            self._count(st, t)
        c = self.clock()
        st.logits = self.backend.forward_last(ids)
        self.deadline.observe_close(self.clock() - c)  # one batch: timed as a whole, not per token
        self._check_room(st)
        return events

    def _accept(self, st: _State, t: int, timed: bool = True, row: np.ndarray | None = None) -> list[Event]:
        """File a reply token (sampled, or forced when `timed` is False; `row`:
        the logits it was drawn from). The caller feeds it to the backend if the
        reply goes on."""
        if timed and st.first_token_at is None:
            st.first_token_at = time.perf_counter()
        self._count(st, t)
        if t in self._marked:  # an end token or a think tag
            tok = self.tok
            if t in tok.eos_ids or (st.chat and st.phase == "answer"):
                # A think tag in the answer ends the reply; the tag is not answer text.
                st.done, st.finish_reason = True, "stop"
                return []
            if st.phase == "reasoning" and t == tok.end_think:
                st.phase = "answer"
                st.closed_itself = timed
                self._check_room(st)
                return []
        if st.phase == "reasoning":
            st.n_reasoning += 1
        elif timed and st.first_answer_at is None:
            st.first_answer_at = time.perf_counter()
        events = self._emit(st, st.phase, (t,), row)
        if not st.done:
            self._check_room(st)
        return events

    def _check_room(self, st: _State) -> None:
        """Stop with "length" when the reply is at `max_tokens` or the context is full."""
        if len(st.reply_ids) >= st.options.max_tokens or self.backend.n_past >= st.n_ctx:
            st.done, st.finish_reason = True, "length"

    def step(self, st: _State) -> list[Event]:
        """Sample one token and advance the reply; returns its text events. Each step that
        feeds a token is timed for deadline mode's pace (`DeadlineTracker.observe_step`)."""
        if st.phase == "reasoning" and st.thinks and (
                (st.think_budget is not None and st.n_reasoning >= st.think_budget)
                or (st.deadline_ms is not None and self.deadline.must_close(
                    st.deadline_ms, (self.clock() - st.c0) * 1000.0, max(st.s_per_token, st.s_conservative)))):
            return self._close_reasoning(st)
        c = self.clock()
        t = st.sampler(st.logits)
        events = self._accept(st, t, row=st.logits)
        if not st.done:
            st.logits = self.backend.forward_last([t])
            dt = self.clock() - c
            self.deadline.observe_step(dt)
            if st.deadline_ms is not None:  # live pace: a moving average of this reply's steps
                st.s_per_token = (1.0 - DEADLINE_EMA) * st.s_per_token + DEADLINE_EMA * dt
        return events

    # ---- stream / generate -----------------------------------------------
    def stream(self, messages: Sequence[Message], images: Sequence[PreparedImage],
               options: GenerationOptions | None = None, system: str | None = None) -> Iterator[Event]:
        """Check the options and texts (raises here, not at the first event),
        render the conversation up to its `<think>` and stream the reply in the
        options' mode."""
        opts = (options or GenerationOptions()).validate()
        for i, m in enumerate(messages):
            check_text(f"message {i} ({getattr(m, 'role', '?')}) content", getattr(m, "content", None))
        if system is not None:
            check_text("system", system)
        prompt = render_prompt(messages, "auto", system=system)  # ends at the decision point
        return self._stream(prompt, images, opts, _Start(opts.mode))

    def stream_prompt(self, prompt: str, images: Sequence[PreparedImage],
                      options: GenerationOptions | None = None) -> Iterator[Event]:
        """Stream a reply to an already rendered prompt.

        Precedence: a prompt that ends in `<think>` is at the decision point and
        `options.mode` applies. A prompt past it (inside an open think block,
        or after `</think>`) continues as its text says; `mode` must then be
        `auto` or agree with it, or GenerationOptionError is raised."""
        opts = (options or GenerationOptions()).validate()
        check_text("prompt", prompt)
        mode = opts.mode
        if prompt.endswith(THINK_OPEN):
            return self._stream(prompt, images, opts, _Start(mode))
        phase = phase_after(prompt)
        if mode != "auto" and mode != ("think" if phase == "reasoning" else "no-think"):
            where = "inside an open think block" if phase == "reasoning" else "outside a think block"
            raise GenerationOptionError(
                f"mode {opts.mode!r} contradicts the prompt, which ends {where}: pass mode='auto', "
                f"or end the prompt with {THINK_OPEN!r} to let the mode decide")
        if opts.measure_p_think:
            raise GenerationOptionError(
                f"measure_p_think needs a prompt that ends in {THINK_OPEN!r} (the decision point)")
        return self._stream(prompt, images, opts, _Start(None, phase, chat=f"{IM_START}assistant" in prompt))

    def _stream(self, prompt: str, images: Sequence[PreparedImage], opts: GenerationOptions,
                start: _Start) -> Iterator[Event]:
        t0 = time.perf_counter()
        segs = self._segments(prompt, images)
        # Forced modes prefill their opening with the prompt and skip the decision forward, unless
        # p_think is asked for or deadline mode plans with it (and times that forward).
        preset = start.mode in ("think", "no-think") and not opts.measure_p_think and opts.deadline_ms is None
        self._check_context(segs, 1 if start.mode is None else len(self._suffix_ids) + 1)
        c0 = self.clock()
        early = None  # deadline mode, auto: no-think decided before the prefill (see engine.deadline)
        if opts.deadline_ms is not None and start.mode == "auto" and not opts.measure_p_think:
            early = self.deadline.plan_before_prefill(opts.deadline_ms, opts.max_think_tokens)
            if early is not None:
                start, preset = dataclasses.replace(start, mode="no-think"), True
        if preset:
            segs.append(self._opening[start.mode])
        return self._generate(segs, opts, start, preset, t0, c0, early)

    def _generate(self, segs: list, opts: GenerationOptions, start: _Start, preset: bool,
                  t0: float, c0: float, early: DeadlinePlan | None = None) -> Iterator[Event]:
        be = self.backend
        stats = Stats(backend=be.name, device=be.device)
        logits = be.prefill(segs)
        tm = be.timings
        stats.image_tokens, stats.vision_encode_ms, stats.prefill_ms = tm.image_tokens, tm.vision_encode_ms, tm.prefill_ms
        sampler = Sampler(opts.sampling)
        n_prompt = be.n_past
        t_dec, c_dec = time.perf_counter(), self.clock()
        plan: list[DeadlinePlan] = [early] if early is not None else []

        def choose(p_think: float) -> bool:  # deadline mode, auto: right after the decision forward
            now = self.clock()
            fast = tm.prefill_ms / 1000.0 / max(1, n_prompt)  # a step takes between this and the decision's time
            if self.deadline.pace_decides(opts.deadline_ms, (now - c0) * 1000.0, p_think, now - c_dec, fast,
                                          opts.max_think_tokens):
                self._probe_pace(lambda s: self.deadline.plan(opts.deadline_ms, (self.clock() - c0) * 1000.0, p_think,
                                                              s, user_budget=opts.max_think_tokens).think)
                now = self.clock()
            plan.append(self.deadline.plan(opts.deadline_ms, (now - c0) * 1000.0, p_think, now - c_dec,
                                           user_budget=opts.max_think_tokens))
            return plan[0].think

        chooser = choose if opts.deadline_ms is not None else None
        pending = False  # whether the last drawn token still has to be fed to the backend
        drawn_rows = None
        if start.mode is None:
            decision, drawn, phase = Decision(start.phase == "reasoning", None, True), [], start.phase
        elif preset:
            opening = self._opening[start.mode]
            decision, drawn, phase = Decision(start.mode == "think", None, True), list(opening), "reasoning"
        else:
            decision, logits, drawn, pending, drawn_rows = self._decide(logits, start.mode, opts, sampler, chooser)
            phase = "reasoning"
        stats.decision_ms = (time.perf_counter() - t_dec) * 1000.0
        if opts.deadline_ms is not None:
            self.deadline.observe_prefill((self.clock() - c0) * 1000.0)
            if not plan:  # forced mode (or a prompt that set the phase): only the budget is planned
                now = self.clock()
                p = decision.p_think if decision.p_think is not None else float(decision.think)
                plan.append(self.deadline.plan(opts.deadline_ms, (now - c0) * 1000.0, p,
                                               (now - c_dec) if start.mode is not None else None,
                                               allow=(decision.think,), user_budget=opts.max_think_tokens))
            decision = dataclasses.replace(decision, deadline=plan[0])
        n_forced = len(drawn) - int(pending)  # already in the cache
        stats.prompt_tokens = be.n_past - n_forced
        st = _State(logits=logits, phase=phase, thinks=decision.think, chat=start.chat, sampler=sampler, options=opts,
                    n_ctx=be.n_ctx, stats=stats)
        st.decoders = {p: StreamDecoder(self.tok, piece_len=self._piece_len)
                       for p in ("reasoning", "answer")}
        st.texts = {"reasoning": TrimmedText(), "answer": TrimmedText()}
        st.stop = StopFilter(tuple(opts.stop) + (THINK_TAGS if start.chat else ()))  # no think tag in an answer
        st.recorder = LogprobRecorder(self.tok, opts.top_logprobs) if opts.logprobs else None
        st.think_budget = plan[0].max_think_tokens if plan and plan[0].think else opts.max_think_tokens
        if plan:
            st.deadline_ms, st.c0, st.s_per_token = opts.deadline_ms, c0, 1.0 / plan[0].tok_s
            st.s_conservative = plan[0].step_ms_conservative / 1000.0
        yield decision
        budget = st.think_budget
        if decision.think and pending and budget is not None and len(drawn) > budget:
            # The decision drew more reasoning than the budget allows: keep the
            # first `budget` tokens (all already in the cache), drop the rest.
            be.truncate(be.n_past - (n_forced - budget))
            drawn, pending = drawn[:budget], False
        for i, t in enumerate(drawn):  # tokens the decision or the mode produced: filed like any other
            sampled = pending and i == len(drawn) - 1
            yield from self._accept(st, t, timed=sampled or (decision.think and not decision.forced),
                                    row=drawn_rows[i] if drawn_rows is not None else None)
            if st.done:
                break
        if pending and not st.done:
            st.logits = be.forward_last(drawn[-1:])
        t_loop = time.perf_counter()
        n_loop0 = len(st.reply_ids)
        while not st.done:
            yield from self.step(st)
        t_end = time.perf_counter()
        self.deadline.observe(decision.think, st.n_reasoning, st.closed_itself, st.stats.answer_tokens)
        yield from self._flush(st)
        stats.finish_reason = st.finish_reason
        stats.ttft_ms = ((st.first_token_at or t_end) - t0) * 1000.0
        stats.time_to_answer_ms = ((st.first_answer_at or t_end) - t0) * 1000.0
        stats.decode_tokens = len(st.reply_ids) - n_loop0
        stats.decode_ms = (t_end - t_loop) * 1000.0
        stats.decode_tps = stats.decode_tokens / (t_end - t_loop) if t_end > t_loop and stats.decode_tokens else 0.0
        stats.total_ms = (t_end - t0) * 1000.0
        stats.peak_rss_mb = peak_rss_mb()
        reasoning, answer = st.texts["reasoning"].text, st.texts["answer"].text
        result = Result(answer=answer, reasoning=reasoning, thought=decision.think, p_think=decision.p_think,
                        mode=opts.mode, forced=decision.forced, stats=stats, token_ids=st.reply_ids,
                        stop_sequence=st.stop.hit if st.stop.hit in opts.stop else None)
        if opts.logprobs:
            result.logprobs, result.reasoning_logprobs = st.entries["answer"], st.entries["reasoning"]
        yield Done(result)

    def _flush(self, st: _State) -> Iterator[Event]:
        """The text the decoders and the answer's stop filter still hold."""
        for p in ("reasoning", "answer"):
            rest = st.decoders[p].flush()
            if p == "answer":  # the stop filter's held tail is answer text after all
                rest = st.stop.push(rest) + st.stop.flush()
            if rest:
                yield from self._delta(st, p, st.texts[p].push(rest))

    def generate(self, messages: Sequence[Message], images: Sequence[PreparedImage],
                 options: GenerationOptions | None = None, system: str | None = None) -> Result:
        """Blocking call: drain `stream` and return its result."""
        return _drain(self.stream(messages, images, options, system))

    def generate_prompt(self, prompt: str, images: Sequence[PreparedImage],
                        options: GenerationOptions | None = None) -> Result:
        return _drain(self.stream_prompt(prompt, images, options))


def _drain(events: Iterator[Event]) -> Result:
    for ev in events:
        if isinstance(ev, Done):
            return ev.result
    raise RuntimeError("generation stream ended without a Done event")  # pragma: no cover
