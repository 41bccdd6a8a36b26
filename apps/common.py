"""Options shared by the verbs that load a model and generate."""
from __future__ import annotations

import argparse
import re
from typing import Any

from r4b_edge.backends import BACKENDS
from r4b_edge.backends.llama_repack import add_cli_arg as add_repack_arg
from r4b_edge.backends.runtime import DEVICE_ALIASES
from r4b_edge.engine.options import GenerationOptions
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
    add_repack_arg(p)


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """Backend load options from the command line; `repack` only when given (a llama option)."""
    opts: dict[str, Any] = {"threads": args.threads}
    if getattr(args, "llama_repack", None) is not None:
        opts["repack"] = args.llama_repack
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
