"""A tiny Hugging Face Hub on 127.0.0.1 for tests and benchmarks (no network): the routes
huggingface_hub uses to list a repository and download its files, with hooks that misbehave on
purpose. Files are held in memory (bytes) or, with `Repo.from_folder(..., in_memory=False)`,
read from disk on each request, so a multi-GB checkpoint (the true-size bench) costs no RAM.

Routes (as huggingface_hub 2.4 calls them):
- GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  -> {"id", "sha", "siblings": [...]}
  (siblings carry size, blobId and, for LFS files, lfs {size, sha256, pointerSize})
- HEAD /{repo}/resolve/{rev}/{file} -> X-Repo-Commit, ETag, and for LFS files X-Linked-Etag
  (the sha256) and X-Linked-Size; Content-Length
- GET  /{repo}/resolve/{rev}/{file} -> the bytes; `Range: bytes=N-` answers 206 + Content-Range
- errors carry X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound) as the hub does
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


_CHUNK = 8 << 20


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def _size(data: bytes | Path) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def _chunks(data: bytes | Path, start: int = 0, end: int | None = None):
    """The bytes [start, end) of an in-memory or on-disk file, in chunks of at most 8 MiB."""
    end = _size(data) if end is None else end
    if not isinstance(data, Path):
        for i in range(start, end, _CHUNK):
            yield data[i:min(i + _CHUNK, end)]
        return
    with open(data, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            b = f.read(min(_CHUNK, end - pos))
            if not b:
                return
            pos += len(b)
            yield b


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes | Path]
    lfs: set[str] = field(default_factory=set)
    gated: bool = False
    _hashes: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, folder: Path, commit: str, lfs_suffixes=(".safetensors", "tokenizer.json"),
                    in_memory: bool = True) -> "Repo":
        files = {p.name: (p.read_bytes() if in_memory else p.resolve())
                 for p in sorted(folder.iterdir()) if p.is_file()}
        return cls(commit, files, {n for n in files if n.endswith(lfs_suffixes)})

    def _hash(self, name: str, kind: str) -> str:
        """sha256 or git blob sha1 of a file, streamed; kept for on-disk files (tests swap bytes in place)."""
        data = self.files[name]
        key = (kind, data) if isinstance(data, Path) else None
        if key is None or key not in self._hashes:
            h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(f"blob {_size(data)}\0".encode())
            for b in _chunks(data):
                h.update(b)
            if key is None:
                return h.hexdigest()
            self._hashes[key] = h.hexdigest()
        return self._hashes[key]

    def etag(self, name: str) -> str:
        return self._hash(name, "sha256" if name in self.lfs else "sha1")

    def sibling(self, name: str) -> dict:
        n = _size(self.files[name])
        d = {"rfilename": name, "size": n, "blobId": self._hash(name, "sha1")}
        if name in self.lfs:
            d["lfs"] = {"size": n, "sha256": self._hash(name, "sha256"), "pointerSize": 134}
        return d


class LocalHub:
    """Serve `repos` on a free port in a daemon thread. Hooks (sets of file names):
    `drop_once` sends half a file then closes the connection (once per file);
    `corrupt` serves bytes that differ from the hashes; `stall` sends half then waits for
    `release` (for Ctrl-C tests). `requests` logs (method, path, Range header, has Authorization)."""

    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.drop_once: set[str] = set()
        self.corrupt: set[str] = set()
        self.stall: set[str] = set()
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.requests: list[tuple[str, str, str | None, bool]] = []
        self.cdn_host: str | None = None  # e.g. "localhost": LFS files redirect (302) there, as the hub does
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def requested(self, name: str) -> list[tuple[str, str, str | None, bool]]:
        """Logged requests for file `name` (any repo, any revision, hub or CDN)."""
        return [r for r in self.requests
                if ("/resolve/" in r[1] or r[1].startswith("/cdn/")) and r[1].endswith("/" + name)]

    # ---- routing --------------------------------------------------------------------------
    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h, repo_id: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", head)
            return None
        if repo.gated and "authorization" not in {k.lower() for k in h.headers}:
            self._error(h, 401, "GatedRepo", head)
            return None
        return repo

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range"),
                              "authorization" in {k.lower() for k in h.headers}))
        if path.startswith("/cdn/"):  # the storage host: no auth, bytes only
            parts = path[len("/cdn/"):].split("/")
            repo = self.repos.get("/".join(parts[:2]))
            name = "/".join(parts[3:])
            if repo is None or name not in repo.files:
                return self._error(h, 404, "NotFound", head)
            return self._file(h, repo, name, head)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            repo_id, _, rev = rest.partition("/revision/")
            repo = self._repo(h, repo_id, head)
            if repo is None:
                return
            if rev not in ("", "main", repo.commit):
                return self._error(h, 404, "RevisionNotFound", head)
            doc = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "gated": repo.gated,
                   "siblings": [repo.sibling(n) for n in repo.files]}
            return self._send(h, json.dumps(doc).encode(), {"Content-Type": "application/json"}, head)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._repo(h, repo_id, head)
            if repo is None:
                return
            if rev not in ("main", repo.commit):
                return self._error(h, 404, "RevisionNotFound", head)
            if name not in repo.files:
                return self._error(h, 404, "EntryNotFound", head)
            if self.cdn_host and name in repo.lfs:
                return self._redirect(h, repo, repo_id, name)
            return self._file(h, repo, name, head)
        self._error(h, 404, "NotFound", head)

    def _redirect(self, h, repo: Repo, repo_id: str, name: str) -> None:
        port = self.server.server_address[1]
        h.send_response(302)
        h.send_header("Location", f"http://{self.cdn_host}:{port}/cdn/{repo_id}/{repo.commit}/{name}")
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("X-Linked-Etag", f'"{repo.etag(name)}"')
        h.send_header("X-Linked-Size", str(_size(repo.files[name])))
        h.send_header("ETag", f'"{repo.etag(name)}"')
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _send(self, h, body: bytes, headers: dict[str, str], head: bool, status: int = 200) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _file(self, h, repo: Repo, name: str, head: bool) -> None:
        data = repo.files[name]
        size = _size(data)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name in repo.lfs:
            headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
            headers["X-Linked-Size"] = str(size)
        start, status = 0, 200
        rng = h.headers.get("Range")
        if not head and rng and rng.startswith("bytes=") and rng.endswith("-"):
            start, status = int(rng[len("bytes="):-1]), 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(size - start))
        h.end_headers()
        if head:
            return
        cut = name in self.drop_once or name in self.stall
        end = start + (size - start) // 2 if cut else size
        first = True
        for b in _chunks(data, start, end):
            if first and start == 0 and name in self.corrupt:
                b = bytes([b[0] ^ 0xFF]) + b[1:]
            first = False
            h.wfile.write(b)
        if not cut:
            return
        h.wfile.flush()
        if name in self.stall:
            self.stall.discard(name)
            self.stalled.set()
            self.release.wait(60)
        self.drop_once.discard(name)
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
