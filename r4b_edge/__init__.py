"""r4b-edge: run an auto-thinking R-4B-family vision-language model locally.

Importing this package imports no torch; the torch backend loads it on use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .engine.events import AnswerDelta, Decision, Done, Event, Progress, ReasoningDelta, Result, Stats
from .errors import (
    BackendOptionError, BackendUnavailableError, ContextLengthError, DownloadError, ExportError,
    GenerationOptionError, ImageError, ImageTokensError, ModelFormatError, ModelNotFoundError, R4BError, StoreError,
    TrainingError,
)
from .model.template import Message

__all__ = [
    "load", "Model", "Conversation", "Message", "GenerationOptions", "check_options",
    "Score", "TokenLogprob", "TopLogprob",
    "Progress", "Decision", "ReasoningDelta", "AnswerDelta", "Done", "Event", "Result", "Stats",
    "R4BError", "ImageError", "ModelFormatError", "ModelNotFoundError", "BackendUnavailableError",
    "BackendOptionError", "ContextLengthError", "GenerationOptionError", "ImageTokensError", "ExportError",
    "TrainingError", "StoreError", "DownloadError",
]


def __getattr__(name: str):
    if name in ("load", "Model", "Conversation", "check_options"):
        from . import api

        return getattr(api, name)
    if name == "GenerationOptions":
        from .engine.generate import GenerationOptions

        return GenerationOptions
    if name in ("Score", "TokenLogprob", "TopLogprob"):
        from .engine import logprobs

        return getattr(logprobs, name)
    raise AttributeError(f"module 'r4b_edge' has no attribute {name!r}")
