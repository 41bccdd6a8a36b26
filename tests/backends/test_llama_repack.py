"""llama.cpp's weight repacking (extra buffer types): the choice, the probe child, its cache, and
what the backend, `export` and `info` do with them. On AMX CPUs llama.cpp's repacked Q8_0/Q4_K
weights crash on the first decode (llama.cpp issue 20824); any machine tests the fallback with
the probe's test hook, which makes a probe child that repacks kill itself with SIGSEGV."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from r4b_edge.backends import llama_repack as lr
from r4b_edge.errors import BackendOptionError, ExportError, describe_exit

pytest.importorskip("llama_cpp")
AMX_HERE = lr.build_has_amx(lr.parse_features(lr.llama_system_info()))

AMX_LINE = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
            "REPACK = 1 |")


@pytest.fixture(scope="module")
def q8_dir(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r4b_edge.export.gguf import export_gguf

    return export_gguf(tiny_ckpt, tmp_path_factory.mktemp("repack") / "q8", quant="Q8_0", verify=False).out_dir


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh store folder (so a fresh probe cache) and no repack setting from outside."""
    monkeypatch.setenv("R4B_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(lr.ENV, raising=False)
    monkeypatch.delenv(lr.CRASH_HOOK_ENV, raising=False)
    return tmp_path / "home"


def _no_probe(*a, **k):
    raise AssertionError("a probe child was started")


def _text(d: Path) -> Path:
    return next(d.glob("model-*.gguf"))


# ---- the choice -------------------------------------------------------------------------------
def test_features_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    f = lr.parse_features(AMX_LINE)
    assert f["AMX_INT8"] and f["AVX512"] and lr.build_has_amx(f)
    assert not lr.build_has_amx(lr.parse_features(AMX_LINE.replace("AMX_INT8 = 1", "AMX_INT8 = 0")))
    assert not lr.build_has_amx(lr.parse_features(lr.llama_system_info())) or lr.cpu_flags() & {"amx_int8", "amx_tile"}
    monkeypatch.delenv(lr.ENV, raising=False)
    assert lr.repack_setting(None) == "auto" and lr.repack_setting("OFF") == "off"
    monkeypatch.setenv(lr.ENV, "on")
    assert lr.repack_setting(None) == "on" and lr.repack_setting("off") == "off"  # the caller wins
    monkeypatch.setenv(lr.ENV, "sometimes")
    with pytest.raises(BackendOptionError, match=f"{lr.ENV}='sometimes' is not a repack setting: use one of auto, on, off"):
        lr.repack_setting(None)
    assert describe_exit(-11) == "killed by SIGSEGV (segmentation fault)" and describe_exit(3) == "exit code 3"


def test_auto_rules_without_probing(home: Path, monkeypatch: pytest.MonkeyPatch, q8_dir: Path) -> None:
    monkeypatch.setattr(lr, "probe", _no_probe)
    text = _text(q8_dir)
    c = lr.choose("auto", text, ["F16", "F32"])
    assert c.use_extra_bufts and "no weights to repack" in c.reason
    c = lr.choose("auto", text, ["F32", "Q8_0"], features=lr.parse_features(AMX_LINE))
    assert not c.use_extra_bufts and "AMX" in c.reason and "20824" in c.reason and c.probe is None
    assert lr.choose("on", text, ["Q8_0"], features=lr.parse_features(AMX_LINE)).use_extra_bufts  # as told
    assert not lr.choose("off", text).use_extra_bufts
    assert not (home / lr.CACHE_NAME).exists()


# ---- the probe ---------------------------------------------------------------------------------
def test_probe_decodes_and_its_crash_turns_repacking_off(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                          q8_dir: Path) -> None:
    text, mm = _text(q8_dir), next(q8_dir.glob("mmproj-*.gguf"))
    assert lr.probe(text, False, mmproj=mm).ok
    on = lr.probe(text, True, mmproj=mm)
    # with repacking on the child decodes, except where llama.cpp has its AMX kernels (the fault
    # this guards against: there it may die, and the suite must not)
    assert on.ok or (AMX_HERE and on.returncode < 0), on.describe()
    monkeypatch.setenv(lr.CRASH_HOOK_ENV, "segv")
    assert lr.probe(text, False).ok  # the hook only fires where weights are repacked
    bad = lr.probe(text, True)
    assert not bad.ok and bad.returncode == -11 and "killed by SIGSEGV" in bad.describe()
    no_amx = {"AVX2": True, "AMX_INT8": False}
    c = lr.choose("auto", text, features=no_amx)
    assert not c.use_extra_bufts and c.probe is not None and not c.cached
    assert "a probe with repacking on was killed by SIGSEGV" in c.reason
    cache = json.loads((home / lr.CACHE_NAME).read_text())
    assert list(cache.values())[0]["ok"] is False and list(cache.values())[0]["returncode"] == -11
    monkeypatch.setattr(lr, "probe", _no_probe)  # the verdict is on disk: no second child
    again = lr.choose("auto", text, features=no_amx)
    assert not again.use_extra_bufts and again.cached and again.reason == c.reason


def test_backend_falls_back_and_decodes(home: Path, monkeypatch: pytest.MonkeyPatch, q8_dir: Path) -> None:
    """The crash hook stands in for an AMX CPU: the backend loads with repacking off and answers
    as it does with repacking on (same greedy tokens)."""
    import sys

    from r4b_edge.api import EXAMPLE_IMAGE
    from r4b_edge.backends.llama_backend import LlamaBackend

    monkeypatch.setattr(lr, "llama_system_info", lambda: "CPU : AVX2 = 1 | AMX_INT8 = 0 |")
    monkeypatch.setenv(lr.CRASH_HOOK_ENV, "segv")
    be = LlamaBackend(q8_dir, device="cpu", threads=1)
    try:
        assert not be.repack.use_extra_bufts and "killed by SIGSEGV" in be.info().extra["repack"]
    finally:
        be.close()
    outs = {}
    for setting in ("off", "on"):  # in a child: repacking on may crash natively on an AMX CPU
        monkeypatch.delenv(lr.CRASH_HOOK_ENV, raising=False)
        out = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "chat", str(EXAMPLE_IMAGE),
                              "What is the sum of all the digits?", "--model", str(q8_dir), "--threads", "1",
                              "--llama-repack", setting, "--mode", "no-think", "--max-tokens", "12", "--json"],
                             capture_output=True, text=True, timeout=300)
        if setting == "on" and AMX_HERE and out.returncode < 0:
            continue  # the known llama.cpp fault, contained in the child
        assert out.returncode == 0, out.stderr[-2000:]
        outs[setting] = json.loads(out.stdout)["answer"]
    assert outs["off"] and outs["off"] == outs.get("on", outs["off"])


