"""load_image for every input kind, EXIF, alpha, bomb guard, errors; AnyRes preprocessing."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r4b_edge.errors import ImageError
from r4b_edge.model.config import RConfig
from r4b_edge.model.processing import (
    count_image_tokens, load_image, prepare_image, select_best_resolution,
)
from r4b_edge.testing import tiny_config


def _img(w: int = 30, h: int = 20) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w, dtype=np.uint8)[None] * 8
    a[..., 1] = 100
    return Image.fromarray(a, "RGB")


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_formats_from_path_and_bytes(tmp_path: Path, fmt: str, ext: str) -> None:
    p = tmp_path / f"x.{ext}"
    _img().save(p, fmt)
    for src in (p, str(p), p.read_bytes(), bytearray(p.read_bytes())):
        im = load_image(src)
        assert im.mode == "RGB" and im.size == (30, 20)


def test_pil_and_numpy_inputs() -> None:
    base = np.asarray(_img())
    assert np.array_equal(np.asarray(load_image(_img())), base)
    assert np.array_equal(np.asarray(load_image(base)), base)
    assert np.array_equal(np.asarray(load_image(base.astype(np.float32) / 255.0)), base)
    gray = load_image(np.full((5, 7), 0.5, np.float64))
    assert gray.size == (7, 5) and gray.getpixel((0, 0)) == (128, 128, 128)
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    assert load_image(rgba).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(_img().convert("L")).mode == "RGB"
    assert load_image(_img().convert("P")).mode == "RGB"


def test_alpha_on_white(tmp_path: Path) -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    p = tmp_path / "a.png"
    Image.fromarray(a, "RGBA").save(p)
    im = load_image(p)
    assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((0, 3)) == (255, 255, 255)
    la = Image.fromarray(np.zeros((2, 2, 2), np.uint8), "LA")
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation(tmp_path: Path) -> None:
    im = _img(30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "r.jpg"
    im.save(p, "JPEG", exif=exif.tobytes())
    assert load_image(p).size == (20, 30)
    assert load_image(Image.open(p)).size == (20, 30)


def test_bomb_refused_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(p)
    with pytest.raises(ImageError) as e:
        load_image(p, max_pixels=10_000)
    msg = str(e.value)
    assert "60000" in msg and "10000" in msg and "max_pixels" in msg and str(p) in msg
    assert load_image(p, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(np.zeros((200, 300, 3), np.uint8), max_pixels=10_000)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(Image.new("RGB", (300, 200)), max_pixels=10_000)


def test_bomb_header_only() -> None:
    """A PNG header claiming 100000 x 100000 is refused from the header alone."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    with pytest.raises(ImageError, match="10000000000 pixels, over the limit of 64000000 pixels"):
        load_image(png + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="over the limit of 2000000000 pixels"):
        load_image(png + chunk(b"IEND", b""), max_pixels=2_000_000_000)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"not found") as e:
        load_image(tmp_path / "none.png")
    assert "none.png" in str(e.value)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "t.txt").write_text("hello, not an image")
    with pytest.raises(ImageError, match=r"t\.txt: not an image"):
        load_image(tmp_path / "t.txt")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "e.png")
    good = io.BytesIO()
    _img(64, 64).save(good, "PNG")
    (tmp_path / "c.png").write_bytes(good.getvalue()[:60])
    with pytest.raises(ImageError, match=r"c\.png: image is corrupt"):
        load_image(tmp_path / "c.png")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"GIF89?junk")
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2, 3), 3.0))
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.zeros((2, 2, 3), np.int64))
    with pytest.raises(ImageError, match="unsupported"):
        load_image(12345)  # type: ignore[arg-type]


def test_select_best_resolution_matches_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution as hf

    pins = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]
    for size in [(100, 1000), (1000, 100), (500, 500), (10, 12), (2000, 900), (384, 768)]:
        assert select_best_resolution(size, pins) == tuple(hf(size, pins))


