"""The public Python API: `load()`, `Model.chat/stream/conversation`, and
`Model.stream_messages/chat_messages` for a whole conversation (the one way into the engine).

    import r4b_edge
    model = r4b_edge.load()                      # the bundled model, best backend
    r = model.chat("photo.png", "What is the sum of the digits?")
    print(r.thought, r.p_think, r.answer)
    for ev in model.stream("photo.png", "Which colour?", mode="no-think"):
        ...
    msgs = [r4b_edge.Message("user", "Which colour?", images=1)]
    r = model.chat_messages(msgs, ["photo.png"], mode="think")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, overload

from .backends import create_backend
from .backends.base import Backend
from .engine.events import Done, Event, Result
from .engine.generate import Engine, GenerationOptions
from .engine.logprobs import Score
from .engine.score import score_prompt
from .engine.options import check_text, options_from
from .errors import ImageTokensError, ModelNotFoundError
from .model.image_budget import DEFAULT_IMAGE_TOKENS, ImageTokens, check_image_tokens, resolve_image_tokens
from .model.processing import DEFAULT_MAX_PIXELS, PreparedImage, load_image, prepare_image
from .model.reply_lengths import read_reply_lengths
from .model.template import Message, render_prompt
from .store import resolve_model

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "model"
EXAMPLE_IMAGE = ASSETS / "example.png"
#: what every face says about the bundled model (README, `r4b-edge chat`, the app)
BUNDLED_MODEL_NOTE = (
    "the bundled model is a small demo trained only on r4b-edge's synthetic world: it reads the 2x2 "
    "grid scenes of digits and shapes that docs/world.md describes, asked in that world's words, and "
    "nothing else (photos and other questions get confident nonsense); for real images use the real "
    "R-4B: `r4b-edge pull YannQi/R-4B` (docs/pull.md)")

ImageInput = Any  # path, bytes, PIL.Image, numpy array


class _ModelDefault:
    """The `image_tokens` of a call that gives none: the model's own (`Model.image_tokens`)."""

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


#: `image_tokens=MODEL_DEFAULT` (what a call that names none gets) is `Model.image_tokens`
MODEL_DEFAULT: Any = _ModelDefault()


def default_model_path() -> Path:
    """The model shipped inside the package."""
    if not (BUNDLED_MODEL / "config.json").exists():
        raise ModelNotFoundError(
            f"no bundled model at {BUNDLED_MODEL}: pass a model path (load(path=...) / --model), "
            "or build it with `r4b-edge train reproduce`"
        )
    return BUNDLED_MODEL


@dataclass
class Conversation:
    """A multi-turn chat about (optionally) one image. Earlier turns' answers
    stay in the prompt; their reasoning is dropped, as the template does."""

    model: "Model"
    image: Optional[PreparedImage] = None
    system: Optional[str] = None
    messages: list[Message] = field(default_factory=list)

    def stream(self, prompt: str, **options: Any) -> Iterator[Event]:
        """Ask the next question; yields events; the turn is recorded at Done.
        Bad options or text raise here, not at the first event."""
        if "image_tokens" in options:
            raise ImageTokensError("image_tokens applies where the image is prepared: pass it to "
                                   "Model.conversation(image, image_tokens=...); a conversation keeps its image "
                                   "as it was prepared")
        return self._stream(prompt, options_from(options))

    def _stream(self, prompt: str, opts: GenerationOptions) -> Iterator[Event]:
        check_text("prompt", prompt)
        first = not self.messages
        turn = Message("user", prompt, images=1 if (first and self.image is not None) else 0)
        msgs = self.messages + [turn]
        images = [self.image] if self.image is not None else []
        return self._record(self.model._stream_messages(msgs, images, opts, self.system), msgs)

    def _record(self, events: Iterator[Event], msgs: list[Message]) -> Iterator[Event]:
        for ev in events:
            if isinstance(ev, Done):
                r = ev.result
                self.messages = msgs + [Message("assistant", r.answer, reasoning=r.reasoning)]
            yield ev

    def ask(self, prompt: str, **options: Any) -> Result:
        """Blocking version of `stream`."""
        return _result(self.stream(prompt, **options))

    def reset(self) -> None:
        self.messages.clear()


