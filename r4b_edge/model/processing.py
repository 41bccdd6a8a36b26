"""Image loading and AnyRes preprocessing (PIL + numpy, no torch).

The arithmetic follows transformers' LLaVA-OneVision image processor / processor
(select_best_resolution, resize-and-pad to the best pinpoint, S x S tiles, unpad_image),
without the `anyres_max_N` feature downsampling unless `vision_aspect_ratio` names it.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError, ModelFormatError

if TYPE_CHECKING:  # pragma: no cover
    from .config import RConfig

#: Largest image accepted by default (width * height); pass `max_pixels=` to raise it.
DEFAULT_MAX_PIXELS = 64_000_000
#: The only formats decoded (Pillow names; JPEG includes the multi-picture JPEG (MPO) many
#: phones write). Pillow's other decoders (EPS runs Ghostscript, TGA, PCX, SPIDER, ICO, TIFF,
#: SGI, DDS, ...) never see user data.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: How the accepted formats are named in messages and docs.
IMAGE_FORMATS_TEXT = "PNG, JPEG, WebP, GIF or BMP"


def image_suffixes() -> tuple[str, ...]:
    """The file name suffixes (`.png`, `.jpg`, ...) Pillow gives the formats in `IMAGE_FORMATS`,
    in `IMAGE_FORMATS` order: what a file dialog offers, so that it never offers a file
    `load_image` refuses."""
    Image.init()  # registers every plugin's extensions (nothing is decoded)
    found = [(IMAGE_FORMATS.index(fmt), ext) for ext, fmt in Image.registered_extensions().items()
             if fmt in IMAGE_FORMATS]
    return tuple(ext for _, ext in sorted(found))

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]


@dataclass
class PreparedImage:
    """An image ready for the vision tower (see docs/design.md)."""

    pixel_values: np.ndarray      # float32 [n_views, 3, S, S]; view 0 = base view, then tiles row-major
    grid: tuple[int, int]         # (rows, cols) of AnyRes tiles, (0, 0) for base-only
    orig_size: tuple[int, int]    # (height, width) of the RGB image
    n_tokens: int                 # sequence positions the image takes (incl. image_newline tokens)
    key: str                      # sha256 of the RGB pixels (+ size) + ":RxC" grid: embeddings cache key
    image: Image.Image | None     # the RGB image (None where a holder dropped it to save memory,
                                  # as the server does for queued requests; the model never reads it)
    budget: int | None = None     # the positions budget that chose `grid` (None: the model's full grid)


# ---- loading ---------------------------------------------------------------------------------
def _bomb(w: int, h: int, max_pixels: int, what: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels "
        f"(decompression-bomb guard); pass max_pixels={w * h} (or larger) to load_image to allow it",
        pixels=w * h, limit=max_pixels,
    )


def default_max_pixels(config: "RConfig", factor: int = 4, floor: int = 4096 * 3072) -> int:
    """A pixel limit fitted to a model: `factor` x the largest AnyRes pinpoint (or base view)
    area, and never under `floor` (a 12.6 MP phone photo), since larger images are only
    downscaled to the pinpoint anyway."""
    areas = [h * w for h, w in (config.image_grid_pinpoints or [])] if config.anyres else []
    return max(factor * max(areas + [config.image_size ** 2]), floor)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """RGB image; any transparency is composited onto white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(a / scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(f"numpy image must be HxW, HxWx3 or HxWx4 (got shape {tuple(arr.shape)})")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise ImageError(f"numpy image is empty (shape {tuple(arr.shape)})")
    if h * w > max_pixels:
        raise _bomb(w, h, max_pixels, "numpy array")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint8:
        a8 = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageError("numpy image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"float numpy image must hold values in [0, 1] (got range [{lo:g}, {hi:g}])")
        a8 = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        a8 = arr.astype(np.uint8) * 255
    else:
        raise ImageError(f"numpy image must be uint8 or float in [0, 1] (got dtype {arr.dtype})")
    mode = "L" if a8.ndim == 2 else ("RGBA" if a8.shape[2] == 4 else "RGB")
    return _flatten_alpha(Image.fromarray(np.ascontiguousarray(a8), mode))


_PIL_LIMIT_LOCK = threading.Lock()


def _pil_open(fp: Any, max_pixels: int) -> Image.Image:
    """Image.open (header only); PIL's own bomb limit is lifted to `max_pixels` when that is larger."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None or max_pixels < 2 * pil_limit:
        return Image.open(fp, formats=IMAGE_FORMATS)
    with _PIL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(fp, formats=IMAGE_FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _open(fp: Any, what: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _pil_open(fp, max_pixels)
            w, h = img.size  # header only: nothing decoded yet
            if w * h > max_pixels:
                raise _bomb(w, h, max_pixels, what)
            if w == 0 or h == 0:
                raise ImageError(f"{what}: image has zero size ({w}x{h})")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _flatten_alpha(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else 0
        raise ImageTooLargeError(f"{what}: image is {n or 'too many'} pixels, over the limit of {max_pixels} pixels "
                                 f"(decompression-bomb guard); pass a larger max_pixels to load_image to allow it",
                                 pixels=n, limit=max_pixels) from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not an image in an accepted format ({IMAGE_FORMATS_TEXT}; "
                         "other formats are never decoded)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as e:
        raise ImageError(f"{what}: image is corrupt or truncated ({type(e).__name__}: {e})") from None


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, bytes, PIL image or numpy array; EXIF-rotated, alpha on white.

    Raises ImageError (naming the path and the problem) for anything that is not a readable image.
    """
    if isinstance(src, Image.Image):
        w, h = src.size
        if w * h > max_pixels:
            raise _bomb(w, h, max_pixels, "PIL image")
        try:
            img = ImageOps.exif_transpose(src) or src
            return _flatten_alpha(img)
        except (OSError, ValueError) as e:
            raise ImageError(f"PIL image cannot be converted to RGB ({e})") from None
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("image bytes are empty")
        return _open(io.BytesIO(bytes(src)), f"image bytes ({len(src)} bytes)", max_pixels)
    if isinstance(src, (str, Path)):
        p = Path(src).expanduser()
        if not p.exists():
            raise ImageError(f"{p}: image file not found")
        if p.is_dir():
            raise ImageError(f"{p}: is a directory, not an image file")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ImageError(f"{p}: cannot be read ({e.strerror or e})") from None
        if not data:
            raise ImageError(f"{p}: file is empty")
        return _open(io.BytesIO(data), str(p), max_pixels)
    raise ImageError(
        f"unsupported image input of type {type(src).__name__}: "
        "pass a path, bytes, a PIL image or a numpy array"
    )


# ---- AnyRes arithmetic (LLaVA-NeXT / OneVision) ----------------------------------------------
def select_best_resolution(orig_size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most resolution and wastes the least."""
    oh, ow = orig_size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best  # type: ignore[return-value]


def _resized_size(orig_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Aspect-keeping size inside `target` (transformers' get_patch_output_size)."""
    oh, ow = orig_size
    th, tw = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


def unpadded_feature_size(orig_size: tuple[int, int], feat_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) left of a (H, W) tile feature map after removing the padding (unpad_image)."""
    oh, ow = orig_size
    ch, cw = feat_hw
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return ch - 2 * pad, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return ch, cw - 2 * pad


def check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) as ints: both >= 1, or (0, 0) for the base view alone; else ImageError."""
    rows, cols = int(grid[0]), int(grid[1])
    if (rows, cols) != (0, 0) and (rows < 1 or cols < 1):
        raise ImageError(f"an AnyRes grid is (rows, cols) with both >= 1, or (0, 0) for the base view alone "
                         f"(got {rows}x{cols})")
    return rows, cols


def grid_layout(orig_size: tuple[int, int], config: "RConfig", grid: tuple[int, int]) -> dict:
    """Feature sizes of an image tiled as `grid` (rows, cols): grid, best (h, w) = the tiled
    canvas, unpadded (rows, cols) of the tile feature map, feature (rows, cols) after `anyres_max_N`
    (equal to unpadded when not applied). Grid (0, 0) is the base view alone: {"grid": (0, 0)}.
    Every grid's arithmetic is this one, whichever pinpoints it was chosen among."""
    rows, cols = check_grid(grid)
    if (rows, cols) == (0, 0):
        return {"grid": (0, 0)}
    S, P = config.image_size, config.image_size // config.patch_size
    uh, uw = unpadded_feature_size(orig_size, (rows * P, cols * P))
    dh, dw = uh, uw
    n_max = config.anyres_max_patches
    if n_max is not None:
        ratio = math.sqrt(uh * uw / (n_max * P * P))
        if ratio > 1.1:
            dh, dw = int(uh // ratio), int(uw // ratio)
    return {"grid": (rows, cols), "best": (rows * S, cols * S), "unpadded": (uh, uw), "feature": (dh, dw)}


def anyres_layout(orig_size: tuple[int, int], config: "RConfig",
                  pinpoints: list[list[int]] | None = None) -> dict:
    """The layout (`grid_layout`) of the grid `select_best_resolution` picks for an image among
    `pinpoints` (None: all of the config's); base-only configs and an empty list give grid (0, 0)."""
    if not config.anyres:
        return {"grid": (0, 0)}
    pins = config.image_grid_pinpoints if pinpoints is None else pinpoints
    if not pins:
        return {"grid": (0, 0)}
    S = config.image_size
    bh, bw = select_best_resolution(orig_size, pins)
    return grid_layout(orig_size, config, (bh // S, bw // S))


def layout_tokens(lay: dict, config: "RConfig") -> int:
    """Positions of a layout: base view + feature rows x cols + one newline per row; the base
    view alone (grid (0, 0)) is `tokens_per_view` positions, no newline."""
    if lay["grid"] == (0, 0):
        return config.tokens_per_view
    fh, fw = lay["feature"]
    return config.tokens_per_view + fh * fw + fh


def count_image_tokens(orig_size: tuple[int, int], config: "RConfig", grid: tuple[int, int] | None = None) -> int:
    """Positions an image of (height, width) takes: base view + unpadded tile features + newlines,
    tiled as `grid` (None: the grid the config's full pinpoint list picks).

    Base-only configs (no AnyRes) and grid (0, 0) take exactly `tokens_per_view` positions (no newline).
    """
    lay = anyres_layout(orig_size, config) if grid is None else grid_layout(orig_size, config, grid)
    return layout_tokens(lay, config)


def budget_layout(orig_size: tuple[int, int], config: "RConfig", budget: int | None) -> dict:
    """The layout of an image under a positions budget: the grid `select_best_resolution` picks
    among the pinpoints whose whole image (base view + tiles + newlines) fits `budget` and that
    have no more tiles than the model's full grid for this image (a budget never makes the vision
    tower encode more views: a wide photo's 2x3 is not traded for a 3x3 that unpads to fewer
    positions); the base view alone when none fits (it is always kept, so an image takes at least
    `tokens_per_view`). `budget` None: every pinpoint (the model's full grid)."""
    full = anyres_layout(orig_size, config)
    if budget is None or not config.anyres:
        return full
    S = config.image_size
    most = full["grid"][0] * full["grid"][1]
    fits = [[h, w] for h, w in config.image_grid_pinpoints
            if (h // S) * (w // S) <= most
            and layout_tokens(grid_layout(orig_size, config, (h // S, w // S)), config) <= budget]
    return anyres_layout(orig_size, config, fits)


def _bilinear(fmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) of [C, h, w]."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    y0, y1, wy = axis(fmap.shape[1], size[0])
    x0, x1, wx = axis(fmap.shape[2], size[1])
    top = fmap[:, y0][:, :, x0] * (1 - wx) + fmap[:, y0][:, :, x1] * wx
    bot = fmap[:, y1][:, :, x0] * (1 - wx) + fmap[:, y1][:, :, x1] * wx
    return (top * (1 - wy)[:, None] + bot * wy[:, None]).astype(fmap.dtype)


def pack_anyres(feats: np.ndarray, grid: tuple[int, int], orig_size: tuple[int, int], config: "RConfig",
                newline: np.ndarray | None) -> np.ndarray:
    """Per-view projected features [V, P*P, H] -> the image's sequence [n_tokens, H] (numpy, as
    `RForConditionalGeneration.image_features` does in torch): base view, then the tile feature
    map unpadded to the image's aspect (downsampled for `anyres_max_N`) with `newline` after every
    row, all computed from `grid` (the one the image was prepared with, budgeted or not). The
    llama and onnx backends both pack with this."""
    P = config.image_size // config.patch_size
    rows, cols = check_grid(grid)
    if feats.shape[0] != 1 + rows * cols:
        raise ModelFormatError(f"the vision encoder returned {feats.shape[0]} views; grid {rows}x{cols} "
                               f"needs {1 + rows * cols}")
    base = feats[0]
    if rows * cols == 0:
        return base
    if newline is None:
        raise ModelFormatError(f"the image is tiled {rows}x{cols} (AnyRes) but the model files have no "
                               "image_newline: re-export them")
    H = feats.shape[-1]
    fmap = feats[1:].reshape(rows, cols, P, P, H).transpose(4, 0, 2, 1, 3).reshape(H, rows * P, cols * P)
    lay = grid_layout((int(orig_size[0]), int(orig_size[1])), config, (rows, cols))
    uh, uw = lay["unpadded"]
    top, left = (rows * P - uh) // 2, (cols * P - uw) // 2
    fmap = fmap[:, top:top + uh, left:left + uw]
    if tuple(lay["feature"]) != (uh, uw):  # anyres_max_N downsampling
        fmap = _bilinear(fmap, tuple(lay["feature"]))
    fh = fmap.shape[1]
    nl = np.broadcast_to(newline.astype(fmap.dtype)[:, None, None], (H, fh, 1))
    packed = np.concatenate([fmap, nl], axis=-1).reshape(H, -1).T
    return np.concatenate([base, packed], axis=0)


# ---- preprocessing ---------------------------------------------------------------------------
def _normalize(img: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - mean) / std).transpose(2, 0, 1)


def prepare_image(img: ImageSource, config: "RConfig", image_tokens: int | None = None) -> PreparedImage:
    """Base view (resized to S x S) + AnyRes tiles, SigLIP-normalised, as float32 [V, 3, S, S].

    `image_tokens`: a positions budget (int >= 1) that picks the grid (`budget_layout`), or None
    for the model's full grid. ("auto" depends on the device: `Model.prepare` resolves it with
    `image_budget.resolve_image_tokens`.)"""
    from .image_budget import check_image_tokens

    budget = check_image_tokens(image_tokens)
    if budget == "auto":
        from ..errors import ImageTokensError

        raise ImageTokensError("prepare_image takes a positions budget (int >= 1) or None; 'auto' depends on the "
                               "device and threads: use Model.prepare, or resolve it first with "
                               "r4b_edge.model.image_budget.resolve_image_tokens('auto', device, threads)")
    if not (isinstance(img, Image.Image) and img.mode == "RGB"):
        img = load_image(img)
    w, h = img.size
    S = config.image_size
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    views = [_normalize(img.resize((S, S), Image.BICUBIC), mean, std)]
    lay = budget_layout((h, w), config, budget)
    if lay["grid"] != (0, 0):
        bh, bw = lay["best"]
        nh, nw = _resized_size((h, w), (bh, bw))
        canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((bw - nw) // 2, (bh - nh) // 2))
        padded = _normalize(canvas, mean, std)
        rows, cols = lay["grid"]
        for r in range(rows):
            for c in range(cols):
                views.append(padded[:, r * S:(r + 1) * S, c * S:(c + 1) * S])
    pv = np.ascontiguousarray(np.stack(views).astype(np.float32, copy=False))
    rows, cols = lay["grid"]
    # the grid is part of the key: the same pixels at two budgets are two different embeddings
    digest = hashlib.sha256(f"{w}x{h}:".encode() + img.tobytes()).hexdigest() + f":{rows}x{cols}"
    return PreparedImage(pixel_values=pv, grid=(rows, cols), orig_size=(h, w),
                         n_tokens=layout_tokens(lay, config), key=digest, image=img, budget=budget)
