"""The generation engine: think-or-not decision, budget, events, stats.

Three layers, each on top of the one below:
- `Engine.step(state)`: sample one token from the current logits, file it as
  reasoning or answer, feed it to the backend; returns the text events.
- `Engine.stream(...)`: prefill (reusing the prefix already in the backend's cache,
  yielding `Progress`), decide, then step until done, yielding typed events
  (`Progress` while the prompt is read, `Decision`, deltas, `Done` last).
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
from ..errors import ContextLengthError, GenerationOptionError, context_fixes
from ..model.processing import PreparedImage
from ..model.reply import (
    ANSWER_SEPARATOR, EMPTY_THINK_CONTINUATION, IM_START, IMAGE_PLACEHOLDER, THINK_OPEN, THINK_TAGS, forced_opening,
)
from ..model.reply_lengths import ReplyLengths
from ..model.template import Message, phase_after, render_prompt, template_mode
from .deadline import PROBE_STEPS, DeadlineController, DeadlineTracker
from .events import Decision, Done, Event, Result, Stats
from .logprobs import LogprobRecorder
from .memory import peak_rss_mb
from .options import DEFAULT_BUDGET_CLOSING, GenerationOptions, check_text
from .sampling import Sampler, token_logprobs
from .text import ReplyText

__all__ = ["DEFAULT_BUDGET_CLOSING", "Engine", "GenerationOptions"]


@dataclass
class _State:
    """What the loop carries between steps: ids, phase, counters. The text side is
    `text` (`ReplyText`), deadline mode's bookkeeping `deadline` (`DeadlineController`)."""

    logits: np.ndarray
    phase: str
    thinks: bool
    chat: bool
    sampler: Sampler
    options: GenerationOptions
    n_ctx: int
    stats: Stats
    text: ReplyText
    think_budget: int | None = None  # options' max_think_tokens, or the deadline plan's
    deadline: DeadlineController | None = None  # deadline mode
    reply_ids: list[int] = field(default_factory=list)
    n_reasoning: int = 0  # reasoning tokens written before any budget close (the budget's count)
    done: bool = False
    finish_reason: str = ""
    first_answer_at: float | None = None
    first_token_at: float | None = None
    closed_itself: bool = False  # the model wrote `</think>` itself


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
        #: a prompt keeps the longest prefix it shares with the backend's cache (an earlier turn's),
        #: evaluating only the positions after it; False: every prompt from an empty cache
        self.prefix_reuse = True
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
        images = [s for s in segs if isinstance(s, PreparedImage)]
        n_img = sum(self.backend.image_token_count(s) for s in images)
        n_txt = sum(len(s) for s in segs if not isinstance(s, PreparedImage))
        n_ctx = self.backend.n_ctx
        if n_img + n_txt + reserve > n_ctx:
            cfg = self.backend.config
            fixes = context_fixes(n_img + n_txt + reserve, n_ctx, cfg.max_position_embeddings, n_txt + reserve,
                                  len(images), n_img, getattr(cfg, "tokens_per_view", 1))
            raise ContextLengthError(
                f"the prompt needs {n_txt} text + {n_img} image = {n_txt + n_img} tokens, plus {reserve} for "
                f"the reply to start, but the context is {n_ctx} tokens: {fixes}"
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
        events = st.text.push("reasoning", closing)
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
                # A think tag in the answer ends the reply; the tag is not answer text. An end
                # token inside the think block ends it too, without an answer: said so.
                inside = st.thinks and st.phase == "reasoning"
                st.done, st.finish_reason = True, "stop_in_reasoning" if inside else "stop"
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
        events = st.text.push(st.phase, (t,), row)
        if st.text.stop.hit is not None:  # the answer reached a stop string
            st.done, st.finish_reason = True, "stop"
        else:
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
                or (st.deadline is not None and st.deadline.must_close())):
            return self._close_reasoning(st)
        c = self.clock()
        t = st.sampler(st.logits)
        events = self._accept(st, t, row=st.logits)
        if not st.done:
            st.logits = self.backend.forward_last([t])
            dt = self.clock() - c
            self.deadline.observe_step(dt)
            if st.deadline is not None:  # live pace: a moving average of this reply's steps
                st.deadline.after_step(dt)
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
        dl = None
        if opts.deadline_ms is not None:
            dl = DeadlineController(self.deadline, opts.deadline_ms, opts.max_think_tokens, self.clock, self.clock())
            # auto: no-think may be decided before the prefill (see engine.deadline)
            if start.mode == "auto" and not opts.measure_p_think and dl.before_prefill() is not None:
                start, preset = dataclasses.replace(start, mode="no-think"), True
        if preset:
            segs.append(self._opening[start.mode])
        return self._generate(segs, opts, start, preset, t0, dl)

    def _settle(self, logits: np.ndarray, start: _Start, preset: bool, opts: GenerationOptions, sampler: Sampler,
                dl: DeadlineController | None) -> tuple[Decision, np.ndarray, list[int], bool, np.ndarray | None, str]:
        """The reply's mode, from the prompt's text, the forced mode or the decision (`_decide`'s
        returns, and the phase the reply starts in)."""
        if start.mode is None:
            return Decision(start.phase == "reasoning", None, True), logits, [], False, None, start.phase
        if preset:
            opening = list(self._opening[start.mode])
            return Decision(start.mode == "think", None, True), logits, opening, False, None, "reasoning"
        chooser = None
        if dl is not None:  # deadline mode, auto: the planner, right after the decision forward
            tm = self.backend.timings
            chooser = lambda p: dl.at_decision(  # noqa: E731 (a step takes between `fast` and the decision's time)
                p, tm.prefill_ms / 1000.0 / max(1, tm.positions_evaluated), self._probe_pace)
        return (*self._decide(logits, start.mode, opts, sampler, chooser), "reasoning")

    def _generate(self, segs: list, opts: GenerationOptions, start: _Start, preset: bool,
                  t0: float, dl: DeadlineController | None) -> Iterator[Event]:
        be = self.backend
        stats = Stats(backend=be.name, device=be.device)
        logits = yield from be.prefill_steps(segs, reuse=self.prefix_reuse)  # yields Progress
        tm = be.timings
        stats.image_tokens, stats.vision_encode_ms, stats.prefill_ms = tm.image_tokens, tm.vision_encode_ms, tm.prefill_ms
        stats.positions_evaluated, stats.positions_reused = tm.positions_evaluated, tm.positions_reused
        sampler = Sampler(opts.sampling)
        t_dec = time.perf_counter()
        if dl is not None:
            dl.decision_starts()
        decision, logits, drawn, pending, drawn_rows, phase = self._settle(logits, start, preset, opts, sampler, dl)
        stats.decision_ms = (time.perf_counter() - t_dec) * 1000.0
        if dl is not None:
            decision = dl.after_decision(decision, timed=start.mode is not None)
        n_forced = len(drawn) - int(pending)  # already in the cache
        stats.prompt_tokens = be.n_past - n_forced
        stops = tuple(opts.stop) + (THINK_TAGS if start.chat else ())  # no think tag in an answer
        text = ReplyText(self.tok, self._piece_len, stops,
                         LogprobRecorder(self.tok, opts.top_logprobs) if opts.logprobs else None)
        budget = dl.think_budget() if dl is not None else opts.max_think_tokens
        st = _State(logits=logits, phase=phase, thinks=decision.think, chat=start.chat, sampler=sampler, options=opts,
                    n_ctx=be.n_ctx, stats=stats, text=text, think_budget=budget, deadline=dl)
        yield decision
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
        yield from text.flush()
        yield Done(self._result(st, decision, t0, t_loop, t_end, n_loop0))

    def _result(self, st: _State, decision: Decision, t0: float, t_loop: float, t_end: float,
                n_loop0: int) -> Result:
        """The finished reply: its stats' times and counts, texts, ids and logprobs."""
        stats, opts, text = st.stats, st.options, st.text
        stats.finish_reason = st.finish_reason
        stats.ttft_ms = ((st.first_token_at or t_end) - t0) * 1000.0
        stats.time_to_answer_ms = ((st.first_answer_at or t_end) - t0) * 1000.0
        stats.decode_tokens = len(st.reply_ids) - n_loop0
        stats.decode_ms = (t_end - t_loop) * 1000.0
        stats.decode_tps = stats.decode_tokens / (t_end - t_loop) if t_end > t_loop and stats.decode_tokens else 0.0
        stats.total_ms = (t_end - t0) * 1000.0
        stats.peak_rss_mb = peak_rss_mb()
        hit = text.stop.hit
        result = Result(answer=text.texts["answer"].text, reasoning=text.texts["reasoning"].text,
                        thought=decision.think, p_think=decision.p_think, mode=opts.mode, forced=decision.forced,
                        stats=stats, token_ids=st.reply_ids, stop_sequence=hit if hit in opts.stop else None)
        if opts.logprobs:
            result.logprobs, result.reasoning_logprobs = text.entries["answer"], text.entries["reasoning"]
        return result

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
