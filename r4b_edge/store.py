"""The model store: models fetched by `r4b-edge pull`, looked up by name.

Layout under the store root (`$R4B_EDGE_HOME`, else the platform's cache folder):

    models/<owner>--<repo>--<format>-<quant>/   one finished entry: the model files + r4b-entry.json
    downloads/<owner>--<repo>/<commit>/         the repository as downloaded (kept with --keep-source;
                                                 partial files end in .part and are resumed)
    tmp/                                        entries being written; renamed into models/ when done

An entry appears in `models/` by one rename, so a failed or interrupted pull leaves none.
Names: `owner/repo:format-quant` (e.g. `YannQi/R-4B:gguf-Q4_K_M`); the bare repo id
`owner/repo` names the one entry of that repository (or the one for the requested backend).
This module is on the ground floor: no torch, no huggingface_hub.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import ModelFormatError, ModelNotFoundError, StoreError
from .fsutil import replace_dir

ENTRY_FILE = "r4b-entry.json"
FORMATS = ("gguf", "onnx", "hf")
BACKEND_FORMAT = {"llama": "gguf", "onnx": "onnx", "torch": "hf"}
# the hub's repo id rule (huggingface_hub validate_repo_id): owner/name of [\w.-], no '--' or '..'
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")


def store_root() -> Path:
    """`$R4B_EDGE_HOME` if set, else the platform's per-user cache folder + `r4b-edge`."""
    env = os.environ.get("R4B_EDGE_HOME")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
        return base / "r4b-edge" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "r4b-edge"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "r4b-edge"


def is_repo_id(text: str) -> bool:
    """True for `owner/name` as the hub spells repo ids (an optional `@revision` is not part of it)."""
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text


def entry_name(repo: str, fmt: str, quant: str | None) -> str:
    """The store name of `repo` converted to `fmt` at `quant` (`hf` has no quant)."""
    return f"{repo}:{fmt}" if fmt == "hf" or not quant else f"{repo}:{fmt}-{quant}"


def _folder_name(name: str) -> str:
    return name.replace("/", "--").replace(":", "--")


@dataclass
class Entry:
    """One stored model (the contents of its r4b-entry.json, plus where it lies)."""

    name: str
    repo: str
    revision: str          # what the user asked for (branch, tag or commit)
    commit: str            # the commit the files came from
    format: str            # gguf | onnx | hf
    quant: Optional[str]
    size: int              # bytes of the entry's files
    created: str           # ISO time of the pull
    source: Optional[str] = None  # the kept download folder (--keep-source), else None
    path: Optional[Path] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d


def models_dir(root: Path | None = None) -> Path:
    return (root or store_root()) / "models"


def downloads_dir(root: Path | None = None) -> Path:
    return (root or store_root()) / "downloads"


def tmp_dir(root: Path | None = None) -> Path:
    return (root or store_root()) / "tmp"


def entry_dir(name: str, root: Path | None = None) -> Path:
    return models_dir(root) / _folder_name(name)


def folder_size(path: Path) -> int:
    """Bytes of the regular files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _read_entry(folder: Path) -> Entry | None:
    try:
        doc = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
        fields = {k: doc[k] for k in Entry.__dataclass_fields__ if k != "path" and k in doc}
        return Entry(**fields, path=folder)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def list_entries(root: Path | None = None) -> list[Entry]:
    """Every complete entry in the store, by name. Folders without a readable
    r4b-entry.json (not made by `pull`) are not entries and are skipped."""
    base = models_dir(root)
    if not base.is_dir():
        return []
    found = [e for e in (_read_entry(p) for p in base.iterdir() if p.is_dir()) if e is not None]
    return sorted(found, key=lambda e: e.name.lower())


def commit_entry(tmp: Path, entry: Entry, root: Path | None = None) -> Entry:
    """Write r4b-entry.json into the finished folder `tmp` (inside the store's tmp/) and
    rename it into models/, replacing an earlier entry of the same name."""
    entry.size = folder_size(tmp)
    (tmp / ENTRY_FILE).write_text(json.dumps(entry.to_json(), indent=2) + "\n", encoding="utf-8")
    out = entry_dir(entry.name, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp, out)
    entry.path = out
    return entry


def find(name: str, backend: str | None = None, root: Path | None = None) -> Entry | None:
    """The entry called `name`, or for a bare repo id the single entry of that repo
    (narrowed to the format `backend` runs, unless backend is auto). None if not stored;
    ModelFormatError if a bare repo id matches several entries."""
    entries = list_entries(root)
    for e in entries:
        if e.name == name:
            return e
    same = [e for e in entries if e.repo == name]
    fmt = BACKEND_FORMAT.get(backend or "auto")
    if fmt:
        same = [e for e in same if e.format == fmt]
    if len(same) > 1:
        names = ", ".join(e.name for e in same)
        raise ModelFormatError(
            f"{len(same)} stored models match {name!r}: {names}; pass one of these names to --model "
            "(or --backend llama / onnx / torch to pick by format)")
    return same[0] if same else None


def resolve_model(model: str | os.PathLike, backend: str | None = None) -> Path:
    """What `--model` / `load(name)` means: a stored model first, then a path. A repo id
    that is neither stored nor a path raises ModelNotFoundError naming the `pull` to run."""
    text = os.fspath(model)
    if isinstance(model, str):
        e = find(text, backend)
        if e is not None and e.path is not None:
            return e.path
    p = Path(text).expanduser()
    if p.exists():
        return p
    repo = text.split(":", 1)[0]
    if isinstance(model, str) and is_repo_id(repo):
        fmt = text.split(":", 1)[1] if ":" in text else None
        hint = f"r4b-edge pull {repo}"
        if fmt:
            f, _, q = fmt.partition("-")
            hint += f" --format {f}" + (f" --quant {q}" if q else "")
        raise ModelNotFoundError(
            f"{text!r} is not in the model store ({models_dir()}) and is not a path; nothing was downloaded. "
            f"Fetch and convert it with: {hint}   (see `r4b-edge list` for what is stored)")
    return p


def remove(name: str, root: Path | None = None) -> Entry:
    """Delete the entry `name` (full name or a repo id that names one entry)."""
    e = find(name, root=root)
    if e is None or e.path is None:
        known = ", ".join(x.name for x in list_entries(root)) or "none"
        raise StoreError(f"no stored model called {name!r} in {models_dir(root)} (stored: {known})")
    trash = e.path.parent / f".{e.path.name}.rm-{os.getpid()}"
    os.replace(e.path, trash)  # gone from the listing at once, even if the delete below is slow
    shutil.rmtree(trash, ignore_errors=True)
    return e
