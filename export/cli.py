"""`r4b-edge export`: write a GGUF pair (llama.cpp) or an ONNX folder (onnxruntime)
from an R-4B checkpoint folder (default: the bundled model).

    r4b-edge export --format gguf --quant Q4_K_M --out out/gguf-q4
    r4b-edge export --format onnx --quant int4 --out out/onnx-int4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r4b_edge.backends.llama_repack import add_cli_arg as add_repack_arg
from r4b_edge.formats import GGUF_MMPROJ_QUANTS, GGUF_QUANTS, ONNX_PRECISIONS


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to GGUF (llama.cpp) or ONNX", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=None,
                   help="R-4B checkpoint folder (default: the bundled model)")
    p.add_argument("--format", required=True, choices=["gguf", "onnx"], help="output format")
    p.add_argument("--quant", default=None,
                   help=f"gguf: {', '.join(GGUF_QUANTS)} (default Q4_K_M); onnx: {', '.join(ONNX_PRECISIONS)} (default fp32)")
    p.add_argument("--mmproj-quant", default=None, choices=GGUF_MMPROJ_QUANTS,
                   help="gguf: type of the vision file (default: Q8_0 with --quant Q8_0, else F16)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default="model", help="gguf: file stem (default 'model' -> model-Q4_K_M.gguf)")
    p.add_argument("--stock-pinpoints", action="store_true",
                   help="gguf: also write AnyRes pinpoints for stock llama.cpp tools (see docs/gguf.md)")
    p.add_argument("--force", action="store_true", help="re-export even when the manifest says it is up to date")
    p.add_argument("--no-verify", action="store_true", help="gguf: skip the read-back and llama.cpp test decode")
    add_repack_arg(p)
    p.set_defaults(func=run)


def _source(args: argparse.Namespace) -> Path:
    if args.source:
        return Path(args.source)
    from r4b_edge.api import default_model_path

    return default_model_path()


def run(args: argparse.Namespace) -> int:
    from r4b_edge.errors import ExportError

    src = _source(args)
    if args.format == "gguf":
        from .gguf import export_gguf

        quant = args.quant or "Q4_K_M"
        r = export_gguf(src, args.out, quant=quant, mmproj_quant=args.mmproj_quant, name=args.name,
                        verify=not args.no_verify, stock_pinpoints=args.stock_pinpoints, force=args.force,
                        repack=args.llama_repack)
        state = "up to date, nothing written" if r.skipped else "written"
        print(f"gguf {r.quant} (mmproj {r.mmproj_quant}) {state}:")
        for f in (r.text, r.mmproj, r.manifest):
            size = f"{f.stat().st_size / 2**20:.1f} MiB" if f.exists() else ""
            print(f"  {f}  {size}")
        if r.verified:
            print(f"verified: decodes in llama.cpp here, {r.verified}")
        print(f"run it: r4b-edge chat IMAGE \"question\" --backend llama --model {r.text}")
        return 0
    if args.mmproj_quant or args.stock_pinpoints or args.name != "model":
        raise ExportError("--mmproj-quant, --stock-pinpoints and --name apply to --format gguf only")
    precision = (args.quant or "fp32").lower()
    if precision not in ONNX_PRECISIONS:
        raise ExportError(f"unknown ONNX precision {args.quant!r}: use one of {', '.join(ONNX_PRECISIONS)}")
    from .onnx import export_onnx

    out = export_onnx(src, args.out, precision=precision, force=args.force)
    print(f"onnx {precision} written: {out}", file=sys.stdout)
    return 0
