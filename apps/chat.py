"""`r4b-edge chat IMAGE [PROMPT]`: one-shot reply, or a multi-turn REPL.

The image is read and checked before the model loads, so a missing or unreadable
file fails at once. In the REPL, a line that starts with `/` is a command (`/help`
lists them: /reset, /stats, /exit); an empty line does nothing. Ctrl-C during an
answer stops it and returns to the prompt (the conversation keeps its earlier
turns); Ctrl-D, `/exit` or Ctrl-C at the prompt quits.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from r4b_edge.model.processing import IMAGE_FORMATS_TEXT

from .common import add_generation_args, add_model_args, generation_options, load_model
from .progress import ProgressLine

DIM, RESET = "\033[2m", "\033[0m"

#: REPL commands -> what they do (the /help text); /quit and /? are aliases.
COMMANDS = {
    "/help": "list these commands (also /?)",
    "/reset": "forget the conversation; the image stays",
    "/stats": "the stats line of the last reply (timings, tokens, tok/s, memory)",
    "/exit": "quit (also /quit or Ctrl-D)",
}
ALIASES = {"/?": "/help", "/quit": "/exit"}


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat about an image", description=__doc__)
    p.add_argument("image", help=f"image file ({IMAGE_FORMATS_TEXT}); 'none' for a text-only chat")
    p.add_argument("prompt", nargs="?", default=None, help="question; without it, an interactive session starts")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the model's settings (precision, context, image budget) and the image's grid first, "
                        "and the stats line after each reply")
    p.add_argument("--json", action="store_true", help="print the result object as JSON (one-shot)")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="largest image, width x height (default 64,000,000: the decompression-bomb guard)")
    p.add_argument("--fresh", action="store_true",
                   help="interactive: answer every question on its own, about the image, without the earlier "
                        "turns (the image's positions stay in the cache and are reused)")
    p.set_defaults(func=run)


def decision_line(think: bool, p_think: float | None, forced: bool) -> str:
    """`thinking… p_think=0.93`, `answering directly… p_think=0.04`; `forced, ` in front when the mode
    or a threshold decided; no p_think where it was not measured."""
    label = ("forced, " if forced else "") + ("thinking…" if think else "answering directly…")
    return label if p_think is None else f"{label} p_think={p_think:.2f}"


def _render(events, args: argparse.Namespace, out: TextIO) -> object:
    """Print a reply as it streams; returns the Result."""
    from r4b_edge import Decision, Progress

    color = out.isatty()
    dim, reset = (DIM, RESET) if color else ("", "")
    result, in_reasoning = None, False
    waiting = ProgressLine(sys.stderr)  # a line on a terminal while the image and prompt are read
    try:
        for ev in events:
            if isinstance(ev, Progress):
                waiting.update(ev)
                continue
            if isinstance(ev, Decision):
                waiting.close()
            result, in_reasoning = _show(ev, args, out, dim, reset, result, in_reasoning)
    finally:
        waiting.close()
    return result


def _show(ev, args: argparse.Namespace, out: TextIO, dim: str, reset: str, result, in_reasoning: bool):
    """Print one event; returns (result, in_reasoning)."""
    from r4b_edge import AnswerDelta, Decision, Done, ReasoningDelta

    if isinstance(ev, Decision):
        print(f"{dim}[{decision_line(ev.think, ev.p_think, ev.forced)}]{reset}", file=out, flush=True)
        if ev.deadline is not None:
            d = ev.deadline
            print(f"{dim}[deadline {d.deadline_ms:.0f} ms: {d.reason}; {d.tok_s:.1f} tok/s "
                  f"({d.tok_s_source}), expected ~{d.expected_total_ms:.0f} ms]{reset}", file=out, flush=True)
    elif isinstance(ev, ReasoningDelta):
        if not args.hide_thinking:
            out.write(f"{dim}{ev.text}{reset}")
            out.flush()
            in_reasoning = True
    elif isinstance(ev, AnswerDelta):
        if in_reasoning:
            out.write("\n\n")
            in_reasoning = False
        out.write(ev.text)
        out.flush()
    elif isinstance(ev, Done):
        result = ev.result
        out.write("\n")
        if result.stats.finish_reason == "stop_in_reasoning":
            from r4b_edge.engine.events import STOPPED_IN_REASONING

            print(f"{dim}[{STOPPED_IN_REASONING}]{reset}", file=out)
        if args.verbose:
            print(f"{dim}{result.stats.line()}{reset}", file=out)
    return result, in_reasoning


def verbose_lines(model, image) -> list[str]:
    """What --verbose prints before the first reply: the backend and its settings, the image budget
    and how the image was tiled (`image 1920x1080 -> grid 1x2 + base view, 2052 positions (budget 2560)`)."""
    from r4b_edge.model.image_budget import describe_image

    info = model.info()
    precision = info.get("dtype") or info["precision"]
    threads = f", {info['threads']} thread(s)" if info.get("threads") else ""
    budget = info["image_budget"]
    asked = "full" if info["image_tokens"] is None else info["image_tokens"]
    lines = [f"model: {info['backend']}/{info['device']}, {precision}, n_ctx {info['n_ctx']}{threads}",
             f"image tokens: {asked} -> " + ("the full grid" if budget is None else f"budget {budget} positions")]
    if image is not None:
        lines.append(describe_image(image))
    return lines


def read_image(image: str, max_pixels: int | None) -> Any:
    """The RGB image `chat` was given (None for 'none'), read and checked before any model loads;
    the too-large hint names this command's flag."""
    from r4b_edge.errors import ImageTooLargeError, R4BError
    from r4b_edge.model.processing import DEFAULT_MAX_PIXELS, load_image

    if max_pixels is not None and max_pixels < 1:
        raise R4BError(f"--max-image-pixels must be >= 1, got {max_pixels}")
    if image.lower() == "none":
        return None
    try:
        return load_image(image, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    except ImageTooLargeError as e:
        size = f"{e.pixels} pixels" if e.pixels else "too many pixels"
        raise ImageTooLargeError(f"{image}: image is {size}, over the limit of {e.limit} pixels "
                                 f"(decompression-bomb guard); pass --max-image-pixels {e.pixels or 'N'} "
                                 "(or larger) to allow it", e.pixels, e.limit) from None


def _turn(conv, line: str, opts: dict, args: argparse.Namespace) -> Any:
    """One REPL answer; Ctrl-C stops it and leaves the conversation as it was before the question.
    Returns the Result, or None for a stopped answer."""
    events = conv.stream(line, **opts)
    try:
        return _render(events, args, sys.stdout)
    except KeyboardInterrupt:
        events.close()  # the engine stops now; the unanswered question is not recorded
        print("\n[stopped]", flush=True)
        return None


def _help() -> str:
    width = max(len(c) for c in COMMANDS) + 2
    rows = [f"  {c:<{width}}{text}" for c, text in COMMANDS.items()]
    return "\n".join(["commands (a line that starts with / is a command, never a question):", *rows,
                      "an empty line does nothing; Ctrl-C stops an answer, and quits at the prompt"])


def _command(line: str, conv, image: str, last: Any) -> bool:
    """Run one REPL command; False when it quits."""
    word, _, rest = line.partition(" ")
    cmd = ALIASES.get(word, word)
    if cmd not in COMMANDS:
        print(f"unknown command {word}: type /help for the commands (a question cannot start with /)", flush=True)
        return True
    if rest.strip():
        print(f"{word} takes no argument (got {rest.strip()!r}); /help lists the commands", flush=True)
        return True
    if cmd == "/exit":
        return False
    if cmd == "/help":
        print(_help(), flush=True)
    elif cmd == "/reset":
        conv.reset()
        about = "with no image" if image.lower() == "none" else f"about {image}"
        print(f"[conversation reset: the next question starts a new chat {about}]", flush=True)
    elif cmd == "/stats":
        print(last.stats.line() if last is not None
              else "[no stats: no reply has finished yet, or the last one was stopped]", flush=True)
    return True


def _repl(model, conv, opts: dict, args: argparse.Namespace) -> None:
    info = model.info()
    print(f"r4b-edge chat on {args.image} ({info['backend']}/{info['device']}); /help for commands, "
          "Ctrl-D or /exit to quit, Ctrl-C during an answer stops it, "
          + ("every question on its own (--fresh)" if args.fresh else "/reset to forget the conversation"),
          flush=True)
    if model.is_bundled:
        from r4b_edge.api import BUNDLED_MODEL_NOTE

        print(f"[note: {BUNDLED_MODEL_NOTE}]", flush=True)
    last = None
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            if not _command(line, conv, args.image, last):
                return
            continue
        if args.fresh:
            conv.reset()
        last = _turn(conv, line, opts, args)


def run(args: argparse.Namespace) -> int:
    image = read_image(args.image, args.max_image_pixels)  # seconds before the model would say so
    model = load_model(args)
    opts = generation_options(args)
    try:
        if args.max_image_pixels is not None:
            model.max_pixels = args.max_image_pixels
        conv = model.conversation(image)
        if args.verbose and not args.json:
            dim, reset = (DIM, RESET) if sys.stdout.isatty() else ("", "")
            for line in verbose_lines(model, conv.image):
                print(f"{dim}[{line}]{reset}", flush=True)
        if args.prompt is None:
            _repl(model, conv, opts, args)
        elif args.json:
            r = conv.ask(args.prompt, **opts)
            print(json.dumps(r.to_dict(), indent=2, ensure_ascii=False))
        else:
            if model.is_bundled and sys.stderr.isatty():  # a person, not a script: say what it can read
                from r4b_edge.api import BUNDLED_MODEL_NOTE

                print(f"{DIM}[note: {BUNDLED_MODEL_NOTE}]{RESET}", file=sys.stderr, flush=True)
            _render(conv.stream(args.prompt, **opts), args, sys.stdout)
        return 0
    finally:
        model.close()
