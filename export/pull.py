"""`r4b-edge pull`: download an R-4B repository from the hub, convert it locally, and keep
the result in the model store, so `--model owner/name` works afterwards.

    r4b-edge pull YannQi/R-4B                      # GGUF Q4_K_M (llama.cpp)
    r4b-edge pull YannQi/R-4B --format onnx --quant int4
    r4b-edge pull YannQi/R-4B@main --format hf    # the checkpoint itself (torch backend)

Steps: list the repository with the hub's hashes; fetch the small files and refuse a
repository that is not the R-4B layout; check free disk for download + conversion; fetch
the weights (resumable: run the same command again after Ctrl-C or a network failure;
each file checked against the hub's sha256); convert into a temp folder inside the store
and rename it into place. The downloaded source is deleted unless --keep-source.
Environment: HF_ENDPOINT (another hub or mirror), HF_TOKEN (gated/private repositories),
HF_HUB_OFFLINE, R4B_EDGE_HOME (the store; default: the platform's cache folder).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock, Timeout

from r4b_edge import store
from r4b_edge.backends.llama_repack import ENV as REPACK_ENV
from r4b_edge.backends.llama_repack import add_cli_arg as add_repack_arg
from r4b_edge.errors import DownloadError, ExportError

from . import hub

GGUF_QUANTS = ("F16", "Q8_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q5_0", "F32")
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "int4")
DEFAULT_QUANT = {"gguf": "Q4_K_M", "onnx": "fp32", "hf": None}
# bytes per parameter of the converted files (upper estimates; mmproj/embeddings included)
_GGUF_BPP = {"F32": 4.0, "F16": 2.0, "Q8_0": 1.07, "Q6_K": 0.83, "Q5_K_M": 0.72, "Q5_0": 0.69,
             "Q4_K_M": 0.62, "Q4_K_S": 0.58, "Q4_0": 0.57}
_ONNX_BPP = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int8-dynamic": 1.0, "int4": 0.65}
_SOURCE_BPP = {"float32": 4, "float16": 2, "bfloat16": 2}

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("pull", help="download an R-4B repository from the hub and convert it into the model store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO[@REVISION]", help="hub repository id, e.g. YannQi/R-4B or YannQi/R-4B@main")
    p.add_argument("--format", default="gguf", choices=list(store.FORMATS),
                   help="gguf (llama.cpp, default), onnx (onnxruntime) or hf (the checkpoint as is, torch)")
    p.add_argument("--quant", default=None,
                   help=f"gguf: {', '.join(GGUF_QUANTS)} (default Q4_K_M); onnx: {', '.join(ONNX_PRECISIONS)} "
                        "(default fp32)")
    p.add_argument("--keep-source", action="store_true",
                   help="keep the downloaded repository in the store's downloads/ folder after converting")
    p.add_argument("--force", action="store_true", help="convert again even if this commit is already stored")
    add_repack_arg(p)
    p.set_defaults(func=run)


def _quant(fmt: str, quant: Optional[str]) -> Optional[str]:
    if fmt == "hf":
        if quant:
            raise DownloadError("--quant does not apply to --format hf (the checkpoint is stored as published)")
        return None
    if fmt == "gguf":
        q = (quant or "Q4_K_M").upper()
        if q not in GGUF_QUANTS:
            raise DownloadError(f"unknown GGUF quant {quant!r}: use one of {', '.join(GGUF_QUANTS)}")
        return q
    q = (quant or "fp32").lower()
    if q not in ONNX_PRECISIONS:
        raise DownloadError(f"unknown ONNX precision {quant!r}: use one of {', '.join(ONNX_PRECISIONS)}")
    return q


def conversion_bytes(fmt: str, quant: Optional[str], weight_bytes: int, source_dtype: str | None) -> int:
    """Upper estimate of the disk a conversion writes, from the weights' size and dtype:
    GGUF K-quants/Q4_0/Q5_0 also write an F16 intermediate; ONNX writes fp32 graphs first."""
    if fmt == "hf":
        return 0
    params = weight_bytes / _SOURCE_BPP.get(str(source_dtype), 2)
    if fmt == "gguf":
        bpp = _GGUF_BPP[quant] + (2.0 if quant not in ("F32", "F16", "Q8_0") else 0.0)
    else:
        bpp = 4.0 + _ONNX_BPP[quant] + 0.5  # raw fp32 graphs, the converted ones, the embedding table
    return int(params * bpp * 1.05) + (64 << 20)


def _clean_stale_tmp(root: Path) -> None:
    """Remove temp folders left by pulls whose process is gone (killed, power loss)."""
    base = store.tmp_dir(root)
    if not base.is_dir():
        return
    for p in base.iterdir():
        parts = p.name.split("-")
        if len(parts) >= 2 and parts[0] == "pull" and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(p, ignore_errors=True)


def _convert(fmt: str, quant: str, src: Path, out: Path, log: Log) -> None:
    if fmt == "gguf":
        from .gguf import export_gguf

        r = export_gguf(src, out, quant=quant, force=True)
        log(f"  wrote {r.text.name} and {r.mmproj.name}; verified: decodes in llama.cpp here, {r.verified}")
    else:
        from .onnx import export_onnx

        export_onnx(src, out, precision=quant, force=True)
        log(f"  wrote the ONNX folder ({quant})")


def pull(ref: str, fmt: str = "gguf", quant: Optional[str] = None, keep_source: bool = False,
         force: bool = False, token: Optional[str] = None, log: Log = _stderr) -> store.Entry:
    """Download `ref` (owner/name[@revision]), convert it to `fmt`/`quant`, store it; returns the entry.
    Nothing appears in the store unless every step succeeded; an entry already made from the same
    commit is returned as is unless `force`. One pull per repository commit at a time (a file lock)."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise DownloadError("r4b-edge pull needs huggingface_hub: pip install 'r4b-edge[pull]' "
                            "(and 'r4b-edge[export]' to convert to gguf/onnx)") from None
    if fmt not in store.FORMATS:
        raise DownloadError(f"unknown format {fmt!r}: use one of {', '.join(store.FORMATS)}")
    quant = _quant(fmt, quant)
    repo, revision = hub.parse_ref(ref)
    root = store.store_root()
    name = store.entry_name(repo, fmt, quant)
    log(f"pull {repo}@{revision} from {hub.endpoint()} -> {name} (store: {root})")
    listing = hub.list_repo(repo, revision, token)
    log(f"  commit {listing.commit}")
    have = store.find(name, root=root)
    if have is not None and have.commit == listing.commit and not force:
        log(f"  {name} is already stored from this commit: nothing to do (--force converts again)")
        return have
    src = store.downloads_dir(root) / repo.replace("/", "--") / listing.commit
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{repo.replace('/', '--')}--{listing.commit}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DownloadError(f"another r4b-edge pull of {repo}@{listing.commit[:12]} is running "
                            f"(lock {lock.lock_file}); wait for it to finish") from None
    try:
        return _fetch_and_store(listing, src, name, fmt, quant, keep_source, token, root, log)
    finally:
        lock.release()


