"""Options shared by the verbs that load a model and generate."""
from __future__ import annotations

import argparse
import re
from typing import Any

from r4b_edge.backends import BACKENDS
from r4b_edge.backends.llama_repack import add_cli_arg as add_repack_arg
from r4b_edge.backends.runtime import DEVICE_ALIASES
from r4b_edge.backends.torch_dtype import DTYPE_CHOICES, check_dtype
from r4b_edge.engine.options import GenerationOptions
from r4b_edge.errors import R4BError
from r4b_edge.model.image_budget import AUTO_CPU_POSITIONS_PER_THREAD, DEFAULT_IMAGE_TOKENS, parse_image_tokens
from r4b_edge.model.template import API_MODES

_DEFAULT = GenerationOptions()  # the flags' defaults are the engine's


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="stored model name (r4b-edge list) or path: R-4B folder, .gguf file/folder or ONNX export folder (default: the bundled model)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="inference backend (default: by the model's files)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for any backend (default: idle physical cores, at most 4; or $R4B_THREADS)")
    p.add_argument("--device", default="auto", choices=list(DEVICE_ALIASES), metavar="DEVICE",
                   help="auto (CUDA, then Apple MPS/Metal/CoreML, then CPU), cpu, cuda, gpu, mps, metal (torch/llama), "
                        "coreml (onnx)")
    add_load_args(p)
    add_repack_arg(p)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """--image-tokens, --n-ctx and --dtype (docs/images.md), shared by chat, serve, app and bench."""
    p.add_argument("--image-tokens", type=image_tokens_arg, default=DEFAULT_IMAGE_TOKENS, metavar="N|auto|full",
                   help="positions an image may take: the AnyRes grid is the best one that fits N (the base view "
                        f"is always kept); auto (default): the full grid on a GPU, {AUTO_CPU_POSITIONS_PER_THREAD} "
                        "x threads on a CPU; full: the model's full grid")
    p.add_argument("--n-ctx", type=int, default=None, metavar="N",
                   help="context in positions (llama: the KV cache it allocates, default 8192; torch/onnx: a bound "
                        "on the sequence; at most the model's own)")
    p.add_argument("--dtype", type=dtype_arg, default=None, metavar="|".join(DTYPE_CHOICES),
                   help="torch models only: auto (bf16 on CUDA, fp16 on MPS, bf16 on a CPU only where it is faster "
                        "than fp32), bf16, fp16, fp32 (default: fp32 on CPU, fp16 on a GPU)")


def image_tokens_arg(text: str) -> Any:
    """argparse type of --image-tokens: N, "auto" or None (full)."""
    try:
        return parse_image_tokens(text)
    except R4BError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dtype_arg(text: str) -> str:
    """argparse type of --dtype: the canonical name of auto, bf16, fp16, fp32 (or the long names)."""
    try:
        return str(check_dtype(text))
    except R4BError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """Backend load options from the command line; `repack`, `n_ctx` and `dtype` only when given
    (so a backend that has no use for one is never handed it)."""
    opts: dict[str, Any] = {"threads": args.threads}
    if getattr(args, "llama_repack", None) is not None:
        opts["repack"] = args.llama_repack
    for name in ("n_ctx", "dtype"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    if hasattr(args, "image_tokens"):
        opts["image_tokens"] = args.image_tokens
    return opts


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=list(API_MODES), help="auto: the model decides; think / no-think: forced")
    p.add_argument("--think-threshold", type=float, default=None, metavar="P", help="think iff p_think >= P (auto mode)")
    p.add_argument("--max-think-tokens", type=int, default=None, metavar="N", help="thinking budget: close the reasoning after N tokens")
    p.add_argument("--max-tokens", type=int, default=_DEFAULT.max_tokens, metavar="N",
                   help=f"bound on the whole reply (default {_DEFAULT.max_tokens})")
    p.add_argument("--deadline", type=float, default=None, metavar="MS",
                   help="latency budget for the reply in milliseconds: auto mode picks no-think, or think "
                        "with a reasoning budget that fits (the decision line says what and why)")
    p.add_argument("--temperature", type=float, default=_DEFAULT.temperature,
                   help=f"0 = greedy (default {_DEFAULT.temperature:g})")
    p.add_argument("--top-p", type=float, default=_DEFAULT.top_p, help=f"default {_DEFAULT.top_p:g} (off)")
    p.add_argument("--top-k", type=int, default=_DEFAULT.top_k, help=f"default {_DEFAULT.top_k} (off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer where TEXT appears (repeatable; TEXT itself is not printed; "
                        "the reasoning is never cut); \\n, \\t, \\r and \\\\ are understood")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(mode=args.mode, think_threshold=args.think_threshold, max_think_tokens=args.max_think_tokens,
                max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=[unescape(s) for s in getattr(args, "stop", None) or []],
                deadline_ms=getattr(args, "deadline", None))


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line -> the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def load_model(args: argparse.Namespace):
    import r4b_edge

    return r4b_edge.load(args.model, backend=args.backend, device=args.device, **load_options(args))
