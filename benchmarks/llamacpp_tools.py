"""llama.cpp's own tools on the true-size bench's GGUF files: `llama-mtmd-cli` (time to first
token of a base-view image, parsed from its `--perf -v` log) and `llama-server` with its prompt
cache (one request per turn, `timings` from the response, peak RSS from /proc)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

def llama_bin_dir(explicit: str | None = None) -> Path | None:
    """The folder with llama-mtmd-cli and llama-server: `explicit`, else $R4B_LLAMA_CPP_BIN, else PATH."""
    for cand in (explicit, os.environ.get("R4B_LLAMA_CPP_BIN")):
        if cand and (Path(cand) / "llama-mtmd-cli").is_file() and (Path(cand) / "llama-server").is_file():
            return Path(cand).resolve()
    a, b = shutil.which("llama-mtmd-cli"), shutil.which("llama-server")
    if a and b and Path(a).parent == Path(b).parent:
        return Path(a).parent.resolve()
    return None


def _run_capture(cmd: list[str], timeout: float) -> tuple[int, str, str, float, float]:
    """Run `cmd`; returns (exit code, stdout, stderr, wall s, its peak RSS MiB from wait4)."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    bufs: dict[str, str] = {}

    def read(name: str, stream: Any) -> None:
        bufs[name] = stream.read()

    readers = [threading.Thread(target=read, args=(n, s), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for th in readers:
        th.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for th in readers:
        th.join()
    return proc.returncode, bufs.get("out", ""), bufs.get("err", ""), time.perf_counter() - t0, ru.ru_maxrss / 1024


def _lines_ms(text: str, pattern: str) -> list[float]:
    import re

    return [float(m) for m in re.findall(pattern, text)]


def parse_mtmd_log(log: str) -> dict:
    """llama-mtmd-cli's -v log: vision encode (`mtmd batch encoding done in N ms`), image embedding
    decode (`image decoded ... in N ms`), `llama_perf_context_print` prompt eval / eval."""
    import re

    d: dict[str, Any] = {}
    enc = _lines_ms(log, r"mtmd batch encoding done in (\d+) ms")
    d["vision_encode_ms"] = sum(enc) if enc else None
    dec = _lines_ms(log, r"image decoded \(batch \d+/\d+\) in (\d+) ms")
    d["image_decode_ms"] = sum(dec) if dec else None
    m = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    d["prompt_eval_ms"], d["prompt_positions"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"\n[^\n]*?\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
    d["decode_ms"], d["decode_runs"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    d["decode_tps"] = d["decode_runs"] / d["decode_ms"] * 1e3 if d["decode_ms"] else None
    m = re.search(r"load time =\s*([\d.]+) ms", log)
    d["load_ms"] = float(m.group(1)) if m else None
    # time to first token = vision encode + the prompt's evaluation (text and image positions;
    # the first sample is in neither and is negligible next to them)
    d["ttft_ms"] = (d["vision_encode_ms"] or 0.0) + d["prompt_eval_ms"] if d["prompt_eval_ms"] is not None else None
    return d


def _repack_flags(repack: bool | None) -> list[str]:
    return ["-nr"] if repack is False else []


def run_mtmd_cli(bin_dir: Path, text: str, mmproj: str, image: str, question: str, threads: int, n_ctx: int,
                 max_tokens: int, repack: bool | None, tries: int = 3) -> dict:
    """One `llama-mtmd-cli` run in no-think mode (the GGUF template with `short` as its default,
    docs/gguf.md); its timings parsed from the -v log (retried: its log thread may exit unflushed)."""
    from r4b_edge.model.template import chat_template_jinja

    cmd = [str(bin_dir / "llama-mtmd-cli"), "-m", text, "--mmproj", mmproj, "--jinja",
           "--chat-template", chat_template_jinja("short"), "--image", image, "-p", question, "--temp", "0",
           "-n", str(max_tokens), "-t", str(threads), "-c", str(n_ctx), "--perf", "-v"] + _repack_flags(repack)
    shown = (f"llama-mtmd-cli -m {text} --mmproj {mmproj} --jinja --chat-template \"$(python -c 'from "
             "r4b_edge.model.template import chat_template_jinja; print(chat_template_jinja(\"short\"))')\" "
             f"--image {image} -p {json.dumps(question)} --temp 0 -n {max_tokens} -t {threads} -c {n_ctx} --perf -v"
             + (" -nr" if repack is False else ""))
    last: dict = {}
    for _ in range(tries):
        rc, out, err, wall, peak = _run_capture(cmd, timeout=3600)
        d = parse_mtmd_log(err)
        last = d | {"command": shown, "wall_ms": wall * 1e3, "exit": rc, "peak_rss_mib": peak}
        if rc != 0:
            tail = err.strip().splitlines()[-1:] if err.strip() else []
            last["error"] = f"exit {rc}: {' | '.join(tail)}"
            return last
        if d["ttft_ms"] is not None:
            return last
    last["error"] = "no llama_perf_context_print timings in its log (tried %d times)" % tries
    return last


def _post_json(url: str, body: dict, timeout: float = 3600.0) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_llama_server(bin_dir: Path, text: str, mmproj: str, image: str, questions: list[str], threads: int,
                     n_ctx: int, max_tokens: int, repack: bool | None) -> dict:
    """`llama-server` (one slot, its prompt cache on: the default) and one request per turn, each
    resending the history + the next question as an OpenAI client does; per request its
    `timings` (prompt_n: positions evaluated, prompt_ms, cache_n: positions reused, predicted)."""
    import base64
    import urllib.error
    import urllib.request

    port = _free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", text, "--mmproj", mmproj, "--jinja", "--chat-template-kwargs",
           '{"thinking_mode":"short"}', "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-c", str(n_ctx), "-np", "1"] + _repack_flags(repack)
    shown = (f"llama-server -m {text} --mmproj {mmproj} --jinja --chat-template-kwargs "
             f"'{{\"thinking_mode\":\"short\"}}' --host 127.0.0.1 --port PORT -t {threads} -c {n_ctx} -np 1"
             + (" -nr" if repack is False else ""))
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"r4b-true-size-llama-server-{port}.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"command": shown, "requests": []}
    try:
        t0 = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                return out | {"error": f"llama-server did not start (exit {proc.poll()}): {' | '.join(tail)}"}
            time.sleep(0.5)
        out["load_ms"] = (time.perf_counter() - t0) * 1e3
        uri = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
        msgs: list[dict] = []
        for i, q in enumerate(questions):
            content: Any = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": q}] if i == 0 else q
            msgs.append({"role": "user", "content": content})
            t1 = time.perf_counter()
            r = _post_json(f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"model": "r4b", "messages": msgs, "temperature": 0, "max_tokens": max_tokens,
                            "cache_prompt": True})
            wall = (time.perf_counter() - t1) * 1e3
            answer = r["choices"][0]["message"].get("content") or ""
            msgs.append({"role": "assistant", "content": answer})
            tm = r.get("timings") or {}
            out["requests"].append({"turn": i + 1, "wall_ms": wall, "prompt_n": tm.get("prompt_n"),
                                    "prompt_ms": tm.get("prompt_ms"), "cache_n": tm.get("cache_n"),
                                    "predicted_n": tm.get("predicted_n"),
                                    "predicted_per_second": tm.get("predicted_per_second"),
                                    "prompt_tokens": (r.get("usage") or {}).get("prompt_tokens")})
        out["peak_rss_mib"] = _vm_hwm_mib(proc.pid)
    except Exception as e:  # reported in the JSON, never dropped
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out

