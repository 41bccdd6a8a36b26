"""The GGUF export streams tensors: peak memory stays far below the model's float32 size.

A ~63M-parameter bf16 checkpoint (250 MB as float32) is exported to F16 in a child
process with 1 MiB conversion chunks; the peak RSS growth during the export must stay
under 64 MiB. (The true-shape 4B run is `python -m r4b_edge.export.scale_check`,
numbers in docs/gguf.md.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

BOUND_MIB = 64

CHILD = r"""
import json, os, sys, threading, time
import r4b_edge.model.checkpoint, gguf, numpy  # imports are the baseline
from r4b_edge.export import gguf as gg
gg.CHUNK_BYTES = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
peak, done = [rss()], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
base = rss()
t = threading.Thread(target=watch, daemon=True); t.start()
r = gg.export_gguf(sys.argv[1], sys.argv[2], quant="F16", verify=False)
done.append(1); t.join()
print(json.dumps({"base": base, "peak": max(peak[0], rss()), "bytes": sum(r.sizes.values())}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="samples RSS from /proc (Linux)")
def test_export_peak_memory_is_bounded(tiny_tokenizer_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    from r4b_edge.export.scale_check import write_random_bf16
    from r4b_edge.testing import tiny_config

    cfg = tiny_config(vocab_size=tiny_tokenizer.vocab_size, image_token_index=tiny_tokenizer.image,
                      hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    src = tmp_path / "ckpt"
    write_random_bf16(src, cfg, tiny_tokenizer_dir)
    n_params = sum(f.stat().st_size for f in src.glob("*.safetensors")) // 2
    assert n_params * 4 > 3 * BOUND_MIB * 2**20  # the float32 copy would be far over the bound
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out")],
                         check=True, capture_output=True, text=True, timeout=600)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["base"]
    assert m["bytes"] > n_params * 2 * 0.9  # really wrote the F16 model
    assert grew < BOUND_MIB, f"peak RSS grew by {grew:.0f} MiB during the export (bound {BOUND_MIB})"
