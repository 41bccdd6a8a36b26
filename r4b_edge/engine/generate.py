"""The generation engine: think-or-not decision, budget, events, stats.

Three layers, each on top of the one below:
- `Engine.step(state)`: sample one token from the current logits, file it as
  reasoning or answer, feed it to the backend; returns the text events.
- `Engine.stream(...)`: prefill, decide, then step until done, yielding typed
  events (`Decision` first, deltas, `Done` last).
- `Engine.generate(...)`: the blocking call, which drains `stream`.

The engine sees only numpy logits through the `Backend` contract, so every
backend gets the same decision, budget and reasoning/answer split.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..backends.base import Backend
from ..errors import ContextLengthError, GenerationOptionError
from ..model.processing import PreparedImage
from ..model.template import (
    EMPTY_THINK_CONTINUATION, IMAGE_PLACEHOLDER, MODE_SUFFIX, Message, phase_after,
    render_prompt, template_mode,
)
from ..model.tokenizer import StreamDecoder
from .deadline import DeadlinePlan, DeadlineTracker
from .events import AnswerDelta, Decision, Done, Event, ReasoningDelta, Result, Stats
from .logprobs import LogprobRecorder, check_top_logprobs
from .memory import peak_rss_mb
from .sampling import Sampler, SamplingParams, token_logprobs
from .stop import StopFilter, normalize_stop

DEFAULT_BUDGET_CLOSING = "\n\nThe thinking budget is used up, so I answer now.\n"


@dataclass
class GenerationOptions:
    """How to reply. `mode`: auto | think | no-think. `think_threshold`: think
    iff p_think >= threshold (auto mode only). `max_think_tokens`: close the
    reasoning at this many tokens. `max_tokens`: bound on the whole reply.
    `deadline_ms`: a latency budget for the whole reply; in auto mode it picks
    no-think or think with a fitting reasoning budget (`engine.deadline`)."""

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

    def validate(self) -> "GenerationOptions":
        template_mode(self.mode)
        t = self.think_threshold
        if t is not None and (not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0):
            raise GenerationOptionError(f"think_threshold must be within [0, 1], got {t!r}")
        if self.max_think_tokens is not None and self.max_think_tokens < 0:
            raise GenerationOptionError(f"max_think_tokens must be >= 0, got {self.max_think_tokens}")
        if self.max_tokens < 1:
            raise GenerationOptionError(f"max_tokens must be >= 1, got {self.max_tokens}")
        d = self.deadline_ms
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d)
                              or d <= 0):
            raise GenerationOptionError(f"deadline_ms must be a positive number of milliseconds, got {d!r}")
        self.sampling.validate()
        self.stop = normalize_stop(self.stop)
        check_top_logprobs(self.logprobs, self.top_logprobs)
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed)


class _TrimmedText:
    """Streams text with leading and trailing whitespace held back, so the
    concatenated deltas equal the final `.strip()`ped text."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""
        self.parts: list[str] = []

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = self.pending + text
        stripped = body.rstrip()
        self.pending = body[len(stripped):]
        self.parts.append(stripped)
        return stripped

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class _State:
    """Everything one reply carries between steps."""

    logits: np.ndarray
    phase: str
    sampler: Sampler
    options: GenerationOptions
    n_ctx: int
    t0: float
    stats: Stats
    decoders: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    reply_ids: list[int] = field(default_factory=list)
    n_reply: int = 0
    done: bool = False
    finish_reason: str = ""
    first_answer_at: float | None = None
    first_token_at: float | None = None
    stop: StopFilter = field(default_factory=StopFilter)
    recorder: LogprobRecorder | None = None
    entries: dict = field(default_factory=lambda: {"reasoning": [], "answer": []})
    unsent: dict = field(default_factory=lambda: {"reasoning": [], "answer": []})
    think_budget: int | None = None  # options' max_think_tokens, or the deadline plan's
    deadline_ms: float | None = None
    c0: float = 0.0  # engine clock at the start of the reply
    s_per_token: float = 0.0  # live decode speed (deadline mode)
    closed_itself: bool = False  # the model wrote `</think>` itself