# ---- export, info, bench -------------------------------------------------------------------------
def test_export_verifies_with_a_real_decode(home: Path, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path,
                                            tmp_path: Path) -> None:
    from r4b_edge.export.gguf import export_gguf

    monkeypatch.setattr(lr, "llama_system_info", lambda: "CPU : AVX2 = 1 | AMX_INT8 = 0 |")
    monkeypatch.setenv(lr.CRASH_HOOK_ENV, "segv")
    out = tmp_path / "forced"
    with pytest.raises(ExportError) as e:
        export_gguf(tiny_ckpt, out, quant="Q8_0", repack="on")
    msg = str(e.value)
    assert "model-Q8_0.gguf" in msg and "killed by SIGSEGV" in msg and "--llama-repack off" in msg and "\n" not in msg
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*tmp"))  # nothing half-written is left
    r = export_gguf(tiny_ckpt, tmp_path / "auto", quant="Q8_0")
    assert r.verified.startswith("repack off (auto: a probe with repacking on was killed by SIGSEGV")


def test_cli_flag_info_and_bench_crash_report(home: Path, q8_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from r4b_edge.benchmarks.latency import run_isolated

    env_run = dict(__import__("os").environ, **{lr.ENV: "off"})
    out = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "info", "--model", str(q8_dir)],
                         capture_output=True, text=True, env=env_run, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "llama.cpp on this CPU:" in out.stdout and "repack for this model: off (off: asked for)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "r4b_edge.apps.cli", "info", "--json", "--model", str(q8_dir),
                          "--llama-repack", "on"], capture_output=True, text=True, timeout=300)
    lc = json.loads(out.stdout)["llama_cpu"]
    assert lc["choice"]["use_extra_bufts"] is True and isinstance(lc["llama_amx"], bool) and lc["llama_features"]
    res = run_isolated("tests.backends.crash_worker:segv", {"backend": "llama"}, timeout=120)
    assert "worker killed by SIGSEGV (segmentation fault)" in res["error"]
    assert "--llama-repack off" in res["error"]


def test_docs_stock_recipes_turn_repacking_off(q8_dir: Path, tmp_path: Path) -> None:
    """docs/gguf.md's llama-cpp-python snippet, run verbatim (model path aside) in a child, loads
    with `use_extra_bufts` off and decodes; `stock_llama_params` does the same in-process."""
    import re
    import sys

    import llama_cpp

    from r4b_edge.backends.llama_repack import stock_llama_params

    doc = (Path(__file__).resolve().parents[2] / "docs" / "gguf.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "use_extra_bufts = False" in b)
    code = block.replace("out/gguf-q4/model-Q4_K_M.gguf", str(_text(q8_dir))) + (
        "\nprint('extra_bufts', llm.model_params.use_extra_bufts)"
        "\nprint('text', repr(llm.create_completion('a', max_tokens=3, temperature=0)['choices'][0]['text']))\n")
    (tmp_path / "snippet.py").write_text(code)
    out = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "extra_bufts False" in out.stdout and "text " in out.stdout
    for flag in (False, True):
        with stock_llama_params(flag):
            llm = llama_cpp.Llama(model_path=str(_text(q8_dir)), n_ctx=64, verbose=False, vocab_only=True)
        assert llm.model_params.use_extra_bufts is flag
        llm.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored


def test_repack_on_another_backend_is_a_clear_error(tiny_ckpt: Path) -> None:
    from r4b_edge.backends import create_backend

    with pytest.raises(BackendOptionError, match=r"repack \(--llama-repack\) is a llama backend option .* torch backend"):
        create_backend(tiny_ckpt, backend="auto", device="cpu", repack="off")


def test_auto_loads_a_big_model_without_repacking(tmp_path) -> None:
    """A real-size text file (sparse here) is not repacked under auto, with no probe: measured at
    R-4B's size, repacking costs ~1.6 GiB of RSS and a slower prefill (docs/gguf.md)."""
    from r4b_edge.backends import llama_repack

    big = tmp_path / "model-Q4_K_M.gguf"
    with open(big, "wb") as f:
        f.truncate(llama_repack.LARGE_MODEL_BYTES + 1)
    c = llama_repack.choose("auto", big, ["Q4_K", "Q6_K", "F32"], features={}, cache_root=tmp_path)
    assert not c.use_extra_bufts and c.probe is None and "1.0 GiB model" in c.reason
    assert llama_repack.choose("on", big, ["Q4_K"], features={}).use_extra_bufts
