"""Export manifest (sha256 of every written file, source, format, quant, tool
versions). Files are written through `r4b_edge.fsutil.atomic_write`.

Typical use in an exporter::

    from r4b_edge.export.manifest import is_up_to_date, write_manifest
    from r4b_edge.fsutil import atomic_write

    if is_up_to_date(out_dir, source, fmt="gguf", quant="Q4_K_M"):
        return  # same inputs, files intact: re-running is a no-op
    with atomic_write(out_dir / "model-Q4_K_M.gguf") as tmp:
        writer.write(tmp)              # write to `tmp`; renamed on success
    write_manifest(out_dir, [out_dir / "model-Q4_K_M.gguf"], source, "gguf", "Q4_K_M")

The manifest is ``manifest.json`` in the output folder. ``source`` is a
checkpoint folder (or file); its fingerprint is the sha256 of the small
metadata files plus (name, size, mtime_ns) of the big weight files, so a check
never re-hashes gigabytes of safetensors.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from r4b_edge.errors import ExportError
from r4b_edge.fsutil import atomic_write

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SMALL_FILE = 8 << 20  # files below 8 MiB are hashed in full in the fingerprint
_TOOLS = ("r4b-edge", "gguf", "llama-cpp-python", "torch", "transformers", "onnx",
          "onnxruntime", "onnxscript", "safetensors", "tokenizers", "numpy")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(source: str | os.PathLike[str]) -> str:
    """Cheap, stable fingerprint of a checkpoint folder or file (see module doc)."""
    src = Path(source)
    if not src.exists():
        raise ExportError(f"source checkpoint {src} does not exist; pass an R-4B checkpoint folder")
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(src).as_posix() if src.is_dir() else p.name
        if rel.startswith(".") or "/." in rel:
            continue
        st = p.stat()
        h.update(rel.encode() + b"\0")
        if st.st_size < _SMALL_FILE:
            h.update(b"sha256:" + sha256_file(p).encode())
        else:
            h.update(f"size:{st.st_size}:mtime:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that shape the output (absent ones omitted)."""
    from importlib import metadata

    out: dict[str, str] = {"python": platform.python_version()}
    for name in _TOOLS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _norm_extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    # round-trip through json so comparisons see what the file holds
    return json.loads(json.dumps(extra or {}, sort_keys=True, default=str))


def write_manifest(out_dir: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]],
                   source: str | os.PathLike[str], fmt: str, quant: str,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/manifest.json`` (atomically) describing ``files`` (which
    must lie in ``out_dir``): name, bytes, sha256 each, plus source path and
    fingerprint, format, quant, tool versions and ``extra``. Returns its path."""
    out = Path(out_dir)
    entries = []
    for f in files:
        p = Path(f)
        if not p.is_absolute() and (out / p).is_file():
            p = out / p  # a name inside out_dir; otherwise a path relative to the cwd
        if not p.is_file():
            raise ExportError(f"manifest: {p} was not written; the export did not finish")
        try:
            name = p.resolve().relative_to(out.resolve()).as_posix()
        except ValueError as e:
            raise ExportError(f"manifest: {p} is not inside the output folder {out}") from e
        entries.append({"name": name, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    doc = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "quant": quant,
        "source": str(Path(source).resolve()),
        "source_fingerprint": source_fingerprint(source),
        "files": entries,
        "tools": tool_versions(),
        "extra": _norm_extra(extra),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / MANIFEST_NAME
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed manifest of ``out_dir``, or None when absent or unreadable."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_up_to_date(out_dir: str | os.PathLike[str], source: str | os.PathLike[str], fmt: str,
                  quant: str, extra: dict[str, Any] | None = None,
                  check_hashes: bool = True) -> bool:
    """True when ``out_dir`` holds a manifest for the same source fingerprint,
    format, quant, ``extra`` and r4b-edge/gguf/llama-cpp-python/onnx versions,
    and every listed file is present with the recorded size (and sha256 when
    ``check_hashes``). Then re-running the export is a no-op."""
    doc = read_manifest(out_dir)
    if doc is None or doc.get("manifest_version") != MANIFEST_VERSION:
        return False
    if doc.get("format") != fmt or doc.get("quant") != quant:
        return False
    if doc.get("extra", {}) != _norm_extra(extra):
        return False
    try:
        if doc.get("source_fingerprint") != source_fingerprint(source):
            return False
    except ExportError:
        return False
    now = tool_versions()
    for tool in ("r4b-edge", "gguf", "llama-cpp-python", "onnx", "onnxruntime", "torch"):
        if doc.get("tools", {}).get(tool) != now.get(tool):
            return False
    files = doc.get("files") or []
    if not files:
        return False
    for e in files:
        p = Path(out_dir) / e["name"]
        if not p.is_file() or p.stat().st_size != e.get("bytes"):
            return False
        if check_hashes and sha256_file(p) != e.get("sha256"):
            return False
    return True
