"""Project exception types. Every user-facing failure is one of these, with a
message that names the problem and the fix; the CLI prints it on one line."""
from __future__ import annotations


class R4BError(Exception):
    """Base class of every r4b-edge error."""


class ImageError(R4BError, ValueError):
    """An image could not be read, is not an image, or is too large."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than the caller's limit (the decompression-bomb guard).

    `pixels` is the image's width x height (0 when the header does not say), `limit` the limit."""

    def __init__(self, message: str, pixels: int = 0, limit: int = 0):
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


class ModelFormatError(R4BError):
    """A model folder or file is missing, incomplete, or inconsistent."""


class ModelNotFoundError(ModelFormatError, FileNotFoundError):
    """No model was found where one was expected."""


class BackendUnavailableError(R4BError, ImportError):
    """A backend (or device) was requested that is not installed here."""


class BackendOptionError(R4BError, ValueError):
    """A load argument (threads, dtype, ...) is unknown to the backend or invalid."""


class ContextLengthError(R4BError, ValueError):
    """Prompt plus image tokens do not fit the model's context."""


class GenerationOptionError(R4BError, ValueError):
    """A generation option (mode, threshold, budget, sampling) is invalid."""


class ServerBindError(R4BError, OSError):
    """`r4b-edge serve` cannot listen on the address asked for."""


class ExportError(R4BError):
    """An export (GGUF/ONNX) cannot be done with the given inputs."""


class TrainingError(R4BError):
    """Training data, config or checkpoint problem."""


class StoreError(R4BError):
    """The model store (r4b-edge pull/list/rm) cannot do what was asked."""


class DownloadError(R4BError):
    """A model could not be downloaded from the hub, or what arrived is wrong."""


def describe_exit(returncode: int) -> str:
    """A child process's exit status in words: "killed by SIGSEGV (segmentation fault)", "exit code 3"."""
    import signal

    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}"
        desc = signal.strsignal(sig) or ""
        return f"killed by {sig.name}" + (f" ({desc.lower()})" if desc else "")
    return f"exit code {returncode}"