class Model:
    """A loaded model with its backend and engine."""

    def __init__(self, backend: Backend, max_pixels: int = DEFAULT_MAX_PIXELS,
                 image_tokens: ImageTokens = DEFAULT_IMAGE_TOKENS):
        self.backend = backend
        # deadline mode's priors: the model's own reply lengths (from its eval results), if it has them
        self.engine = Engine(backend, read_reply_lengths(backend.model_path, backend.tokenizer))
        self.max_pixels = max_pixels
        self.image_tokens = image_tokens

    @property
    def image_tokens(self) -> int | str | None:
        """The image-token budget of calls that give none: N positions, "auto" (the full grid on
        a GPU, `AUTO_CPU_POSITIONS_PER_THREAD` x threads on a CPU) or None (the full grid)."""
        return self._image_tokens

    @image_tokens.setter
    def image_tokens(self, value: ImageTokens) -> None:
        self._image_tokens = check_image_tokens(value)

    def image_budget(self, image_tokens: ImageTokens = MODEL_DEFAULT) -> int | None:
        """The positions budget an image gets (`image_tokens`, else the model's; "auto" resolved
        for this backend's device and threads); None: the full grid."""
        value = self._image_tokens if image_tokens is MODEL_DEFAULT else image_tokens
        return resolve_image_tokens(value, self.backend.device, getattr(self.backend, "threads", None))

    @property
    def config(self):
        return self.backend.config

    @property
    def is_bundled(self) -> bool:
        """True for the demo model shipped in the package (see `BUNDLED_MODEL_NOTE`)."""
        try:
            return Path(self.backend.model_path).resolve() == BUNDLED_MODEL.resolve()
        except OSError:
            return False

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    def prepare(self, image: ImageInput, image_tokens: ImageTokens = MODEL_DEFAULT) -> PreparedImage:
        """Load and preprocess an image (path, bytes, PIL image or array), tiled within
        `image_tokens` (default: `Model.image_tokens`); a `PreparedImage` is returned as it is."""
        budget = self.image_budget(image_tokens)  # a bad value fails before the image is read
        if isinstance(image, PreparedImage):
            return image
        return prepare_image(load_image(image, max_pixels=self.max_pixels), self.config, budget)

    def conversation(self, image: ImageInput | None = None, system: str | None = None,
                     image_tokens: ImageTokens = MODEL_DEFAULT) -> Conversation:
        """Start a multi-turn conversation about `image` (tiled within `image_tokens`)."""
        if image is None:
            self.image_budget(image_tokens)  # checked all the same
        return Conversation(self, self.prepare(image, image_tokens) if image is not None else None, system)

    def stream(self, image: ImageInput | None, prompt: str, **options: Any) -> Iterator[Event]:
        """One question; yields Decision, ReasoningDelta/AnswerDelta, Done.
        Options: mode ('auto'|'think'|'no-think'), think_threshold,
        max_think_tokens, max_tokens, temperature, top_p, top_k, seed,
        budget_closing, measure_p_think, stop (str or list: ends the answer),
        logprobs / top_logprobs (per-token entries on the deltas and the
        Result; README "Log-probabilities"), image_tokens (N, "auto" or "full"/None:
        the image's positions budget for this call; default `Model.image_tokens`).
        Bad options raise GenerationOptionError here, before the image is read."""
        image_tokens = options.pop("image_tokens", MODEL_DEFAULT)
        opts = options_from(options)
        return self.conversation(image, image_tokens=image_tokens)._stream(prompt, opts)

    def chat(self, image: ImageInput | None, prompt: str, **options: Any) -> Result:
        """Blocking one-shot reply; see `stream` for the options."""
        image_tokens = options.pop("image_tokens", MODEL_DEFAULT)
        return self.conversation(image, image_tokens=image_tokens).ask(prompt, **options)

    def stream_messages(self, messages: Sequence[Message], images: Sequence[ImageInput] = (), *,
                        system: str | None = None, **options: Any) -> Iterator[Event]:
        """The next assistant reply to a whole conversation (ending with a user turn); yields
        events as `stream` does and takes the same options. Earlier assistant turns are
        answers (their reasoning is not rendered). `images`: one per `<image>` the user
        turns' `Message.images` count, in order: anything `prepare` takes (a `PreparedImage`
        is used as it is). `system`: a system prompt before the turns. `image_tokens` (an
        option): the images' positions budget for this call. Unknown option names
        raise GenerationOptionError before an image is read; values, texts and the image
        count raise at the call, never at the first event."""
        image_tokens = options.pop("image_tokens", MODEL_DEFAULT)
        opts = options_from(options)
        self.image_budget(image_tokens)
        return self._stream_messages(messages, [self.prepare(im, image_tokens) for im in images], opts, system)

    def chat_messages(self, messages: Sequence[Message], images: Sequence[ImageInput] = (), *,
                      system: str | None = None, **options: Any) -> Result:
        """Blocking version of `stream_messages`."""
        return _result(self.stream_messages(messages, images, system=system, **options))

    def _stream_messages(self, messages: Sequence[Message], images: Sequence[PreparedImage],
                         opts: GenerationOptions, system: str | None) -> Iterator[Event]:
        """Where every reply of the API enters the engine (`stream`, `Conversation`, `stream_messages`)."""
        return self.engine.stream(messages, images, opts, system=system)

    @overload
    def score(self, image: ImageInput | None, prompt: str, continuation: str, mode: str = ...,
              system: str | None = ..., top_logprobs: int = ...) -> Score: ...

    @overload
    def score(self, image: ImageInput | None, prompt: str, continuation: Sequence[str], mode: str = ...,
              system: str | None = ..., top_logprobs: int = ...) -> list[Score]: ...

    def score(self, image, prompt, continuation, mode="no-think", system=None, top_logprobs=0):
        """Log-probabilities of `continuation` as the assistant's reply to one question.

        The continuation starts right after the rendered prompt, which ends with
        the assistant header and `mode`'s think prefix: no-think (the default,
        for scoring answers) `<think>\\n\\n</think>\\n\\n`; think `<think>\\n`
        (the continuation is read as reasoning); auto `<think>` (so the
        continuation "\\n\\n</think>\\n\\nB" scores the model's choice not to
        think plus the answer). A list of continuations (the choices of a
        multiple-choice question) gives a list of `Score`s for one prefill."""
        prepared = self.prepare(image) if image is not None else None
        msgs = [Message("user", prompt, images=1 if prepared is not None else 0)]
        rendered = render_prompt(msgs, mode, system=system)
        single = isinstance(continuation, str)
        conts = [continuation] if single else list(continuation)
        out = score_prompt(self.engine, rendered, [prepared] if prepared is not None else [], conts, top_logprobs)
        return out[0] if single else out

    def info(self) -> dict:
        i = self.backend.info()
        return {"backend": i.name, "device": i.device, "model": i.model_path, "precision": i.precision,
                "n_ctx": self.backend.n_ctx, "image_tokens": self.image_tokens,
                "image_budget": self.image_budget(), **i.extra}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_options(**options: Any) -> GenerationOptions:
    """The options `Model.stream` and the others take, checked now (names, types, ranges;
    GenerationOptionError names the bad one), e.g. to refuse a request before queueing it.
    `image_tokens` is checked too (it is not a generation option: it is not in the result)."""
    if "image_tokens" in options:
        check_image_tokens(options.pop("image_tokens"))
    return options_from(options).validate()


