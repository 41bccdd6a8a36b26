"""Scale check (not run in CI): a random-weights checkpoint at R-4B's true shapes
(Qwen3-4B text, SigLIP-So400m/14-384 tower) is written shard by shard in bf16,
then exported to GGUF in a child process whose peak RSS is measured.

    python -m r4b_edge.export.scale_check --work /tmp/r4b-scale --quant F16 Q4_K_M

Prints one JSON line per export (file sizes, wall time, peak RSS); docs/gguf.md
records the numbers. Needs about 30 GB of disk for F16 + Q4_K_M.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARD_BYTES = 2 << 30


def r4b_config(vocab_size: int, image_token_index: int):
    """An RConfig with R-4B's shapes: Qwen3-4B + SigLIP-So400m patch 14 at 384 px."""
    from r4b_edge.model.config import RConfig

    tc = {"model_type": "qwen3", "vocab_size": vocab_size, "hidden_size": 2560, "intermediate_size": 9728,
          "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
          "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "hidden_act": "silu",
          "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"}, "attention_bias": False,
          "tie_word_embeddings": False}
    vc = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14, "hidden_size": 1152,
          "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16, "num_channels": 3,
          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    pins = [[384 * a, 384 * b] for a in range(1, 4) for b in range(1, 4)]
    return RConfig.from_dict({"architectures": ["RForConditionalGeneration"], "model_type": "R",
                              "text_config": tc, "vision_config": vc, "image_token_index": image_token_index,
                              "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
                              "image_grid_pinpoints": pins, "vision_aspect_ratio": "anyres",
                              "projector_hidden_act": "gelu", "tie_word_embeddings": False})


def _bf16(a: np.ndarray) -> bytes:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_random_bf16(out: Path, config, tokenizer_dir: Path, seed: int = 0) -> None:
    """Random bf16 weights in R-4B's layout, one tensor (in row chunks) at a time."""
    import shutil

    from r4b_edge.model.checkpoint import INDEX_NAME, expected_shapes
    from r4b_edge.model.tokenizer import mark_tokenizer_files

    out.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(config)
    rng = np.random.default_rng(seed)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = int(np.prod(s)) * 2
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((k, s))
        size += n
    wm = {}
    for i, sh in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k, s in sh:
            n = int(np.prod(s)) * 2
            header[k] = {"dtype": "BF16", "shape": s, "data_offsets": [off, off + n]}
            off += n
            wm[k] = name
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(out / name, "wb") as f:
            f.write(len(hb).to_bytes(8, "little") + hb)
            for k, s in sh:
                rows, row = (s[0], int(np.prod(s[1:]))) if len(s) > 1 else (1, s[0])
                step = max(1, (16 << 20) // row)
                for r in range(0, rows, step):
                    k_rows = min(step, rows - r)
                    if len(s) == 1 and ("norm" in k or "layernorm" in k) and k.endswith("weight"):
                        a = np.ones(k_rows * row, np.float32)
                    else:
                        a = rng.standard_normal(k_rows * row, dtype=np.float32) * 0.02
                    f.write(_bf16(a))
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(
        int(np.prod(s)) * 2 for s in shapes.values())}, "weight_map": wm}, indent=1))
    cfg = config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, out / f)
    mark_tokenizer_files(out)  # think tags non-special, as in Qwen3 (a --tokenizer folder may predate that)


def _anon_mib() -> float:
    """Anonymous (non file-backed) resident memory of this process, MiB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _child(src: str, out: str, quant: str, verify: bool) -> None:
    import threading

    from r4b_edge.export.gguf import export_gguf

    base_anon, peak_anon, done = _anon_mib(), [0.0], []

    def watch() -> None:
        while not done:
            peak_anon[0] = max(peak_anon[0], _anon_mib())
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    r = export_gguf(src, out, quant=quant, verify=verify, force=True)
    done.append(1)
    th.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"quant": quant, "verify": verify, "wall_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_mib": round(peak), "peak_anon_mib": round(peak_anon[0]),
                      "anon_after_imports_mib": round(base_anon),
                      "files_mib": {k: round(v / 2**20, 1) for k, v in r.sizes.items()}}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--quant", nargs="+", default=["F16", "Q4_K_M"])
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: train a tiny one)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "QUANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(*a.child, verify=not a.no_verify)
        return 0
    from r4b_edge.model.tokenizer import Tokenizer

    src = a.work / "ckpt"
    if not (src / "config.json").exists():
        tok_dir = a.tokenizer
        if tok_dir is None:
            from r4b_edge.model.reply import IM_END, IM_START, IMAGE_PLACEHOLDER, THINK_CLOSE, THINK_OPEN
            from r4b_edge.train.tokenizer import save_tokenizer, train_tokenizer

            tok_dir = a.work / "tokenizer"
            texts = [f"{IM_START}user\n{IMAGE_PLACEHOLDER}\nquestion {i}{IM_END}\n{THINK_OPEN}\n{THINK_CLOSE}\n\n"
                     for i in range(200)]
            save_tokenizer(train_tokenizer(texts, vocab_size=512), tok_dir, "")
        tok = Tokenizer.from_dir(tok_dir)
        t0 = time.perf_counter()
        write_random_bf16(src, r4b_config(151936, tok.image), tok_dir)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(json.dumps({"checkpoint_gib": round(size / 2**30, 2), "write_s": round(time.perf_counter() - t0, 1)}),
              flush=True)
    for q in a.quant:
        cmd = [sys.executable, "-m", "r4b_edge.export.scale_check", "--work", str(a.work),
               "--child", str(src), str(a.work / f"gguf-{q}"), q] + (["--no-verify"] if a.no_verify else [])
        subprocess.run(cmd, check=True)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