class Engine:
    """Runs R-4B's think-or-not decision and generation on any backend."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.clock: Callable[[], float] = time.perf_counter  # deadline mode's clock (tests inject one)
        self.deadline = DeadlineTracker()
        self.tok = backend.tokenizer
        self._suffix_ids = self.tok.encode(EMPTY_THINK_CONTINUATION)
        self._long_rest = self.tok.encode(MODE_SUFFIX["long"][len("<think>"):])
        self._after_close = self.tok.encode("\n\n")

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

    def _check_context(self, segs: list) -> tuple[int, int]:
        n_img = sum(self.backend.image_token_count(s) for s in segs if isinstance(s, PreparedImage))
        n_txt = sum(len(s) for s in segs if not isinstance(s, PreparedImage))
        n_ctx = self.backend.n_ctx
        if n_img + n_txt + 1 > n_ctx:
            raise ContextLengthError(
                f"the prompt needs {n_txt} text + {n_img} image = {n_txt + n_img} tokens but the "
                f"model's context is {n_ctx} tokens: shorten the conversation or use a smaller image"
            )
        return n_txt, n_img

    # ---- decision --------------------------------------------------------
    def _decide(self, logits: np.ndarray, mode: str, opts: GenerationOptions, sampler: Sampler,
                choose: Callable[[float], bool] | None = None,
                ) -> tuple[Decision, np.ndarray, list[int], str, np.ndarray | None]:
        """At a prompt ending in `<think>`: teacher-force the empty-think
        continuation to get p_think, then settle the mode. Returns the decision,
        the logits to continue from, reply tokens already in the cache, the
        phase to continue in, and the logits each of those tokens was drawn from.
        `choose(p_think) -> think`: deadline mode's planner (auto mode)."""
        be, sfx = self.backend, self._suffix_ids
        n0 = be.n_past
        sfx_logits = be.forward(sfx)
        rows = np.vstack([logits[None, :], sfx_logits[:-1]])
        lp = token_logprobs(rows, sfx)
        p_think = float(min(1.0, max(0.0, 1.0 - math.exp(float(lp.sum())))))

        if mode == "auto" and choose is not None:
            think, forced = choose(p_think), True
            if not think:
                return Decision(False, p_think, forced), sfx_logits[-1], [], "answer", None
            be.truncate(n0)
            return Decision(True, p_think, forced), be.forward_last(self._long_rest), [], "reasoning", None
        if mode == "auto" and opts.think_threshold is None:
            for i, want in enumerate(sfx):  # the model's own sampled choice
                got = sampler(rows[i])
                if got != want:
                    be.truncate(n0 + i)
                    drawn = list(sfx[:i]) + [got]
                    return Decision(True, p_think, False), rows[i], drawn, "reasoning", rows[:i + 1]
            return Decision(False, p_think, False), sfx_logits[-1], [], "answer", None

        if mode == "auto":
            think, forced = p_think >= float(opts.think_threshold), True
        else:
            think, forced = mode == "long", True
        if not think:
            return Decision(False, p_think, forced), sfx_logits[-1], [], "answer", None
        be.truncate(n0)
        out = be.forward_last(self._long_rest)
        return Decision(True, p_think, forced), out, [], "reasoning", None

    # ---- step ------------------------------------------------------------
    def _emit(self, st: _State, phase: str, token_ids: Sequence[int], row: np.ndarray | None = None) -> list[Event]:
        """Text of `token_ids`. `row`: the logits the (single) token was sampled
        from, for its logprob entry; forced tokens have none."""
        if row is not None and st.recorder is not None:
            e = st.recorder.entry(row, token_ids[0])
            st.entries[phase].append(e)
            st.unsent[phase].append(e)
        events: list[Event] = []
        for t in token_ids:
            piece = st.decoders[phase].push(t)
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
        lps = tuple(st.unsent[phase])
        st.unsent[phase].clear()
        return [ReasoningDelta(text, lps) if phase == "reasoning" else AnswerDelta(text, lps)]

    def _feed(self, st: _State, ids: Sequence[int]) -> None:
        st.reply_ids.extend(ids)
        st.n_reply += len(ids)
        st.logits = self.backend.forward_last(ids)

    def _close_reasoning(self, st: _State) -> list[Event]:
        """Budget reached: write the closing line and `</think>`, go on to the answer."""
        closing = self.tok.encode(st.options.budget_closing) if st.options.budget_closing else []
        events = self._emit(st, "reasoning", closing)
        self._feed(st, closing + [self.tok.end_think] + self._after_close)
        st.stats.budget_hit = True
        st.phase = "answer"
        return events

    def _accept(self, st: _State, t: int, row: np.ndarray | None = None) -> list[Event]:
        """File a sampled token (not yet in the cache) as reasoning or answer;
        `row`: the logits it was drawn from."""
        tok, now = self.tok, time.perf_counter()
        if st.first_token_at is None:
            st.first_token_at = now
        st.reply_ids.append(t)
        st.n_reply += 1
        if t in tok.eos_ids:
            st.done, st.finish_reason = True, "stop"
            return []
        events: list[Event] = []
        if st.phase == "reasoning" and t == tok.end_think:
            st.phase = "answer"
            st.closed_itself = True
        elif st.phase == "answer" and t == tok.think:
            st.phase = "reasoning"  # the model opened a think block itself
        else:
            if st.phase == "reasoning":
                st.stats.think_tokens += 1
            else:
                st.stats.answer_tokens += 1
                if st.first_answer_at is None:
                    st.first_answer_at = now
            events = self._emit(st, st.phase, [t], row)
        if st.done:
            return events
        if st.n_reply >= st.options.max_tokens or self.backend.n_past + 1 >= st.n_ctx:
            st.done, st.finish_reason = True, "length"
        return events

    def step(self, st: _State) -> list[Event]:
        """Sample one token and advance the reply; returns its text events."""
        if st.phase == "reasoning" and (
                (st.think_budget is not None and st.stats.think_tokens >= st.think_budget)
                or (st.deadline_ms is not None and self.deadline.must_close(
                    st.deadline_ms, (self.clock() - st.c0) * 1000.0, st.s_per_token))):
            return self._close_reasoning(st)
        c = self.clock() if st.deadline_ms is not None else 0.0
        t = st.sampler(st.logits)
        events = self._accept(st, t, st.logits)
        if not st.done:
            st.logits = self.backend.forward_last([t])
            if st.deadline_ms is not None:  # live speed: a moving average of this reply's steps
                st.s_per_token = 0.7 * st.s_per_token + 0.3 * (self.clock() - c)
        return events

    # ---- stream / generate -----------------------------------------------
    def stream(self, messages: Sequence[Message], images: Sequence[PreparedImage],
               options: GenerationOptions | None = None, system: str | None = None) -> Iterator[Event]:
        """Render the conversation in the options' mode and stream the reply."""
        options = (options or GenerationOptions()).validate()
        prompt = render_prompt(messages, options.mode, system=system)
        return self.stream_prompt(prompt, images, options)

    def stream_prompt(self, prompt: str, images: Sequence[PreparedImage],
                      options: GenerationOptions | None = None) -> Iterator[Event]:
        """Stream a reply to an already rendered prompt. The reasoning/answer
        split starts from what the prompt itself opened or closed."""
        opts = (options or GenerationOptions()).validate()
        t0, c0 = time.perf_counter(), self.clock()
        mode = template_mode(opts.mode)
        tail_mode = next((m for m in ("short", "long", "auto") if prompt.endswith(MODE_SUFFIX[m])), None)
        if tail_mode is not None:
            mode = tail_mode if tail_mode != "auto" or mode == "auto" else mode
            base = prompt[: len(prompt) - len(MODE_SUFFIX[tail_mode])] + MODE_SUFFIX["auto"]
        else:
            base = prompt
        segs = self._segments(base, images)
        n_txt, n_img = self._check_context(segs)
        stats = Stats(backend=self.backend.name, device=self.backend.device)
        logits = self.backend.prefill(segs)
        tm = self.backend.timings
        stats.image_tokens, stats.vision_encode_ms, stats.prefill_ms = tm.image_tokens, tm.vision_encode_ms, tm.prefill_ms
        stats.prompt_tokens = self.backend.n_past
        sampler = Sampler(opts.sampling)
        t_dec, c_dec = time.perf_counter(), self.clock()
        plan: list[DeadlinePlan] = []

        def choose(p_think: float) -> bool:  # deadline mode, auto: right after the decision forward
            now = self.clock()
            plan.append(self.deadline.plan(opts.deadline_ms, (now - c0) * 1000.0, p_think, now - c_dec,
                                           user_budget=opts.max_think_tokens))
            return plan[0].think

        chooser = choose if opts.deadline_ms is not None else None
        if tail_mode is not None:
            decision, logits, drawn, phase, drawn_rows = self._decide(logits, mode, opts, sampler, chooser)
        else:
            phase = phase_after(prompt)
            decision, drawn, drawn_rows = Decision(phase == "reasoning", float(phase == "reasoning"), True), [], None
        stats.decision_ms = (time.perf_counter() - t_dec) * 1000.0
        if opts.deadline_ms is not None:
            if not plan:  # forced mode (or a prompt that set the phase): only the budget is planned
                now = self.clock()
                plan.append(self.deadline.plan(opts.deadline_ms, (now - c0) * 1000.0, decision.p_think,
                                               (now - c_dec) if tail_mode is not None else None,
                                               allow=(phase == "reasoning",), user_budget=opts.max_think_tokens))
            decision = dataclasses.replace(decision, deadline=plan[0])
        st = _State(logits=logits, phase=phase, sampler=sampler, options=opts, n_ctx=self.backend.n_ctx,
                    t0=t0, stats=stats)
        st.decoders = {p: StreamDecoder(self.tok) for p in ("reasoning", "answer")}
        st.texts = {p: _TrimmedText() for p in ("reasoning", "answer")}
        st.stop = StopFilter(opts.stop)
        st.recorder = LogprobRecorder(self.tok, opts.top_logprobs) if opts.logprobs else None
        st.think_budget = plan[0].max_think_tokens if plan and plan[0].think else opts.max_think_tokens
        if plan:
            st.deadline_ms, st.c0, st.s_per_token = opts.deadline_ms, c0, 1.0 / plan[0].tok_s
        yield decision
        budget = st.think_budget
        if budget is not None and len(drawn) > budget:
            # The decision drew more reasoning than the budget allows: keep the
            # first `budget` tokens (all already in the cache), drop the rest.
            self.backend.truncate(self.backend.n_past - (len(drawn) - 1 - budget))
            drawn = drawn[:budget]
            pending = False
        else:
            pending = bool(drawn)  # the last drawn token is not in the cache yet
        for i, t in enumerate(drawn):  # tokens the decision already sampled: file them like any other
            yield from self._accept(st, t, drawn_rows[i] if drawn_rows is not None else None)
            if st.done:
                break
        if pending and not st.done:
            st.logits = self.backend.forward_last(drawn[-1:])
        t_loop, c_loop = time.perf_counter(), self.clock()
        n_loop0 = st.n_reply
        while not st.done:
            yield from self.step(st)
        t_end = time.perf_counter()
        self.deadline.observe(self.clock() - c_loop, st.n_reply - n_loop0, decision.think, st.stats.think_tokens,
                              st.closed_itself, st.stats.answer_tokens)
        for p in ("reasoning", "answer"):
            rest = st.decoders[p].flush()
            if p == "answer":  # the stop filter's held tail is answer text after all
                rest = st.stop.push(rest) + st.stop.flush()
            if rest:
                yield from self._delta(st, p, st.texts[p].push(rest))
        stats.finish_reason = st.finish_reason
        stats.ttft_ms = ((st.first_token_at or t_end) - t0) * 1000.0
        stats.time_to_answer_ms = ((st.first_answer_at or t_end) - t0) * 1000.0
        stats.decode_tokens = st.n_reply - n_loop0
        stats.decode_ms = (t_end - t_loop) * 1000.0
        stats.decode_tps = stats.decode_tokens / (t_end - t_loop) if t_end > t_loop and stats.decode_tokens else 0.0
        stats.total_ms = (t_end - t0) * 1000.0
        stats.peak_rss_mb = peak_rss_mb()
        reasoning, answer = st.texts["reasoning"].text, st.texts["answer"].text
        result = Result(answer=answer, reasoning=reasoning, thought=decision.think, p_think=decision.p_think,
                        mode=opts.mode, forced=decision.forced, stats=stats, token_ids=st.reply_ids,
                        stop_sequence=st.stop.hit)
        if opts.logprobs:
            result.logprobs, result.reasoning_logprobs = st.entries["answer"], st.entries["reasoning"]
        yield Done(result)

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
