"""Re-make every artefact that describes the shipped model, in order, into one folder.

    python -m r4b_edge.benchmarks.card.remake --model r4b_edge/assets/model --out /tmp/remake
    python -m r4b_edge.benchmarks.card.remake --quick --out /tmp/remake-dry      # shrunk counts: plumbing only
    python -m r4b_edge.benchmarks.card.remake --list                             # the steps and their commands
    python -m r4b_edge.benchmarks.card.remake --out /tmp/remake --steps bench,screenshot   # some steps again

Steps (each a subprocess with its own log in OUT/logs/, its wall time and the load average
printed and kept in OUT/remake.json; a failing step or a missing output stops the run with
the step's name, exit status and log tail):

  quant-gguf    GGUF F16/Q8_0/Q4_K_M vs torch: accuracy, think-rate (quant_eval)  -> gguf/QUANT_GGUF.md
                (the card's "GGUF quantizations" table and docs/gguf.md's quantization table)
  parity-gguf   GGUF pairs vs torch: embedding / logit max |diff|, greedy identity (parity_report)
                -> gguf/PARITY_GGUF.md (the card's parity table, docs/gguf.md "Approximations")
  onnx          ONNX fp32/int8/int4 vs torch: parity, accuracy, decode tok/s (onnx_report)
                -> onnx/QUANT_ONNX.md (the card's ONNX table, docs/onnx.md)
  bench         `r4b-edge bench`, the committed full run's settings -> bench/results.{json,md} and
                the two plots (benchmarks/results/, README "Benchmarks", benchmarks/README.md)
  screenshot    `r4b-edge app --screenshot` offscreen on the quick-start image -> img/app.png
                (docs/img/app.png)
  examples      the same `total` question answered directly on one image and thought through on
                another (pick_examples) -> examples/total-{direct,think}.png + examples.json
                (r4b_edge/assets/examples/, the README paragraph)
  card-sections the three tables above joined -> MODEL_CARD_sections.md (what the model card's
                GGUF/ONNX sections hold: `train ship` does not write them)

Not re-made (they do not depend on the shipped weights): the 4B-shape roofline and the
true-shape run (random weights), the host-overhead table (synthetic logits; it reads only the
bundled model's *tokenizer*). The deadline sweep (`r4b-edge bench --deadline-sweep`) does run
the bundled model (torch fp32) and so describes the model it ran on; it is left out here too
(opt-in: `--steps deadline-sweep`).

`--apply REPO` copies the file artefacts of a full run (never of --quick) into the repository:
bench results + plots, the screenshot and the example pair; the tables in docs/ and README are
edited by hand from the files above.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from r4b_edge.errors import R4BError

SCREENSHOT_PROMPT = "What is the sum of all the digits?"
DEFAULT_STEPS = ("quant-gguf", "parity-gguf", "onnx", "bench", "screenshot", "examples", "card-sections")
OPTIONAL_STEPS = ("deadline-sweep",)
ALL_STEPS = DEFAULT_STEPS + OPTIONAL_STEPS
#: full-run sizes (the committed runs' settings) and --quick sizes
FULL = {"per_family": 25, "parity_prompts": 20, "onnx_parity_prompts": 24, "bench_eval_per_family": 8,
        "examples_per_family": 64, "deadline_per_family": 4}
QUICK = {"per_family": 1, "parity_prompts": 2, "onnx_parity_prompts": 2, "bench_eval_per_family": 1,
         "examples_per_family": 64, "deadline_per_family": 1}


class RemakeError(R4BError):
    """A remake step failed, left an output missing, or was asked for wrongly."""


@dataclass
class Step:
    """One artefact: a command (or an in-process function) and the files it must leave."""

    name: str
    what: str
    argv: Optional[list[str]] = None
    fn: Optional[Callable[[], None]] = None
    outputs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        if self.argv is None:
            return f"(in process) {self.what}"
        argv = list(self.argv)
        if argv[:2] == [sys.executable, "-m"]:
            argv = ["python", "-m"] + argv[2:]
        return (env + " " if env else "") + shlex.join(argv)


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def build_steps(model: Path, out: Path, work: Path, quick: bool = False, names: Sequence[str] = DEFAULT_STEPS,
                threads: int | None = None, image: Path | None = None) -> list[Step]:
    """The steps `names` (in the fixed order of ALL_STEPS) for `model`, writing under `out`."""
    unknown = [n for n in names if n not in ALL_STEPS]
    if unknown:
        raise RemakeError(f"unknown step(s) {unknown}; known: {', '.join(ALL_STEPS)}")
    if threads is not None and threads < 1:
        raise RemakeError(f"--threads must be >= 1, got {threads}")
    from r4b_edge.api import BUNDLED_MODEL, EXAMPLE_IMAGE

    bundled = Path(model).resolve() == BUNDLED_MODEL.resolve()
    n = QUICK if quick else FULL
    image = image or EXAMPLE_IMAGE
    g, o, b = out / "gguf", out / "onnx", out / "bench"
    steps = {
        "quant-gguf": Step(
            "quant-gguf", "GGUF quant table", _py("r4b_edge.benchmarks.card.quant_eval", model, "--work", work / "quant",
                                                  "--per-family", n["per_family"], "--out", g / "QUANT_GGUF.md"),
            outputs=[g / "QUANT_GGUF.md", g / "QUANT_GGUF.json"]),
        "parity-gguf": Step(
            "parity-gguf", "GGUF parity table", _py("r4b_edge.benchmarks.card.parity_report", model, "--work",
                                                    work / "parity", "--prompts", n["parity_prompts"],
                                                    "--out", g / "PARITY_GGUF.md"),
            outputs=[g / "PARITY_GGUF.md", g / "PARITY_GGUF.json"]),
        "onnx": Step(
            "onnx", "ONNX precision table", _py("r4b_edge.benchmarks.card.onnx_report", "--model", model, "--exports",
                                                work / "onnx", "--per-family", n["per_family"], "--parity-prompts",
                                                n["onnx_parity_prompts"], "--threads", threads or 2,
                                                "--md", o / "QUANT_ONNX.md", "--json", o / "onnx_report.json"),
            outputs=[o / "QUANT_ONNX.md", o / "onnx_report.json"]),
        "bench": Step(
            "bench", "r4b-edge bench", _py("r4b_edge.apps.cli", "bench", "--model", model, "--backends",
                                           "torch,llama,onnx", "--cache", work / "bench-cache", "--device", "cpu",
                                           "--threads", threads or 1, "--out", b,
                                           *(["--quick"] if quick else
                                             ["--eval-per-family", n["bench_eval_per_family"], "--image", "both",
                                              "--max-tokens", 64, "--modes", "auto,think,no-think", "--n-gen", 64,
                                              "--n-prompt", 256, "--repeats", 5, "--warmup", 1])),
            outputs=[b / "results.json", b / "results.md", b / "accuracy_vs_time.png", b / "decode_tps.png"]),
        "screenshot": Step(  # the bundled model is the app's default: no --model, so the field shows "default"
            "screenshot", "desktop app screenshot",
            _py("r4b_edge.apps.cli", "app", *([] if bundled else ["--model", model]), "--image", image,
                "--prompt", SCREENSHOT_PROMPT, "--screenshot", out / "img" / "app.png"),
            outputs=[out / "img" / "app.png"], env={"QT_QPA_PLATFORM": "offscreen"}),
        "examples": Step(
            "examples", "example pair", _py("r4b_edge.benchmarks.card.pick_examples", "--model", model, "--per-family",
                                            n["examples_per_family"], "--out-dir", out / "examples",
                                            "--json", out / "examples" / "examples.json"),
            outputs=[out / "examples" / "total-direct.png", out / "examples" / "total-think.png",
                     out / "examples" / "examples.json"]),
        "card-sections": Step(
            "card-sections", "join the GGUF/ONNX tables into MODEL_CARD_sections.md",
            fn=lambda: card_sections(out), outputs=[out / "MODEL_CARD_sections.md"]),
        "deadline-sweep": Step(
            "deadline-sweep", "deadline sweep (torch fp32 on the model)",
            _py("r4b_edge.apps.cli", "bench", "--deadline-sweep", "--model", model, "--eval-per-family",
                n["deadline_per_family"], "--threads", threads or 1, "--out", out / "deadline",
                *(["--quick"] if quick else [])),
            outputs=[out / "deadline" / "deadline_sweep.json", out / "deadline" / "deadline_sweep.md"]),
    }
    return [steps[s] for s in ALL_STEPS if s in names]


def card_sections(out: Path) -> Path:
    """MODEL_CARD_sections.md: the GGUF quant table, the parity table and the ONNX table, in the
    order the model card carries them (the card's own generator does not write these)."""
    parts = [("gguf/QUANT_GGUF.md", None),
             ("gguf/PARITY_GGUF.md", "### Parity of the GGUF pairs with torch\n\n"
              "`python -m r4b_edge.benchmarks.card.parity_report` (held-out eval items, interleaved over the families; "
              "max abs difference vs torch fp32):\n"),
             ("onnx/QUANT_ONNX.md", None)]
    missing = [p for p, _ in parts if not (out / p).is_file()]
    if missing:
        raise RemakeError(f"card-sections needs {', '.join(missing)} in {out}: run the quant-gguf, parity-gguf "
                          "and onnx steps first")
    text = "\n".join((head + "\n" if head else "") + (out / p).read_text(encoding="utf-8").strip() + "\n"
                     for p, head in parts)
    dst = out / "MODEL_CARD_sections.md"
    dst.write_text(text, encoding="utf-8")
    return dst


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_steps(steps: Sequence[Step], out: Path, log: Callable[[str], None] = print,
              record: Optional[dict] = None) -> dict:
    """Run `steps` in order; each step's output goes to OUT/logs/NAME.log. Returns the record
    (also written to OUT/remake.json after every step). Raises RemakeError on the first failure."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rec = record if record is not None else {"steps": []}
    t_all = time.perf_counter()
    for st in steps:
        entry = {"name": st.name, "what": st.what, "command": st.command(), "load_start": _load(),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log(f"[remake] {st.name}: {entry['command']}")
        t0 = time.perf_counter()
        log_path = logs / f"{st.name}.log"
        err = None
        if st.fn is not None:
            try:
                st.fn()
                log_path.write_text(f"{st.what}: done\n")
                rc = 0
            except R4BError as e:
                log_path.write_text(f"{type(e).__name__}: {e}\n")
                rc, err = 1, str(e)
        else:
            with open(log_path, "w") as f:
                rc = subprocess.run(st.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **st.env}).returncode
        entry.update(rc=rc, wall_s=round(time.perf_counter() - t0, 1), load_end=_load())
        missing = [str(p) for p in st.outputs if not p.is_file()] if rc == 0 else []
        entry["missing_outputs"] = missing
        rec["steps"] = [s for s in rec["steps"] if s["name"] != st.name] + [entry]
        rec["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (out / "remake.json").write_text(json.dumps(rec, indent=2) + "\n")
        log(f"[remake] {st.name}: {'ok' if rc == 0 and not missing else 'FAILED'} in {entry['wall_s']:.1f} s "
            f"(load {entry['load_start']} -> {entry['load_end']})")
        if rc != 0 or missing:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            why = err or (f"exit status {rc}" if rc else f"it left no {', '.join(missing)}")
            raise RemakeError(f"step {st.name} failed after {entry['wall_s']:.1f} s: {why}; log {log_path}:\n{tail}")
    log(f"[remake] {len(steps)} step(s) done in {time.perf_counter() - t_all:.1f} s")
    return rec


def apply(out: Path, repo: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Copy a full run's file artefacts into the repository (the tables are edited by hand)."""
    rec_p = out / "remake.json"
    if not rec_p.is_file():
        raise RemakeError(f"{rec_p} missing: --apply needs a finished remake run in --out")
    rec = json.loads(rec_p.read_text())
    if rec.get("quick"):
        raise RemakeError(f"{out} holds a --quick run: its counts are shrunk, so nothing of it goes into the repo")
    done = {s["name"] for s in rec.get("steps", []) if s.get("rc") == 0 and not s.get("missing_outputs")}
    plan = {"bench": [(out / "bench" / f, repo / "benchmarks" / "results" / f) for f in
                      ("results.json", "results.md", "accuracy_vs_time.png", "decode_tps.png")],
            "screenshot": [(out / "img" / "app.png", repo / "docs" / "img" / "app.png")],
            "examples": [(out / "examples" / f, repo / "r4b_edge" / "assets" / "examples" / f)
                         for f in ("total-direct.png", "total-think.png")]}
    copied = []
    for step, pairs in plan.items():
        if step not in done:
            log(f"[remake] apply: step {step} did not finish in {out}; its files are left as they are")
            continue
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
            log(f"[remake] apply: {src} -> {dst}")
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r4b_edge.benchmarks.card.remake", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=None, help="folder for every artefact, logs and remake.json")
    ap.add_argument("--work", type=Path, default=None, help="folder for the exports (default OUT/work; reused)")
    ap.add_argument("--quick", action="store_true", help="shrunk counts: proves the plumbing, numbers mean nothing")
    ap.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                    help=f"comma list, run in the fixed order (default: all but {', '.join(OPTIONAL_STEPS)})")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for bench and onnx (default: the committed runs': bench 1, onnx 2)")
    ap.add_argument("--image", type=Path, default=None, help="screenshot image (default: the quick-start image)")
    ap.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    ap.add_argument("--apply", type=Path, default=None, metavar="REPO",
                    help="after the run (or alone, with --steps ''), copy the file artefacts into REPO")
    a = ap.parse_args(argv)
    from r4b_edge.api import default_model_path

    model = a.model if a.model is not None else default_model_path()
    if not (model / "config.json").is_file():
        raise RemakeError(f"--model {model} is not a model folder (no config.json)")
    if a.out is None and not a.list:
        raise RemakeError("--out is required: a scratch folder for the artefacts (not the repository)")
    out = (a.out or Path("remake-out")).expanduser()
    if out.exists() and not out.is_dir():
        raise RemakeError(f"--out {out} is a file: pass a folder")
    if a.apply is not None and a.quick:
        raise RemakeError("--apply with --quick: a --quick run's numbers never go into the repository")
    names = [s.strip() for s in a.steps.split(",") if s.strip()]
    steps = build_steps(model, out.resolve(), (a.work or out / "work").resolve(), a.quick, names, a.threads, a.image)
    if a.list:
        for st in steps:
            print(f"{st.name}: {st.command()}\n    -> {', '.join(str(p) for p in st.outputs)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rec_p = out / "remake.json"
    rec = json.loads(rec_p.read_text()) if rec_p.is_file() else {"steps": []}
    if rec.get("steps") and bool(rec.get("quick")) != a.quick:
        raise RemakeError(f"{out} holds a {'--quick' if rec.get('quick') else 'full'} run: use another --out")
    rec.update(model=str(model), quick=a.quick, command=shlex.join(["python", "-m", "r4b_edge.benchmarks.card.remake",
                                                                    *(argv if argv is not None else sys.argv[1:])]))
    if steps:
        run_steps(steps, out, record=rec)
    if a.apply is not None:
        apply(out, a.apply)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except R4BError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