def _result(events: Iterable[Event]) -> Result:
    for ev in events:
        if isinstance(ev, Done):
            return ev.result
    raise RuntimeError("generation ended without a result")  # pragma: no cover


def load(path: str | Path | None = None, backend: str = "auto", device: str = "auto",
         image_tokens: ImageTokens = DEFAULT_IMAGE_TOKENS, **kwargs: Any) -> Model:
    """Load a model: an R-4B folder (torch), a .gguf file or folder (llama),
    or an ONNX export folder (onnx), or a model-store name (`r4b-edge pull`), which wins over a
    path. `path=None` loads the bundled model.
    `device`: auto (CUDA, then Apple MPS/Metal, then CPU), cpu, cuda, mps.
    `image_tokens`: the images' positions budget (`Model.image_tokens`): N, "auto" (default: the
    full grid on a GPU, `AUTO_CPU_POSITIONS_PER_THREAD` x threads on a CPU) or "full"/None.
    Backend options: `threads`, `n_ctx` (every backend), torch `dtype`, ... (`backends.LOAD_OPTIONS`)."""
    check_image_tokens(image_tokens)  # before minutes of loading
    if path is None:
        path = default_model_path()
    else:
        path = resolve_model(path, backend)
    return Model(create_backend(path, backend=backend, device=device, **kwargs), image_tokens=image_tokens)