def test_token_count_matches_transformers_processor() -> None:
    """Our count == LlavaOnevisionProcessor._get_number_of_features (with anyres_max_N off/on)."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    pins = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    for ratio in ("anyres", "anyres_max_2"):
        cfg = RConfig.from_dict({**tiny_config().to_dict(), "image_grid_pinpoints": pins,
                                 "vision_aspect_ratio": ratio,
                                 "vision_config": {**tiny_config().vision_config, "image_size": 384,
                                                   "patch_size": 14}})
        proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        proc.num_image_tokens = 729
        proc.vision_aspect_ratio = "anyres_max_1000000" if ratio == "anyres" else ratio
        proc.image_processor = type("IP", (), {"image_grid_pinpoints": pins})()
        for hw in [(100, 1000), (1000, 100), (500, 500), (300, 770), (1500, 1100), (7, 9)]:
            assert count_image_tokens(hw, cfg) == proc._get_number_of_features(*hw, 384, 384), (ratio, hw)


def test_prepare_image_views_and_key() -> None:
    cfg = tiny_config(anyres=True)
    p = prepare_image(_img(90, 30), cfg)
    assert p.grid == (1, 2) and p.pixel_values.shape == (3, 3, 32, 32) and p.pixel_values.dtype == np.float32
    assert p.orig_size == (30, 90) and p.n_tokens == count_image_tokens((30, 90), cfg)
    assert -1.0 <= p.pixel_values.min() and p.pixel_values.max() <= 1.0
    # padding rows (top/bottom of the 32x64 canvas) are black -> -1 after normalisation
    assert np.allclose(p.pixel_values[1, :, 0, :], -1.0)
    base = np.asarray(_img(90, 30).resize((32, 32), Image.BICUBIC), np.float32) / 127.5 - 1.0
    assert np.allclose(p.pixel_values[0], base.transpose(2, 0, 1), atol=1e-6)
    assert prepare_image(_img(90, 30), cfg).key == p.key != prepare_image(_img(91, 30), cfg).key
    q = prepare_image(_img(90, 30), tiny_config(anyres=False))
    assert q.grid == (0, 0) and q.pixel_values.shape == (1, 3, 32, 32) and q.n_tokens == 16


def test_prepare_image_accepts_sources(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    _img().save(p)
    cfg = tiny_config()
    assert prepare_image(p, cfg).key == prepare_image(np.asarray(_img()), cfg).key


@pytest.mark.parametrize("fmt", ["TIFF", "TGA", "PCX", "ICO", "SGI", "DDS", "SPIDER", "PPM", "EPS"])
def test_other_formats_never_decoded(tmp_path: Path, fmt: str) -> None:
    """Only PNG/JPEG/WebP/GIF/BMP reach a decoder (EPS would run Ghostscript on the bytes)."""
    if fmt == "EPS":  # a minimal EPS header: Pillow would hand it to Ghostscript on load()
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    else:
        buf = io.BytesIO()
        im = _img(16, 16)
        (im.convert("F") if fmt == "SPIDER" else im).save(buf, fmt)
        data = buf.getvalue()
    for src in (data, tmp_path / "x.png"):
        (tmp_path / "x.png").write_bytes(data)  # the name does not matter, the bytes do
        with pytest.raises(ImageError, match="not an image in an accepted format"):
            load_image(src)


def test_gif_and_phone_jpeg_accepted() -> None:
    buf = io.BytesIO()
    _img().save(buf, "GIF")
    assert load_image(buf.getvalue()).size == (30, 20)
    buf = io.BytesIO()
    _img().save(buf, "MPO")  # what many phones write: a JPEG with extra pictures
    assert load_image(buf.getvalue()).size == (30, 20)


def test_huge_header_is_image_too_large() -> None:
    """Over Pillow's own 2 x 89 MP bomb limit the error is still the typed too-large error."""
    import struct
    import zlib

    from r4b_edge.errors import ImageTooLargeError

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 10_000, 8, 2, 0, 0, 0))
    with pytest.raises(ImageTooLargeError) as e:
        load_image(png + chunk(b"IEND", b""), max_pixels=25_000_000)
    assert (e.value.pixels, e.value.limit) == (200_000_000, 25_000_000)
    with pytest.raises(ImageTooLargeError) as e:
        load_image(png + chunk(b"IEND", b""), max_pixels=100_000)
    assert e.value.pixels == 200_000_000


def test_default_max_pixels_follows_the_model() -> None:
    from r4b_edge.model.processing import default_max_pixels

    tiny = tiny_config()
    assert default_max_pixels(tiny) == 4096 * 3072  # a 64-px model: the floor
    big = RConfig.from_dict({**tiny.to_dict(), "image_grid_pinpoints": [[384, 384], [2304, 2304]]})
    assert default_max_pixels(big) == 4 * 2304 * 2304
