"""Server memory under an image flood: 8 concurrent requests, each a ~4 KB PNG of 25 MP.

Starts `r4b-edge serve` (the bundled model unless --model) in a subprocess, sends the
requests at once, and samples the server's resident memory every 10 ms; reports the
baseline, the peak (max of the samples and the kernel's VmHWM) and what stays resident
2 s after the last reply. Run it once per pixel-limit setting:

    python benchmarks/serve_memory.py                                 # the server's defaults
    python benchmarks/serve_memory.py --max-image-pixels 26000000     # the 25 MP images decoded
    python benchmarks/serve_memory.py --repo /path/to/other/checkout  # another version's server

Results go to benchmarks/results/serve_memory.json (one entry per label).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "serve_memory.json"


def _png_25mp(side: int = 5000) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def run(args: argparse.Namespace) -> dict:
    import httpx

    repo = Path(args.repo).resolve()
    cmd = [sys.executable, "-m", "r4b_edge.apps.cli", "serve", "--port", "0", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_image_pixels:
        cmd += ["--max-image-pixels", str(args.max_image_pixels)]
    env = {**os.environ, "PYTHONPATH": str(repo)} if args.repo != "." else dict(os.environ)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo, env=env)
    try:
        line = p.stdout.readline()
        if " on " not in line:
            raise RuntimeError(f"server did not start: {line}{p.stderr.read() if p.poll() is not None else ''}")
        url = line.split(" on ")[1].split()[0]
        deadline = time.monotonic() + 30
        while True:  # older versions print the banner before listening
            try:
                httpx.get(url + "/models", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(1.0)
        base = _status_kb(p.pid, "VmRSS")
        png = _png_25mp()
        uri = f"data:image/png;base64,{base64.b64encode(png).decode()}"
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                          {"type": "text", "text": "what colour?"}]}],
                "max_tokens": 1}
        peak, done = [base], threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], _status_kb(p.pid, "VmRSS"))
                except (OSError, RuntimeError):
                    return
                time.sleep(0.01)

        codes: list = []

        def one() -> None:
            r = httpx.post(url + "/chat/completions", json=body, timeout=300)
            codes.append(r.status_code if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}")

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=one) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.monotonic() - t0
        time.sleep(2.0)
        done.set()
        sampler.join()
        after = _status_kb(p.pid, "VmRSS")
        hwm = _status_kb(p.pid, "VmHWM")
        return {"label": args.label, "png_bytes": len(png), "pixels": 5000 * 5000, "concurrency": args.concurrency,
                "server_args": cmd[4:], "replies": sorted(map(str, codes)), "wall_s": round(wall, 2),
                "rss_before_mb": round(base / 1024), "rss_peak_mb": round(max(peak[0], hwm) / 1024),
                "rss_after_mb": round(after / 1024),
                "peak_over_baseline_mb": round((max(peak[0], hwm) - base) / 1024)}
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled model)")
    ap.add_argument("--max-image-pixels", type=int, default=None, help="passed to the server (default: its own)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repo", default=".", help="checkout whose server runs (default: this one)")
    ap.add_argument("--label", default=None, help="name of this result (default: from the settings)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    args.label = args.label or f"max_image_pixels={args.max_image_pixels or 'default'}"
    res = run(args)
    print(json.dumps(res, indent=2))
    if not args.no_save:
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        old[res["label"]] = res
        RESULTS.write_text(json.dumps(old, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