def _fetch_and_store(listing: hub.Listing, src: Path, name: str, fmt: str, quant: Optional[str],
                     keep_source: bool, token: Optional[str], root: Path, log: Log) -> store.Entry:
    repo, revision = listing.repo, listing.revision
    dl = hub.Downloader(listing, src, token)

    small = [f for f in hub.wanted_files(listing) if f.name in hub.SMALL_FILES]
    dl.fetch(small)
    cfg = hub.validate_layout(listing, src)
    files = hub.wanted_files(listing)
    weights = [f for f in files if f.name.endswith(".safetensors")]
    weight_bytes = sum(f.size for f in weights)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype")
    download = dl.remaining_bytes(files)
    convert = conversion_bytes(fmt, quant, weight_bytes, dtype)
    log(f"  R-4B layout ok: {len(weights)} weight file(s), {weight_bytes / 1e9:.2f} GB; "
        f"to download {download / 1e9:.2f} GB, conversion up to {convert / 1e9:.2f} GB")
    hub.ensure_free(root, download + convert, f"downloading {download / 1e9:.2f} GB and converting")

    dl.fetch(files)  # huggingface_hub's progress bar per file (size, rate)
    _clean_stale_tmp(root)
    work = store.tmp_dir(root) / f"pull-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    out = work / "entry"
    try:
        if fmt == "hf":
            log("  storing the checkpoint as is (hf)")
            ignore = shutil.ignore_patterns(hub.VERIFIED_FILE, "*.part")
            if keep_source:
                shutil.copytree(src, out, ignore=ignore)
            else:
                os.replace(src, out)
                (out / hub.VERIFIED_FILE).unlink(missing_ok=True)
        else:
            log(f"  converting to {fmt} {quant} (streamed)")
            _convert(fmt, quant, src, out, log)
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        entry = store.Entry(name=name, repo=repo, revision=revision, commit=listing.commit, format=fmt,
                            quant=quant, size=0, created=now, source=str(src) if keep_source else None)
        entry = store.commit_entry(out, entry, root)
    except BaseException as e:
        if fmt == "hf" and not keep_source and out.exists() and not src.exists():
            os.replace(out, src)  # the download was moved in: give it back for the next run
        if isinstance(e, (ExportError, OSError)):
            raise DownloadError(f"the download is complete ({src}) but storing {name} failed, so nothing was "
                                f"stored: {e}; fix the cause and run the pull again (the download is reused)"
                                ) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep_source:
        shutil.rmtree(src, ignore_errors=True)
        with contextlib.suppress(OSError):
            src.parent.rmdir()  # only when no other commit of the repo is kept
    return entry


def run(args: argparse.Namespace) -> int:
    if args.llama_repack:  # the conversion's llama.cpp test decode follows it
        os.environ[REPACK_ENV] = args.llama_repack
    e = pull(args.repo, fmt=args.format, quant=args.quant, keep_source=args.keep_source, force=args.force)
    print(f"stored {e.name}  ({e.size / 2**20:.1f} MiB, {e.format} {e.quant or ''}, commit {e.commit[:12]})")
    print(f"  {e.path}")
    if e.source:
        print(f"  source kept: {e.source}")
    same_repo = [x for x in store.list_entries() if x.repo == e.repo]
    print(f"chat with it: r4b-edge chat IMAGE \"question\" --model {e.repo if len(same_repo) == 1 else e.name}")
    return 0
