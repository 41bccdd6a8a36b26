"""Download an R-4B repository from the Hugging Face Hub (or any `HF_ENDPOINT`) with
huggingface_hub: listing with the hub's hashes, the small files first (validated before
anything large is fetched), then the weights, each resumable across runs and checked
against the hub's sha256 (LFS files) or git blob id (small files).

huggingface_hub's own `hf_hub_download` deletes a partial file when it is interrupted, so
a Ctrl-C would restart a 9 GB shard from zero; here each file is fetched with the library's
`http_get` (its progress bar, retries and in-call resume) into `<name>.part`, which a later
run continues from its current size with an HTTP Range request.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

from r4b_edge.errors import DownloadError, ModelFormatError
from r4b_edge.fsutil import atomic_write

SMALL_FILES = ("config.json", "preprocessor_config.json", "generation_config.json", "tokenizer_config.json",
               "model.safetensors.index.json", "chat_template.jinja", "chat_template.json",
               "special_tokens_map.json", "added_tokens.json")
_WANTED_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".py", ".model", ".md")
VERIFIED_FILE = ".r4b-verified.json"
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass
class RemoteFile:
    """One file of the repository as the hub lists it."""

    name: str
    size: int
    sha256: Optional[str]   # LFS files
    blob_id: Optional[str]  # git blob sha1 (small files)


@dataclass
class Listing:
    repo: str
    revision: str
    commit: str
    files: list[RemoteFile]

    def file(self, name: str) -> RemoteFile | None:
        return next((f for f in self.files if f.name == name), None)


def endpoint() -> str:
    """The hub this run talks to: `$HF_ENDPOINT`, else huggingface.co (read at call time)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def parse_ref(ref: str) -> tuple[str, str]:
    """`owner/name[@revision]` -> (repo, revision); revision defaults to `main`."""
    from r4b_edge.store import is_repo_id

    repo, _, rev = ref.partition("@")
    if not is_repo_id(repo):
        raise DownloadError(f"{ref!r} is not a hub repository id: write owner/name, optionally @revision "
                            "(e.g. YannQi/R-4B or YannQi/R-4B@main)")
    return repo, rev or "main"


def _manual_route(repo: str) -> str:
    return (f"Manual route: on a machine with access run `hf download {repo} --local-dir R-4B`, copy the "
            "folder here, then `r4b-edge export R-4B --format gguf --out R-4B-gguf` and "
            "`r4b-edge chat IMAGE --model R-4B-gguf`")


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def hub_errors(repo: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one DownloadError that names the fix."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
    )

    ep = endpoint()
    try:
        yield
    except GatedRepoError as e:
        raise DownloadError(
            f"{repo} on {ep} is gated (HTTP {e.response.status_code}): accept its terms on the repository page, "
            "then give this machine a token with read access: `export HF_TOKEN=hf_...` or run `hf auth login`"
        ) from None
    except RepositoryNotFoundError as e:
        raise DownloadError(
            f"{repo} was not found on {ep} (HTTP {e.response.status_code}): check the name; if it is private, "
            "give a token with access: `export HF_TOKEN=hf_...` or run `hf auth login`") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo} has no revision {revision!r} on {ep}: use a branch, tag or commit "
                            f"that exists (e.g. {repo}@main)") from None
    except OfflineModeIsEnabled:
        raise DownloadError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it to pull {repo}. "
                            + _manual_route(repo)) from None
    except HfHubHTTPError as e:
        raise DownloadError(f"the hub at {ep} answered HTTP {e.response.status_code} for {repo}: "
                            f"{str(e).splitlines()[0]}") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as e:
        raise DownloadError(
            f"cannot reach the hub at {ep} ({type(e).__name__}: {e}); check the network, HF_ENDPOINT "
            f"(now {os.environ.get('HF_ENDPOINT') or 'unset'}) and HF_HUB_OFFLINE. " + _manual_route(repo)
        ) from None


def list_repo(repo: str, revision: str, token: str | None = None) -> Listing:
    """The repository's files at `revision` with sizes and the hub's hashes."""
    from huggingface_hub import HfApi

    if _offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it to pull {repo}. "
                            + _manual_route(repo))
    with hub_errors(repo, revision):
        info = HfApi(endpoint=endpoint(), token=token).model_info(repo, revision=revision, files_metadata=True)
    files = []
    for s in info.siblings or []:
        files.append(RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else (s.size or 0)),
                                s.lfs.sha256 if s.lfs else None, s.blob_id))
    if not info.sha:
        raise DownloadError(f"the hub at {endpoint()} gave no commit for {repo}@{revision}")
    return Listing(repo, revision, info.sha, files)


def wanted_files(listing: Listing) -> list[RemoteFile]:
    """The files a conversion needs: top-level configs, tokenizer, safetensors weights, remote code, card."""
    return [f for f in listing.files if "/" not in f.name and f.name.endswith(_WANTED_SUFFIXES)]


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_hash(rf: RemoteFile, etag: str | None) -> tuple[str, str]:
    """(kind, hex) the file must match: the listing's hash, which the HEAD's etag must agree with."""
    kind, want = ("sha256", rf.sha256) if rf.sha256 else ("git-sha1", rf.blob_id)
    if etag and want and etag != want:
        raise DownloadError(f"{rf.name}: the hub's listing says {kind} {want} but its file answers etag {etag}; "
                            "the repository changed during the pull: run it again")
    if not want and etag and len(etag) in (40, 64):
        kind, want = ("sha256" if len(etag) == 64 else "git-sha1"), etag
    if not want:
        raise DownloadError(f"{rf.name}: the hub gave no hash for this file, so it cannot be verified")
    return kind, want


