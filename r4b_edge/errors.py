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


def context_fixes(need: int, n_ctx: int, model_ctx: int, n_text: int | None = None, n_images: int = 0,
                  image_positions: int = 0, min_image: int = 1) -> str:
    """What a ContextLengthError says to do, with the numbers: a larger `--n-ctx` (load(n_ctx=))
    where the model's own context allows `need` positions, fewer image positions (`--image-tokens`,
    image_tokens=) where the text plus `min_image` positions an image (its base view) would fit,
    or a shorter conversation. `n_text`: the positions that are not images (None: unknown)."""
    fixes = []
    if need <= model_ctx:
        fixes.append(f"load with a larger context: --n-ctx {need} (load(n_ctx={need})), up to the model's {model_ctx}")
    else:
        fixes.append(f"(the model's own context is {model_ctx}, so --n-ctx cannot hold it)")
    if n_text is None:
        fixes.append("give images fewer positions: --image-tokens N (image_tokens=N)")
    elif n_images:
        per_image = (n_ctx - n_text) // n_images
        if min_image <= per_image < image_positions // n_images:
            fixes.append(f"give the image{'s' if n_images > 1 else ''} fewer positions: --image-tokens {per_image} "
                         f"(image_tokens={per_image}; now {image_positions} for {n_images} image(s))")
    fixes.append("shorten the conversation")
    return "; or ".join(fixes)


class GenerationOptionError(R4BError, ValueError):
    """A generation option (mode, threshold, budget, sampling) is invalid."""


class ImageTokensError(GenerationOptionError):
    """`image_tokens` (load, prepare or a call) is not a whole number >= 1, "auto", "full" or None."""


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
