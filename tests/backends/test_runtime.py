"""One load signature for every backend (#14 item 6, #17 item 6): `device` through one
alias table and resolver, `threads` by one name with a default that does not
oversubscribe, and unknown arguments refused."""
from __future__ import annotations

import pytest

from r4b_edge.backends import create_backend
from r4b_edge.backends import runtime
from r4b_edge.backends.runtime import (
    DEVICE_ALIASES, MAX_DEFAULT_THREADS, canonical_device, check_threads, default_threads, resolve_device,
)
from r4b_edge.errors import BackendOptionError, BackendUnavailableError, R4BError


@pytest.mark.parametrize("name,want", [("auto", "auto"), (None, "auto"), ("CPU", "cpu"), ("cuda", "cuda"),
                                       ("gpu", "gpu"), ("mps", "mps"), ("metal", "mps"), ("coreml", "mps"),
                                       ("apple", "mps")])
def test_one_alias_table(name, want):
    assert canonical_device(name) == want


@pytest.mark.parametrize("bad", ["tpu", "", 3, ["cpu"]])
def test_unknown_device_names_the_choices(bad):
    with pytest.raises(BackendUnavailableError) as e:
        canonical_device(bad)
    assert "unknown device" in str(e.value) and ", ".join(DEVICE_ALIASES) in str(e.value)


def test_resolver_order_and_errors():
    none, cuda, mps = {}, {"cuda": True}, {"mps": True}
    assert resolve_device("auto", "torch", none) == "cpu"
    assert resolve_device("auto", "torch", {"cuda": True, "mps": True}) == "cuda"
    assert resolve_device("auto", "torch", mps) == "mps"
    assert resolve_device("gpu", "torch", mps) == "mps"
    assert resolve_device("metal", "torch", mps) == "mps"
    assert resolve_device("cpu", "torch", cuda) == "cpu"
    with pytest.raises(BackendUnavailableError, match="device 'cuda' is not available to the torch backend here: "
                                                      "install it; or use --device cpu"):
        resolve_device("cuda", "torch", mps, {"cuda": "install it"})
    with pytest.raises(BackendUnavailableError, match="device 'gpu' is not available to the onnx backend"):
        resolve_device("gpu", "onnx", none)


def test_default_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.setattr(runtime, "physical_cores", lambda: 16)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert default_threads() == MAX_DEFAULT_THREADS  # an idle big machine: capped
    monkeypatch.setattr(runtime, "physical_cores", lambda: 2)
    assert default_threads() == 2
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.3, 0.0, 0.0))
    assert default_threads() == 1  # one core busy: one thread
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (11.0, 0.0, 0.0))
    assert default_threads() == 1  # never below one
    monkeypatch.setenv(runtime.THREADS_ENV, "3")
    assert default_threads() == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "lots")
    with pytest.raises(BackendOptionError, match=r"\$R4B_THREADS must be a whole number >= 1, got 'lots'"):
        default_threads()


def test_physical_cores_is_positive():
    assert runtime.physical_cores() >= 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_threads(bad):
    with pytest.raises(BackendOptionError, match="threads must be a whole number >= 1") as e:
        check_threads(bad)
    assert isinstance(e.value, R4BError)


def test_torch_backend_takes_threads(tiny_ckpt):
    import torch

    before = torch.get_num_threads()
    try:
        be = create_backend(tiny_ckpt, backend="torch", device="cpu", threads=1)
        assert be.threads == 1 and torch.get_num_threads() == 1
        assert be.info().extra["threads"] == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_threads=2), "unknown argument(s) n_threads for the torch backend"),
    (dict(mmproj="x.gguf"), "unknown argument(s) mmproj for the torch backend"),
    (dict(threads="4"), "threads must be a whole number >= 1"),
    (dict(dtype="int3"), "dtype (--dtype) must be auto, bf16, fp16 or fp32 (or bfloat16, float16, float32; None for "
                         "the default: fp32 on CPU, fp16 on a GPU), got 'int3'"),
    (dict(n_ctx=0), "n_ctx (--n-ctx) must be a whole number of positions >= 1"),
])
def test_torch_backend_refuses_unknown_or_bad_arguments(tiny_ckpt, kw, msg):
    with pytest.raises(BackendOptionError) as e:
        create_backend(tiny_ckpt, backend="torch", device="cpu", **kw)
    assert msg in str(e.value)
    if "unknown" in msg:
        assert "device, threads, n_ctx, dtype, use_cache" in str(e.value)


def test_load_passes_threads(tiny_ckpt):
    import torch

    import r4b_edge

    before = torch.get_num_threads()
    try:
        with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", threads=1) as m:
            assert m.info()["threads"] == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["torch", "llama", "onnx"])
def test_one_signature_keyword_only(name):
    """Every constructor is (model_path, *, device, threads, <its own>): the registry's table is the signature."""
    import importlib
    import inspect

    from r4b_edge.backends import BACKENDS, COMMON_LOAD_OPTIONS, LOAD_OPTIONS, is_installed

    if not is_installed(name):
        pytest.skip(f"{name} is not installed")
    mod, cls = BACKENDS[name][2].split(":")
    params = list(inspect.signature(getattr(importlib.import_module(mod), cls).__init__).parameters.values())[2:]
    assert [p.name for p in params] == list(COMMON_LOAD_OPTIONS + LOAD_OPTIONS[name])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
