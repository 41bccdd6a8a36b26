"""Stop strings: the streaming filter (hold-back of a possible stop prefix, splits across tokens) and option checks."""
from __future__ import annotations

import numpy as np
import pytest

from r4b_edge.engine.stop import MAX_STOPS, StopFilter, normalize_stop
from r4b_edge.errors import GenerationOptionError


def run(stops, pieces):
    f = StopFilter(stops)
    shown = [f.push(p) for p in pieces]
    return shown, f.hit, "".join(shown) + f.flush()


def reference(stops, text):
    """What the whole reply should be: left-stripped, cut before the earliest stop string."""
    text = text.lstrip()
    cuts = [(text.find(s), s) for s in stops if s in text]
    if not cuts:
        return text, None
    i, s = min(cuts, key=lambda c: c[0])
    return text[:i], s


def test_stop_split_across_tokens_is_never_shown():
    shown, hit, out = run(["STOP"], ["The answer", " is 4 S", "T", "OP", " and more"])
    assert out == "The answer is 4 " and hit == "STOP"
    assert shown == ["The answer", " is 4 ", "", "", ""]  # " S" and "T" held back until settled


def test_held_prefix_released_when_it_is_not_a_stop():
    shown, hit, out = run(["STOP"], ["a S", "TA", "y"])
    assert shown == ["a ", "STA", "y"] and hit is None and out == "a STAy"
    shown, hit, out = run(["STOP"], ["a S", "T", "O", "x"])  # held over three pieces, then released
    assert shown == ["a ", "", "", "STOx"] and hit is None


def test_held_tail_released_at_the_end():
    shown, hit, out = run(["\n\nQ:"], ["four", "\n\n"])
    assert shown == ["four", ""] and hit is None and out == "four\n\n"


def test_earliest_of_several_stops_wins_and_leading_space_is_not_matched():
    _, hit, out = run(["b", "\n"], ["\n\n", "a", "\nb"])
    assert (out, hit) == ("a", "\n")
    _, hit, out = run(["\n"], ["\n\n", "  x", "y\nz"])  # the blank line before the answer is not a stop
    assert (out, hit) == ("xy", "\n")


def test_stop_at_the_very_start_gives_an_empty_answer():
    _, hit, out = run(["The"], [" The", " rest"])
    assert (out, hit) == ("", "The")


@pytest.mark.parametrize("seed", range(40))
def test_random_splits_match_the_whole_text_reference(seed):
    rng = np.random.default_rng(seed)
    alphabet = list("ab \nc東")
    text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
    stops = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 4)))]
    cuts = sorted(rng.integers(0, len(text) + 1, size=int(rng.integers(0, 10))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    shown, hit, out = run(stops, pieces)
    assert (out, hit) == reference(stops, text)
    # whatever was shown is a prefix of the final text (nothing shown is ever taken back)
    assert out.startswith("".join(shown))


def _held_reference(stops, buf):
    """The longest tail of `buf` that is a proper prefix of some stop string (brute force)."""
    return max([n for s in stops for n in range(1, len(s)) if buf.endswith(s[:n])], default=0)


@pytest.mark.parametrize("seed", range(60))
def test_held_back_tail_is_the_longest_stop_prefix(seed):
    """Every push shows exactly the text up to the longest tail that could still start a stop
    string; stops with repeated characters ("aab", "abab") need the later candidate starts."""
    rng = np.random.default_rng(100 + seed)
    alphabet = list("ab<")
    stops = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 7)))) for _ in range(int(rng.integers(1, 4)))]
    f, buf, shown_all = StopFilter(stops), "", ""
    f.started = True  # leading whitespace is not what this test is about
    for _ in range(30):
        piece = "".join(rng.choice(alphabet, size=int(rng.integers(0, 5))))
        shown = f.push(piece)
        if f.hit is not None:
            break
        buf += piece
        keep = _held_reference(stops, buf)
        assert shown_all + shown == buf[:len(buf) - keep] and f.held == buf[len(buf) - keep:]
        shown_all += shown


def test_normalize_stop():
    assert normalize_stop(None) == ()
    assert normalize_stop("x") == ("x",)
    assert normalize_stop(["a", "b", "a"]) == ("a", "b")
    for bad, msg in [("", "empty"), ([""], "empty"), ([1], "must be a string"), (3, "string or a list"),
                     (["a"] * (MAX_STOPS + 1), "at most"), (["x" * 1001], "characters"),
                     (["\ud800"], "Unicode")]:
        with pytest.raises(GenerationOptionError, match=msg):
            normalize_stop(bad)