class Downloader:
    """Fetches files of one listing into `folder` (resumable, verified)."""

    def __init__(self, listing: Listing, folder: Path, token: str | None = None):
        self.listing, self.folder, self.token = listing, folder, token
        self.folder.mkdir(parents=True, exist_ok=True)
        self._verified_path = folder / VERIFIED_FILE
        try:
            self.verified: dict[str, str] = json.loads(self._verified_path.read_text())
        except (OSError, ValueError):
            self.verified = {}

    def part_path(self, rf: RemoteFile) -> Path:
        return self.folder / f"{rf.name}.part"

    def remaining_bytes(self, files: list[RemoteFile]) -> int:
        """Bytes still to fetch for `files` (complete files count 0, partial ones their rest)."""
        total = 0
        for rf in files:
            if self._done(rf):
                continue
            part = self.part_path(rf)
            total += rf.size - (part.stat().st_size if part.exists() else 0)
        return max(total, 0)

    def _done(self, rf: RemoteFile) -> bool:
        want = rf.sha256 or rf.blob_id
        p = self.folder / rf.name
        return p.is_file() and p.stat().st_size == rf.size and want is not None and self.verified.get(rf.name) == want

    def fetch(self, files: list[RemoteFile]) -> None:
        for rf in files:
            self.fetch_one(rf)

    def fetch_one(self, rf: RemoteFile) -> Path:
        """Download one file (continuing a .part), check size and hash, move it into place."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        final = self.folder / rf.name
        if self._done(rf):
            return final
        repo, commit = self.listing.repo, self.listing.commit
        url = hf_hub_url(repo, rf.name, revision=commit, endpoint=endpoint())
        with hub_errors(repo, commit):
            meta = get_hf_file_metadata(url, token=self.token, endpoint=endpoint())
        kind, want = _expected_hash(rf, meta.etag)
        size = meta.size if meta.size is not None else rf.size
        part = self.part_path(rf)
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not a prefix of this file: start over
            part.unlink()
            have = 0
        final.unlink(missing_ok=True)
        headers = build_hf_headers(token=self.token)
        if _origin(meta.location) != _origin(url):
            headers.pop("authorization", None)  # as hf_hub_download: the token stays on the hub, not its CDN
        with hub_errors(repo, commit), open(part, "ab", buffering=0) as f:  # unbuffered: what arrived is on disk
            http_get(meta.location, f, resume_size=have, headers=headers, expected_size=size,
                     displayed_filename=rf.name)
        got = _sha256(part) if kind == "sha256" else _git_blob_sha1(part)
        if got != want:
            part.unlink()
            raise DownloadError(
                f"{rf.name} from {repo}@{commit[:12]} is corrupted: {kind} {got} but the hub says {want} "
                f"({size} bytes received); the file was deleted, run the pull again")
        os.replace(part, final)
        self.verified[rf.name] = want
        with atomic_write(self._verified_path) as tmp:
            tmp.write_text(json.dumps(self.verified, indent=1))
        return final


def validate_layout(listing: Listing, folder: Path) -> dict:
    """Refuse a repository that is not the R-4B layout, from its small files only (already
    downloaded into `folder`). Returns the parsed config.json."""
    from r4b_edge.model.config import RConfig

    where = f"{listing.repo}@{listing.commit[:12]}"
    names = {f.name for f in listing.files}
    if "config.json" not in names:
        raise DownloadError(f"{where} has no config.json: not a model repository in the R-4B layout")
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise DownloadError(f"{where}: config.json is not JSON ({e})") from None
    mt, arch = cfg.get("model_type"), cfg.get("architectures") or []
    if mt != "R" and "RForConditionalGeneration" not in arch:
        raise DownloadError(
            f"{where} is not an R-4B repository: config.json has model_type={mt!r}, architectures={arch} "
            "(expected model_type 'R' / RForConditionalGeneration); nothing large was downloaded")
    try:
        RConfig.from_dict(cfg, source=f"{where}/config.json")
    except ModelFormatError as e:
        raise DownloadError(f"{where}: {e}; nothing large was downloaded") from None
    if "tokenizer.json" not in names:
        raise DownloadError(f"{where} has no tokenizer.json (the fast tokenizer r4b-edge reads)")
    weights = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if not weights:
        raise DownloadError(f"{where} has no .safetensors weights at the top level "
                            "(pytorch_model*.bin is not read by r4b-edge)")
    if "model.safetensors.index.json" in names:
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
            shards = set(index["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DownloadError(f"{where}: model.safetensors.index.json has no weight_map ({e})") from None
        missing = sorted(shards - set(weights))
        if missing:
            raise DownloadError(f"{where}: the index names shards the repository lacks: {', '.join(missing)}")
        keys = list(index["weight_map"])
        if not any("language_model" in k for k in keys) or not any("vision_tower" in k for k in keys):
            raise DownloadError(f"{where}: the weight index has no language_model / vision_tower tensors, "
                                "so this is not the R-4B checkpoint layout")
    return cfg


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def ensure_free(path: Path, need: int, what: str) -> None:
    """Raise DownloadError when the disk under `path` has less than `need` bytes free."""
    free = free_bytes(path)
    if free < need:
        raise DownloadError(f"not enough disk space under {path}: {what} needs about {need / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB are free; free some space or point R4B_EDGE_HOME elsewhere")
