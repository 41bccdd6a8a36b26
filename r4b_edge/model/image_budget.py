"""The image-token budget (no torch): how many sequence positions one image may take.

`image_tokens` is N (a positions budget), "auto" or "full" / None (the model's full grid). A
budget picks the AnyRes grid among the pinpoints whose whole image fits it
(`processing.budget_layout`); the base view is always kept, so an image never takes fewer than
`tokens_per_view` positions. "auto" is this module's rule (`auto_image_tokens`): the full grid on
a GPU; on a CPU `AUTO_CPU_POSITIONS_PER_THREAD` positions per thread of the backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import ImageTokensError

if TYPE_CHECKING:  # pragma: no cover
    from .config import RConfig
    from .processing import PreparedImage

#: what `image_tokens` accepts: a positions budget, "auto", or the full grid ("full" or None)
ImageTokens = Union[int, str, None]
#: the accepted forms, as messages name them
IMAGE_TOKENS_FORMS = "a whole number >= 1 (a positions budget), 'auto' or 'full' (or None: the model's full grid)"
#: "auto" on a CPU: positions per thread of the backend. Chosen so that a 1920x1080 photo's first
#: token comes within ~30 s on 2 cores at Q4_K_M with R-4B's true shapes (2 threads: 1,280
#: positions, grid 1x1 + base view, 1,149 positions; see docs/images.md).
AUTO_CPU_POSITIONS_PER_THREAD = 640
#: canonical devices (backends' `device`) where "auto" means the full grid
GPU_DEVICES = ("cuda", "mps", "metal", "coreml", "gpu")
#: what `--image-tokens` and the server default to: the rule above
DEFAULT_IMAGE_TOKENS = "auto"


def check_image_tokens(value: Any, what: str = "image_tokens") -> Union[int, str, None]:
    """`value` as N (int >= 1), "auto" or None (the full grid; "full" is spelled None);
    anything else raises ImageTokensError naming `what`, the value and the accepted forms."""
    if value is None:
        return None
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("auto", "full"):
            return None if low == "full" else "auto"
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ImageTokensError(f"{what} must be {IMAGE_TOKENS_FORMS}; got {value!r}")


def parse_image_tokens(text: str, what: str = "--image-tokens") -> Union[int, str, None]:
    """Typed text (a command line, a settings box) -> N, "auto" or None ("full")."""
    t = str(text).strip()
    if t.isdigit():
        return check_image_tokens(int(t), what)
    return check_image_tokens(t, what)


def auto_image_tokens(device: str, threads: Optional[int]) -> Optional[int]:
    """The budget "auto" means on `device` with `threads` CPU threads: None (the full grid) on a GPU
    (cuda, mps, metal, coreml, gpu), else `AUTO_CPU_POSITIONS_PER_THREAD` x threads."""
    if str(device).lower() in GPU_DEVICES:
        return None
    if threads is None:
        from ..backends.runtime import default_threads

        threads = default_threads()
    return AUTO_CPU_POSITIONS_PER_THREAD * max(1, int(threads))


def resolve_image_tokens(value: Any, device: str, threads: Optional[int]) -> Optional[int]:
    """`value` checked, with "auto" resolved for `device` and `threads`: a budget or None (full grid)."""
    v = check_image_tokens(value)
    return auto_image_tokens(device, threads) if v == "auto" else v


def describe_image(image: "PreparedImage") -> str:
    """One line on how an image was tiled: `image 1920x1080 -> grid 1x2 + base view, 2052
    positions (budget 2560)`; `base view only` where no grid fitted or the model has none."""
    h, w = image.orig_size
    rows, cols = image.grid
    tiles = "base view only" if (rows, cols) == (0, 0) else f"grid {rows}x{cols} + base view"
    budget = "full grid" if image.budget is None else f"budget {image.budget}"
    return f"image {w}x{h} -> {tiles}, {image.n_tokens} positions ({budget})"


def grid_cost(orig_size: tuple[int, int], config: "RConfig", budget: Optional[int]) -> tuple[tuple[int, int], int, int]:
    """(grid, views, positions) of an image of (height, width) under `budget` (None: full grid)."""
    from .processing import budget_layout, layout_tokens

    lay = budget_layout(orig_size, config, budget)
    rows, cols = lay["grid"]
    return (rows, cols), 1 + rows * cols, layout_tokens(lay, config)


__all__ = ["AUTO_CPU_POSITIONS_PER_THREAD", "DEFAULT_IMAGE_TOKENS", "GPU_DEVICES", "IMAGE_TOKENS_FORMS", "ImageTokens",
           "auto_image_tokens", "check_image_tokens", "describe_image", "grid_cost", "parse_image_tokens",
           "resolve_image_tokens"]
