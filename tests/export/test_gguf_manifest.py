"""export/manifest.py: atomic writes and the up-to-date check shared by the GGUF and ONNX exporters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r4b_edge.errors import ExportError
from r4b_edge.export.manifest import is_up_to_date, read_manifest, sha256_file, write_manifest
from r4b_edge.fsutil import atomic_write


@pytest.fixture()
def setup(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    out = tmp_path / "out"
    with atomic_write(out / "a.bin") as tmp:
        tmp.write_bytes(b"hello")
    write_manifest(out, [out / "a.bin"], src, "gguf", "F16", {"k": 1})
    return src, out


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]
    with atomic_write(p) as tmp:
        tmp.write_text("new")
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) != 0o600


def test_manifest_content(setup) -> None:
    src, out = setup
    m = read_manifest(out)
    assert m["files"] == [{"name": "a.bin", "bytes": 5, "sha256": sha256_file(out / "a.bin")}]
    assert m["format"] == "gguf" and m["quant"] == "F16" and m["extra"] == {"k": 1}
    assert m["source"] == str(src.resolve()) and "python" in m["tools"]
    json.dumps(m)


def test_up_to_date_detects_every_change(setup) -> None:
    src, out = setup
    assert is_up_to_date(out, src, "gguf", "F16", {"k": 1})
    assert not is_up_to_date(out, src, "gguf", "Q8_0", {"k": 1})
    assert not is_up_to_date(out, src, "onnx", "F16", {"k": 1})
    assert not is_up_to_date(out, src, "gguf", "F16", {"k": 2})
    (out / "a.bin").write_bytes(b"hellO")  # same size, other bytes
    assert not is_up_to_date(out, src, "gguf", "F16", {"k": 1})
    assert is_up_to_date(out, src, "gguf", "F16", {"k": 1}, check_hashes=False)
    (out / "a.bin").write_bytes(b"hello")
    (src / "config.json").write_text('{"changed": 1}')
    assert not is_up_to_date(out, src, "gguf", "F16", {"k": 1})
    assert not is_up_to_date(out / "nowhere", src, "gguf", "F16", {"k": 1})


def test_manifest_refuses_missing_or_outside_files(setup, tmp_path: Path) -> None:
    src, out = setup
    with pytest.raises(ExportError, match="was not written"):
        write_manifest(out, [out / "missing.bin"], src, "gguf", "F16")
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(b"x")
    with pytest.raises(ExportError, match="not inside the output folder"):
        write_manifest(out, [other], src, "gguf", "F16")
