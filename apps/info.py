"""`r4b-edge info`: the model, its size, the backends and devices here."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from r4b_edge.backends.llama_repack import add_cli_arg as add_repack_arg


def register(sub) -> None:
    p = sub.add_parser("info", help="show the model, its size, available backends and devices", description=__doc__)
    p.add_argument("--model", default=None, help="model path (default: the bundled model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads the auto image budget and the torch dtype check assume (default: as a load would)")
    add_repack_arg(p)
    p.set_defaults(func=run)


def _dir_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def llama_cpu(path: Path | None, fmt: str | None, setting: str | None) -> dict:
    """What llama.cpp sees of this CPU, and the repack choice for `path` when it is a GGUF model."""
    from r4b_edge.backends import llama_repack
    from r4b_edge.backends.gguf_pair import find_gguf_pair
    from r4b_edge.errors import R4BError

    out = llama_repack.cpu_report()
    out["setting"] = llama_repack.repack_setting(setting)
    if path is not None and fmt == "llama":
        try:
            text, _ = find_gguf_pair(path, None)
            out["choice"] = llama_repack.choice_dict(llama_repack.choose(setting, text))
        except R4BError as e:
            out["choice"] = {"error": str(e)}
    else:
        out["policy"] = ("F16/F32 files: on (nothing to repack); quantized files: "
                         + ("off (llama.cpp was built with AMX kernels, which crash)" if out["llama_amx"]
                            else "a one-time probe per kind of file decides (cached)")
                         if out["setting"] == "auto" else f"{out['setting']} for every file")
    return out


#: the photo `info` prices at the auto budget (width, height)
PHOTO = (1920, 1080)


def image_tokens_info(cfg, threads: int | None) -> dict:
    """The auto image budget here (docs/images.md) and, for a model whose config is known, what a
    1920x1080 photo costs at it and at the full grid."""
    from r4b_edge.backends.runtime import check_threads
    from r4b_edge.model.image_budget import AUTO_CPU_POSITIONS_PER_THREAD, auto_image_tokens, grid_cost

    threads = check_threads(threads)
    out: dict = {"rule": f"auto: the full grid on a GPU (cuda, mps, metal, coreml); on a CPU "
                         f"{AUTO_CPU_POSITIONS_PER_THREAD} positions per thread",
                 "threads": threads, "cpu_budget": auto_image_tokens("cpu", threads)}
    if cfg is not None:
        for key, budget in (("cpu", out["cpu_budget"]), ("full", None)):
            grid, views, positions = grid_cost((PHOTO[1], PHOTO[0]), cfg, budget)
            out[f"photo_{key}"] = {"grid": list(grid), "views": views, "positions": positions}
    return out


def torch_dtype_info(cfg, threads: int | None) -> dict:
    """What `--dtype auto` picks for this torch model on the device `auto` picks, and why."""
    import torch

    from r4b_edge.backends.runtime import check_threads
    from r4b_edge.backends.torch_backend import resolve_torch_device
    from r4b_edge.backends.torch_dtype import dtype_label, resolve_dtype

    device = resolve_torch_device("auto")
    if device == "cpu":
        torch.set_num_threads(check_threads(threads))  # as the backend would: the check times these threads
    dtype, why = resolve_dtype("auto", device, lambda: cfg.hidden_size)
    return {"device": device, "auto": dtype_label(dtype), "why": why}


def collect(model: str | None, repack: str | None = None, threads: int | None = None) -> dict:
    from r4b_edge import __version__
    from r4b_edge.api import default_model_path
    from r4b_edge.backends import BACKENDS, available_backends, backend_devices, detect_format
    from r4b_edge.errors import R4BError
    from r4b_edge.store import resolve_model

    info: dict = {"version": __version__, "backends": {}}
    cfg = None
    for name, ok in available_backends().items():
        info["backends"][name] = {"installed": ok, "extra": BACKENDS[name][1],
                                  "devices": backend_devices(name) if ok else []}
    try:
        path = resolve_model(model) if model else default_model_path()
        fmt = detect_format(path)
        m: dict = {"path": str(path), "format": fmt, "size_mb": round(_dir_size(path) / 2**20, 2)}
        cfg_file = path / "config.json" if path.is_dir() else None
        if cfg_file is not None and cfg_file.exists():
            from r4b_edge.model.config import RConfig

            cfg = RConfig.from_file(cfg_file)
            m.update(text_hidden=cfg.hidden_size, vocab=cfg.vocab_size, context=cfg.max_position_embeddings,
                     image_size=cfg.image_size, image_tokens_per_view=cfg.tokens_per_view, anyres=cfg.anyres)
        info["model"] = m
    except R4BError as e:
        info["model"] = {"error": str(e)}
        path = fmt = None
    info["image_tokens"] = image_tokens_info(cfg, threads)
    if cfg is not None and fmt == "torch" and info["backends"]["torch"]["installed"]:
        info["torch_dtype"] = torch_dtype_info(cfg, threads)
    if info["backends"].get("llama", {}).get("installed"):
        info["llama_cpu"] = llama_cpu(path, fmt, repack)
    return info


def _tiles(c: dict) -> str:
    rows, cols = c["grid"]
    grid = "base view only" if rows == 0 else f"grid {rows}x{cols} + base view"
    return f"{grid}, {c['views']} view(s), {c['positions']} positions"


def run(args: argparse.Namespace) -> int:
    info = collect(args.model, args.llama_repack, args.threads)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"r4b-edge {info['version']}")
    m = info["model"]
    if "error" in m:
        print(f"model: {m['error']}")
    else:
        print(f"model: {m['path']} ({m['format']}, {m['size_mb']} MB)")
        for k in ("text_hidden", "vocab", "context", "image_size", "image_tokens_per_view", "anyres"):
            if k in m:
                print(f"  {k}: {m[k]}")
    it = info["image_tokens"]
    print(f"image tokens: {it['rule']}; here on the CPU with {it['threads']} thread(s): {it['cpu_budget']} positions")
    if "photo_cpu" in it:
        c, f = it["photo_cpu"], it["photo_full"]
        print(f"  a {PHOTO[0]}x{PHOTO[1]} photo: {_tiles(c)} at that budget; {_tiles(f)} on a GPU (the full grid)")
    td = info.get("torch_dtype")
    if td:
        print(f"torch --dtype auto here: {td['auto']} on {td['device']} ({td['why']})")
    print("backends:")
    for name, b in info["backends"].items():
        state = ", ".join(b["devices"]) if b["installed"] else f"not installed (pip install '{b['extra']}')"
        print(f"  {name}: {state}")
    lc = info.get("llama_cpu")
    if lc:
        amx = ", ".join(lc["os_amx_flags"]) or "none"
        print(f"llama.cpp on this CPU: {lc['cpu']} ({lc['machine']}); OS AMX flags: {amx}; "
              f"llama.cpp AMX kernels: {'yes' if lc['llama_amx'] else 'no'}")
        print(f"  features: {' '.join(lc['llama_features'])}")
        c = lc.get("choice")
        if c and "error" in c:
            print(f"  repack: {c['error']}")
        elif c:
            state = "on" if c["use_extra_bufts"] else "off"
            src = " (cached probe)" if c["cached"] else (" (probed now)" if c["probe"] else "")
            print(f"  repack for this model: {state} ({c['setting']}: {c['reason']}){src}")
        else:
            print(f"  repack ({lc['setting']}): {lc['policy']}")
    return 0
