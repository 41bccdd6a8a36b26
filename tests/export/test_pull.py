"""`r4b-edge pull` against a test hub on 127.0.0.1: real huggingface_hub code, nothing mocked
inside r4b-edge. Pull + convert (GGUF, ONNX, hf), chat by name, list/rm, a dropped connection,
Ctrl-C and resume, a corrupted file, a non-R-4B repository, a gated one, an unreachable hub,
a full disk during conversion."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import r4b_edge
from r4b_edge import store
from r4b_edge.apps.cli import main
from r4b_edge.errors import DownloadError, ModelNotFoundError
from r4b_edge.export import hub as hubmod
from r4b_edge.export.pull import conversion_bytes, pull

from r4b_edge.benchmarks.hubserver import Repo, LocalHub

pytest.importorskip("huggingface_hub")
REPO = "test/tiny-r4b"
BIG = "test/big-r4b"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "r4b_edge" / "assets" / "example.png"


@pytest.fixture(scope="module")
def source(tiny_ckpt) -> Path:
    return tiny_ckpt


@pytest.fixture(scope="module")
def big_source(tmp_path_factory, tiny_tokenizer_dir, tiny_tokenizer) -> Path:
    """A tiny R-4B whose one weight file (~38 MB) spans several of huggingface_hub's 10 MB
    download chunks, so an interrupted transfer has written data to resume from."""
    from r4b_edge.testing import write_random_checkpoint
    from r4b_edge.testing import tiny_config

    cfg = tiny_config(anyres=True, vocab_size=tiny_tokenizer.vocab_size, image_token_index=tiny_tokenizer.image,
                      intermediate_size=24576)
    return write_random_checkpoint(tmp_path_factory.mktemp("big") / "big-r4b", cfg, tiny_tokenizer_dir, seed=2)


@pytest.fixture
def hub(source, big_source, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   "hidden_size": 64}))
    (other / "model.safetensors").write_bytes(os.urandom(300_000))
    gated = Repo.from_folder(source, "f" * 40)
    gated.gated = True
    h = LocalHub({REPO: Repo.from_folder(source, COMMIT), "other/llama": Repo.from_folder(other, "e" * 40),
                  "test/gated": gated, BIG: Repo.from_folder(big_source, COMMIT)})
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("R4B_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token or cache of the user's
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield h
    h.close()


def _shard(source: Path) -> str:
    return sorted(p.name for p in source.glob("*.safetensors"))[0]


def _same_files(a: Path, b: Path, names) -> None:
    for n in names:
        assert hashlib.sha256((a / n).read_bytes()).digest() == hashlib.sha256((b / n).read_bytes()).digest(), n


def test_pull_gguf_chat_by_name_list_rm(hub, source, tmp_path, capsys):
    assert main(["pull", REPO]) == 0  # default: gguf Q4_K_M
    out = capsys.readouterr()
    assert "stored test/tiny-r4b:gguf-Q4_K_M" in out.out and f"--model {REPO}" in out.out
    (e,) = store.list_entries()
    assert (e.format, e.quant, e.commit, e.revision) == ("gguf", "Q4_K_M", COMMIT, "main")
    assert sorted(p.name for p in e.path.glob("*.gguf")) == ["mmproj-model-F16.gguf", "model-Q4_K_M.gguf"]
    assert not (store.downloads_dir() / "test--tiny-r4b").exists()  # source dropped without --keep-source
    assert not any(store.tmp_dir().iterdir())
    # every weight file went over the wire exactly once
    for shard in source.glob("*.safetensors"):
        assert [r[0] for r in hub.requested(shard.name)] == ["HEAD", "GET"]

    n_gets = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
    assert main(["pull", REPO]) == 0  # same commit already stored: nothing fetched or converted
    assert "already stored from this commit" in capsys.readouterr().err
    assert len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == n_gets
    assert main(["info", "--model", REPO]) == 0
    assert str(e.path) in capsys.readouterr().out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "test/tiny-r4b:gguf-Q4_K_M" in listing and "Q4_K_M" in listing and COMMIT[:12] in listing
    assert main(["chat", str(EXAMPLE), "What colour?", "--model", REPO, "--max-tokens", "4", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert isinstance(reply["answer"], str) and reply["stats"]["image_tokens"] > 0
    with r4b_edge.load(REPO) as m:
        assert m.info()["backend"] == "llama" and Path(m.info()["model"]).resolve().is_relative_to(e.path.resolve())
        assert m.chat(EXAMPLE, "hi", max_tokens=3).stats.image_tokens > 0

    n_requests = len(hub.requests)
    assert main(["rm", REPO]) == 0
    assert store.list_entries() == [] and not e.path.exists()
    with pytest.raises(ModelNotFoundError, match=f"r4b-edge pull {REPO}"):
        r4b_edge.load(REPO)
    assert main(["chat", str(EXAMPLE), "hi", "--model", REPO]) == 1
    assert f"r4b-edge pull {REPO}" in capsys.readouterr().err
    assert len(hub.requests) == n_requests  # nothing downloaded silently


def test_pull_onnx_keep_source_then_reuse_download(hub, source):
    pytest.importorskip("onnxruntime")
    e = pull(REPO, fmt="onnx", quant="fp32", keep_source=True, log=lambda m: None)
    assert e.name == "test/tiny-r4b:onnx-fp32" and (e.path / "genai_config.json").is_file()
    kept = Path(e.source)
    _same_files(source, kept, [p.name for p in source.iterdir() if p.is_file()])
    with r4b_edge.load(e.name) as m:
        assert m.info()["backend"] == "onnx"
        assert m.chat(EXAMPLE, "hi", max_tokens=3, mode="no-think").stats.image_tokens > 0
    gets = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
    e2 = pull(REPO, fmt="gguf", quant="Q8_0", log=lambda m: None)  # the kept download is reused
    assert len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == gets
    assert {x.name for x in store.list_entries()} == {e.name, e2.name}
    with pytest.raises(r4b_edge.ModelFormatError, match="2 stored models match"):
        r4b_edge.load(REPO)


def test_dropped_connection_resumes_with_range(hub, big_source):
    hub.drop_once.add("model.safetensors")
    e = pull(BIG, fmt="hf", log=lambda m: None)
    gets = [r[2] for r in hub.requested("model.safetensors") if r[0] == "GET"]
    assert len(gets) == 2 and gets[0] is None
    assert gets[1].startswith("bytes=") and int(gets[1][6:-1]) > 0  # huggingface_hub resumed mid-file
    _same_files(big_source, e.path, [p.name for p in big_source.iterdir() if p.is_file()])
    assert not list(e.path.glob("*.part")) and not (e.path / hubmod.VERIFIED_FILE).exists()
    with r4b_edge.load(BIG, backend="torch") as m:
        assert m.info()["backend"] == "torch"


def test_ctrl_c_leaves_a_resumable_download(hub, big_source):
    hub.stall.add("model.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "r4b_edge.apps.cli", "pull", BIG, "--format", "hf"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    part = store.downloads_dir() / "test--big-r4b" / COMMIT / "model.safetensors.part"
    try:
        assert hub.stalled.wait(120), "the pull never reached the weights"
        deadline = time.time() + 5  # the client holds 10 MB chunks; wait for the first on disk
        while time.time() < deadline and not (part.exists() and part.stat().st_size > 0):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        hub.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    have = part.stat().st_size
    assert have > 0  # kept for the next run
    assert store.list_entries() == []
    assert not store.tmp_dir().exists() or not any(store.tmp_dir().iterdir())
    e = pull(BIG, fmt="hf", log=lambda m: None)
    gets = [r for r in hub.requested("model.safetensors") if r[0] == "GET"]
    assert gets[-1][2] == f"bytes={have}-"  # the second run continued, not restarted
    _same_files(big_source, e.path, ["model.safetensors"])


def test_one_pull_per_commit_at_a_time(hub):
    from filelock import FileLock

    lock = FileLock(str(store.store_root() / "locks" / f"test--tiny-r4b--{COMMIT}.lock"))
    (store.store_root() / "locks").mkdir(parents=True)
    with lock:  # what a running pull holds
        with pytest.raises(DownloadError, match=f"another r4b-edge pull of {REPO}@{COMMIT[:12]} is running"):
            pull(REPO, fmt="hf", log=lambda m: None)
    assert not hub.requested("config.json")
    assert pull(REPO, fmt="hf", log=lambda m: None).commit == COMMIT


def test_progress_bar_shows_size_and_rate(hub, source):
    env = {**os.environ, "TQDM_POSITION": "-1"}  # huggingface_hub's switch: bars on without a terminal
    r = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "pull", REPO, "--format", "hf"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    shard = _shard(source)
    bars = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith(f"{shard}: 100%")]
    assert bars and re.search(r"\| \d+k/\d+k \[[\d:]+<[\d:]+, +[\d.]+[kMG]?B/s\]", bars[-1]), bars


def test_corrupted_file_is_detected_and_deleted(hub, source):
    shard = _shard(source)
    hub.corrupt.add(shard)
    with pytest.raises(DownloadError, match=f"{shard} from {REPO}@{COMMIT[:12]} is corrupted: sha256 .* "
                                            "the hub says"):
        pull(REPO, fmt="hf", log=lambda m: None)
    folder = store.downloads_dir() / "test--tiny-r4b" / COMMIT
    assert not (folder / shard).exists() and not (folder / f"{shard}.part").exists()
    assert store.list_entries() == []
    hub.corrupt.clear()
    e = pull(REPO, fmt="hf", log=lambda m: None)
    _same_files(source, e.path, [shard])


def test_non_r4b_repository_is_refused_before_the_weights(hub):
    with pytest.raises(DownloadError, match="not an R-4B repository: config.json has model_type='llama'"):
        pull("other/llama", log=lambda m: None)
    assert hub.requested("config.json") and not hub.requested("model.safetensors")
    assert store.list_entries() == []


def test_gated_repository_explains_the_token(hub, capsys):
    assert main(["pull", "test/gated"]) == 1
    err = capsys.readouterr().err
    assert "is gated (HTTP 401)" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert main(["pull", "nobody/missing"]) == 1
    err = capsys.readouterr().err
    assert "nobody/missing was not found" in err and "HF_TOKEN" in err
    assert main(["pull", f"{REPO}@v9"]) == 1
    assert "has no revision 'v9'" in capsys.readouterr().err


def test_gated_repository_with_a_token_and_a_cdn_redirect(hub, source, monkeypatch):
    """As on huggingface.co: LFS files answer 302 to a storage host; the token goes to the hub only."""
    hub.cdn_host = "localhost"  # another origin than 127.0.0.1
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    e = pull("test/gated", fmt="hf", log=lambda m: None)
    _same_files(source, e.path, [p.name for p in source.iterdir() if p.is_file()])
    cdn = [r for r in hub.requests if r[1].startswith("/cdn/")]
    hub_side = [r for r in hub.requests if not r[1].startswith("/cdn/")]
    assert cdn and all(r[0] == "GET" and not r[3] for r in cdn)  # weights fetched from the CDN, no token
    assert all(r[3] for r in hub_side)  # listing and HEADs carried it


def test_unreachable_hub_names_the_settings_and_the_manual_route(hub, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["pull", REPO]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the hub at http://127.0.0.1:{port}" in err
    for needle in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "hf download", "r4b-edge export"):
        assert needle in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["pull", REPO]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def _limit_file_size(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_full_disk_during_conversion_leaves_no_entry(hub, source):
    pull(REPO, fmt="hf", keep_source=True, log=lambda m: None)  # the download is complete and kept
    r = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "pull", REPO, "--quant", "F32"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=300,
                       preexec_fn=_limit_file_size(150_000))
    assert r.returncode == 1, r.stderr
    assert "nothing was stored" in r.stderr and "Traceback" not in r.stderr
    assert [e.name for e in store.list_entries()] == [f"{REPO}:hf"]
    assert not any(store.tmp_dir().iterdir())
    assert (store.downloads_dir() / "test--tiny-r4b" / COMMIT / _shard(source)).is_file()  # reusable


def test_small_disk_is_refused_before_the_weights(hub, source, tmp_path):
    """A real 16 MB tmpfs (own user + mount namespace, so no root needed) as the store."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user/mount namespaces here (unshare -rm)")
    home = tmp_path / "small"
    home.mkdir()
    cmd = (f"mount -t tmpfs -o size=16m tmpfs {shlex.quote(str(home))} && "
           f"{shlex.quote(sys.executable)} -m r4b_edge.apps.cli pull {REPO} --quant F32")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "R4B_EDGE_HOME": str(home)})
    assert r.returncode == 1, r.stderr
    assert re.search(r"not enough disk space under .*: downloading .* needs about 0\.\d+ GB, 0\.02 GB are free",
                     r.stderr), r.stderr
    assert hub.requested("config.json") and not any(hub.requested(p.name) for p in source.glob("*.safetensors"))


def test_disk_check_and_estimates(tmp_path):
    free = hubmod.free_bytes(tmp_path)
    hubmod.ensure_free(tmp_path / "not" / "yet", 1, "a test")
    with pytest.raises(DownloadError, match=r"not enough disk space .* needs about .* GB, .* GB are free"):
        hubmod.ensure_free(tmp_path, free + 10**12, "a test")
    bf16 = 9_000_000_000  # ~4.5B parameters in bfloat16
    assert conversion_bytes("hf", None, bf16, "bfloat16") == 0
    q4 = conversion_bytes("gguf", "Q4_K_M", bf16, "bfloat16")
    assert 2 * 4.5e9 < q4 < 3.5 * 4.5e9  # F16 intermediate + the Q4_K_M file
    assert conversion_bytes("gguf", "F32", bf16, "bfloat16") > 4 * 4.5e9
    assert conversion_bytes("onnx", "int4", bf16, "bfloat16") > 4 * 4.5e9  # fp32 graphs first
