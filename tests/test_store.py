"""The model store (r4b_edge/store.py): root, names, lookup order, errors. No network, no torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import r4b_edge
from r4b_edge import store
from r4b_edge.errors import ModelFormatError, ModelNotFoundError, StoreError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv("R4B_EDGE_HOME", str(root))
    return root


def _stored(root: Path, repo: str, fmt: str, quant: str | None, payload: str = "weights") -> store.Entry:
    tmp = store.tmp_dir(root) / f"t-{fmt}-{quant}"
    tmp.mkdir(parents=True)
    (tmp / "model.bin").write_text(payload)
    e = store.Entry(name=store.entry_name(repo, fmt, quant), repo=repo, revision="main", commit="c" * 40,
                    format=fmt, quant=quant, size=0, created="2026-12-01T00:00:00+00:00")
    return store.commit_entry(tmp, e, root)


def test_root_env_then_platform_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("R4B_EDGE_HOME", str(tmp_path / "h"))
    assert store.store_root() == tmp_path / "h"
    monkeypatch.delenv("R4B_EDGE_HOME")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert store.store_root() == tmp_path / "xdg" / "r4b-edge"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert store.store_root() == Path.home() / ".cache" / "r4b-edge"


@pytest.mark.parametrize("text,ok", [("YannQi/R-4B", True), ("a/b.c_d-e", True), ("R-4B", False),
                                     ("a/b/c", False), ("out/../x", False), ("a--b/c", False), ("/abs/path", False)])
def test_repo_id_rule(text, ok):
    assert store.is_repo_id(text) is ok


def test_commit_list_size_and_remove(home):
    e = _stored(home, "o/m", "gguf", "Q4_K_M", payload="x" * 1000)
    assert e.path == home / "models" / "o--m--gguf-Q4_K_M" and (e.path / store.ENTRY_FILE).is_file()
    assert not any(store.tmp_dir(home).iterdir())  # the temp folder was renamed, not copied
    (got,) = store.list_entries()
    assert (got.name, got.format, got.quant, got.commit) == ("o/m:gguf-Q4_K_M", "gguf", "Q4_K_M", "c" * 40)
    assert got.size == 1000
    (home / "models" / "stray").mkdir()  # not made by pull: no entry file, not listed
    assert [x.name for x in store.list_entries()] == ["o/m:gguf-Q4_K_M"]
    store.remove("o/m:gguf-Q4_K_M")
    assert store.list_entries() == [] and not e.path.exists()
    with pytest.raises(StoreError, match="no stored model called 'o/m'"):
        store.remove("o/m")


def test_store_name_wins_over_a_path_of_the_same_name(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o" / "m").mkdir(parents=True)  # a relative path spelled like the repo id
    e = _stored(home, "o/m", "onnx", "int4")
    assert store.resolve_model("o/m") == e.path
    assert store.resolve_model("o/m:onnx-int4") == e.path
    assert store.resolve_model(tmp_path / "o" / "m") == tmp_path / "o" / "m"  # a Path is a path


def test_bare_repo_id_several_formats_needs_a_choice(home):
    g = _stored(home, "o/m", "gguf", "Q8_0")
    o = _stored(home, "o/m", "onnx", "fp32")
    with pytest.raises(ModelFormatError, match="2 stored models match 'o/m'.*o/m:gguf-Q8_0, o/m:onnx-fp32"):
        store.resolve_model("o/m")
    assert store.resolve_model("o/m", backend="llama") == g.path
    assert store.resolve_model("o/m", backend="onnx") == o.path


def test_repo_not_stored_names_the_pull_and_downloads_nothing(home):
    with pytest.raises(ModelNotFoundError, match=r"r4b-edge pull YannQi/R-4B --format onnx --quant int4"):
        store.resolve_model("YannQi/R-4B:onnx-int4")
    with pytest.raises(ModelNotFoundError, match=r"not in the model store .*nothing was downloaded.*"
                                                 r"r4b-edge pull YannQi/R-4B"):
        r4b_edge.load("YannQi/R-4B")
    assert not home.exists()  # the lookup wrote nothing


def test_cli_list_and_rm(home):
    _stored(home, "o/m", "gguf", "Q4_K_M")
    run = [sys.executable, "-m", "r4b_edge.apps.cli"]
    out = subprocess.run(run + ["list"], capture_output=True, text=True, check=True).stdout
    assert "o/m:gguf-Q4_K_M" in out and "Q4_K_M" in out and "main" in out and "cccccccccccc" in out
    r = subprocess.run(run + ["rm", "nope/x"], capture_output=True, text=True)
    assert r.returncode == 1 and "no stored model called 'nope/x'" in r.stderr and "Traceback" not in r.stderr
    subprocess.run(run + ["rm", "o/m"], capture_output=True, text=True, check=True)
    assert "no stored models" in subprocess.run(run + ["list"], capture_output=True, text=True).stdout
