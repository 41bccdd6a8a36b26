"""Find the text + mmproj GGUF pair by header metadata, reading only the headers.

A GGUF file starts with its key/value metadata; `read_header_keys` reads keys in
order and stops as soon as it has the ones asked for, so looking at a 2 GB model
costs a few kilobytes and a truncated or foreign `.gguf` is simply "unreadable".
The mmproj that belongs to a text model is the `clip` file whose projection width
(`clip.vision.projection_dim`) is the text model's `{arch}.embedding_length`; when
several match, the one whose `general.name` is `mmproj-<text name>` (what
`r4b-edge export` and llama.cpp's converters write) wins.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Optional

from ..errors import ModelFormatError, ModelNotFoundError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 26  # a header string over 64 MiB means the file is not a GGUF header


class _Header:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("the header ends early (truncated file)")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise ValueError(f"a header string claims {n} bytes")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            n = self.unpack("<Q")
            if n > _MAX_STRING:
                raise ValueError(f"a header string claims {n} bytes")
            self.f.seek(n, 1)
            return None
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS and not keep:
                self.f.seek(count * struct.calcsize(_SCALARS[itype]), 1)
                return None
            items = [self.value(itype, keep) for _ in range(count)]
            return items if keep else None
        raise ValueError(f"unknown value type {vtype}")


def read_header_keys(path: str | Path, wanted: Iterable[str]) -> dict[str, Any]:
    """The values of the `wanted` keys present in a GGUF header (reading stops once all are found).
    Raises ValueError for a file that is not a readable GGUF header."""
    p = Path(path)
    want = set(wanted)
    out: dict[str, Any] = {}
    with open(p, "rb") as f:
        h = _Header(f, p)
        if h.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = h.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        h.unpack("<Q")  # tensor count
        n_kv = h.unpack("<Q")
        for _ in range(n_kv):
            if want <= set(out):
                break
            key = h.string()
            vtype = h.unpack("<I")
            val = h.value(vtype, keep=key in want)
            if key in want:
                out[key] = val
    return out


def data_size_ok(path: str | Path) -> bool:
    """Whether the file is as long as its header says (a cut-short download is not).
    Reads the whole header (keys and tensor table), never the tensor data."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    with open(p, "rb") as f:
        h = _Header(f, p)
        if h.read(4) != b"GGUF" or h.unpack("<I") not in (2, 3):
            return False
        n_tensors, n_kv = h.unpack("<Q"), h.unpack("<Q")
        align = 32
        for _ in range(n_kv):
            key = h.string()
            val = h.value(h.unpack("<I"), keep=key == "general.alignment")
            if key == "general.alignment":
                align = int(val)
        end = 0
        for _ in range(n_tensors):
            h.string()
            dims = [h.unpack("<Q") for _ in range(h.unpack("<I"))]
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(h.unpack("<I"))]
            n = 1
            for d in dims:
                n *= d
            end = max(end, h.unpack("<Q") + n // block * size)
        start = -(-f.tell() // align) * align
    return p.stat().st_size >= start + end


class GGUFInfo:
    """What the pairing needs from one file's header."""

    def __init__(self, path: Path, keys: dict[str, Any]):
        self.path = path
        self.arch = str(keys.get("general.architecture") or "")
        self.name = str(keys.get("general.name") or "")
        self.width = keys.get(f"{self.arch}.embedding_length") if self.arch != "clip" \
            else keys.get("clip.vision.projection_dim")

    @property
    def is_mmproj(self) -> bool:
        return self.arch == "clip"


def gguf_info(path: Path) -> GGUFInfo:
    """Header metadata of one file (ValueError/OSError when it is not a readable GGUF)."""
    arch = read_header_keys(path, ["general.architecture"]).get("general.architecture", "")
    keys = ["general.architecture", "general.name",
            "clip.vision.projection_dim" if arch == "clip" else f"{arch}.embedding_length"]
    return GGUFInfo(path, read_header_keys(path, keys))


def _scan(folder: Path, skip: Optional[Path]) -> tuple[list[GGUFInfo], list[tuple[Path, str]]]:
    good, bad = [], []
    for x in sorted(folder.glob("*.gguf")):
        if x.name.startswith(".") or x == skip or not x.is_file():
            continue
        try:
            info = gguf_info(x)
            if info.is_mmproj and not data_size_ok(x):
                raise ValueError("shorter than its header says (an unfinished download?)")
            good.append(info)
        except (OSError, ValueError, KeyError) as e:
            bad.append((x, str(e)))
    return good, bad


def _pick_mmproj(text: GGUFInfo, projs: list[GGUFInfo], folder: Path) -> Path:
    if not projs:
        raise ModelFormatError(f"no mmproj (arch 'clip') .gguf beside {text.path.name} in {folder}: "
                               "export both with `r4b-edge export --format gguf`")
    fits = [m for m in projs if text.width is None or m.width is None or m.width == text.width]
    if not fits:
        raise ModelFormatError(
            f"no mmproj in {folder} fits {text.path.name} (text width {text.width}; mmproj widths "
            f"{', '.join(f'{m.path.name}: {m.width}' for m in projs)}): pass the right one with mmproj=")
    if len(fits) > 1:
        named = [m for m in fits if text.name and m.name == f"mmproj-{text.name}"]
        fits = named if len(named) == 1 else fits
    if len(fits) > 1:
        raise ModelFormatError(f"{len(fits)} mmproj files in {folder} fit {text.path.name} "
                               f"({', '.join(m.path.name for m in fits)}): keep one beside the text model "
                               "or pass mmproj=")
    return fits[0].path


def find_gguf_pair(path: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path]:
    """(text .gguf, mmproj .gguf) from a .gguf file (its mmproj found beside it by metadata)
    or a folder holding one text model and its mmproj. Only headers are read; when a file is
    named, other .gguf files that cannot be read (half-downloaded, not GGUF) are ignored."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {p} does not exist: pass a .gguf file or a folder of GGUF files")
    if p.is_file():
        try:
            text = gguf_info(p)
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{p}: not a readable GGUF file ({e})") from None
        if text.is_mmproj:
            raise ModelFormatError(f"{p} is an mmproj (vision) file: pass the text model .gguf instead")
        folder = p.parent
        others, _unreadable = _scan(folder, skip=p) if mmproj is None else ([], [])
    else:
        folder = p
        found, unreadable = _scan(folder, skip=None)
        texts = [g for g in found if not g.is_mmproj]
        if unreadable:
            raise ModelFormatError(
                f"{folder} holds .gguf files that are not readable GGUF ({'; '.join(f'{x.name}: {why}' for x, why in unreadable)}): "
                "pass the text model .gguf file to use")
        if len(texts) != 1:
            what = "no text-model .gguf" if not texts else \
                f"{len(texts)} text-model .gguf files ({', '.join(g.path.name for g in texts)})"
            raise ModelFormatError(f"{p} holds {what}: pass the .gguf file to use")
        text, others = texts[0], found
    if mmproj is not None:
        mm = Path(mmproj).expanduser()
        if not mm.is_file():
            raise ModelNotFoundError(f"mmproj {mm} not found")
        return text.path, mm
    return text.path, _pick_mmproj(text, [g for g in others if g.is_mmproj], folder)
