"""Users' own data (docs/data-format.md "Your own data"): a ~50-record JSONL with images of several
sizes, free-form answers, the shorthand, multi-turn records, system prompts and every answer-check
kind reads and validates; each bad-record kind is one line naming file, line and field, before any
model is loaded; `r4b-edge train check-data` reads files the same way; rollouts score with the
records' checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from r4b_edge.errors import TrainingError
from r4b_edge.train import data as D
from r4b_edge.train.checks import check

SIZES = {"img/wide.png": (640, 480), "img/tiny.png": (33, 21), "img/tall.jpg": (120, 300), "img/square.png": (64, 64)}
PYMOD = "userdata_checks_t1"


def _write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (40 * k, 200 - 30 * k, 90)).save(root / name)


def user_records() -> list[dict]:
    """50 records as a user would write them (shorthand and canonical)."""
    names = list(SIZES)
    recs: list[dict] = [{"image": names[i % 4], "question": f"What is written on sign {i}?",
                         "answer": f"Sign number {i} says hello", **({"trace": f"I read sign {i}."} if i % 3 == 0 else {})}
                        for i in range(36)]
    recs += [
        {"id": "numeric", "image": "img/wide.png", "question": "How many pixels wide is it?", "answer": "640",
         "check": {"kind": "numeric", "tolerance": 0.5}},
        {"id": "number-answer", "image": "img/tiny.png", "question": "Area in pixels?", "answer": 693,
         "check": {"kind": "numeric", "rel_tolerance": 0.01}},
        {"id": "choice", "images": ["img/wide.png", "img/tall.jpg"],
         "question": "Which is taller? A) the first image B) the second image", "answer": "B",
         "check": {"kind": "choice", "options": "AB"}},
        {"id": "regex", "image": "img/square.png", "question": "Its size as WxH?", "answer": "64x64",
         "check": {"kind": "regex", "pattern": r"\d+x\d+"}},
        {"id": "python", "image": "img/square.png", "question": "Describe it in two words or more.",
         "answer": "a green square", "check": {"kind": "python", "function": f"{PYMOD}:at_least", "words": 2}},
        {"id": "exact-list", "image": "img/tiny.png", "question": "Which city?", "answer": "New York",
         "check": {"kind": "exact", "answers": ["NYC"]}},
        {"id": "system", "system": "Answer in one word.", "image": "img/wide.png", "question": "Colour?", "answer": "Brown"},
        {"id": "text-only", "question": "What is 2+2?", "answer": "4", "check": {"kind": "numeric"}},
        {"id": "inline", "images": ["img/tiny.png", "img/square.png"],
         "question": "Compare <image> with <image>: which is bigger?", "answer": "the second"},
        {"id": "chat-open", "images": ["img/tall.jpg"], "messages": [
            {"role": "user", "content": "<image>\nWhat shape is it?"}, {"role": "assistant", "content": "A tall rectangle."},
            {"role": "user", "content": "How tall, in pixels?"}], "answer": "300", "check": {"kind": "numeric"}},
        {"id": "chat-closed", "images": ["img/wide.png"], "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A brown box."},
            {"role": "user", "content": "Anything else?"}, {"role": "assistant", "content": "No."}],
         "answer": None},
        {"id": 7, "image": "img/square.png", "question": "Is it square?", "answer": "yes", "trace": "64 = 64."},
        {"id": "subjective", "images": ["img/tall.jpg"], "messages": [
            {"role": "user", "content": "<image>\nWrite a haiku about it."},
            {"role": "assistant", "content": "Tall pale rectangle / standing in an empty frame / waiting for a view"}]},
        {"id": "nfkc", "image": "img/tiny.png", "question": "Which letter?", "answer": "\uff21"},
    ]
    return recs


@pytest.fixture()
def userdir(tmp_path, monkeypatch):
    _write_images(tmp_path)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{PYMOD}.py").write_text(
        "def at_least(answer, record):\n"
        "    n = len(answer.split())\n"
        "    return min(1.0, n / record['check']['words'])\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in user_records()))
    return p


def by_id(recs: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in recs}


def test_user_file_reads_into_canonical_records(userdir):
    recs = D.load_data(userdir)
    assert len(recs) == 50 == len(user_records())
    r = by_id(recs)
    assert r["data-1"]["messages"] == [{"role": "user", "content": "<image>\nWhat is written on sign 0?"},
                                       {"role": "assistant", "content": "Sign number 0 says hello"}]
    assert r["data-1"]["images"] == ["img/wide.png"] and r["data-1"]["trace"] == "I read sign 0."
    assert r["data-1"]["meta"] == {} and r["data-1"]["mode"] is None and "check" not in r["data-1"]
    assert r["number-answer"]["answer"] == "693" and r["7"]["answer"] == "yes"
    assert r["choice"]["messages"][0]["content"].startswith("<image>\n<image>\nWhich is taller?")
    assert r["inline"]["messages"][0]["content"] == "Compare <image> with <image>: which is bigger?"
    assert r["text-only"]["images"] == [] and r["text-only"]["messages"][0]["content"] == "What is 2+2?"
    assert r["chat-open"]["messages"][-1] == {"role": "assistant", "content": "300"} and len(r["chat-open"]["messages"]) == 4
    assert r["chat-closed"]["system"] == "You are terse." and r["chat-closed"]["messages"][0]["role"] == "user"
    for rec in recs:  # canonical records read back unchanged
        p = userdir.parent / "canon.jsonl"
        D.write_jsonl(p, [rec])
        assert D.load_data(p) == [rec]
    assert D.summarize(recs) == {"records": 50, "images": 4, "multi_turn": 2, "with_trace": 13, "with_system": 2,
                                 "subjective": 2, "checks": {"exact": 43, "numeric": 4, "choice": 1, "regex": 1, "python": 1}}


def test_system_prompt_and_turns_render_through_the_one_renderer(userdir):
    from r4b_edge.model.template import Message, render_conversation

    r = by_id(D.load_data(userdir))
    text = "".join(t for t, _ in D.record_pieces(r["system"]))
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n<image>\nColour?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\nBrown<|im_end|>")
    pieces = D.record_pieces(r["chat-closed"])
    assert pieces == render_conversation([Message("user", "<image>\nWhat is it?"), Message("assistant", "A brown box."),
                                          Message("user", "Anything else?"), Message("assistant", "No.")],
                                         "direct", "You are terse.")
    assert not pieces[0][1]  # the system prompt is never trained
    think = "".join(t for t, _ in D.record_pieces(r["7"], "think"))
    assert think.endswith("<think>\n64 = 64.\n</think>\n\nyes<|im_end|>")


def test_each_records_check_scores_answers(userdir):
    r = by_id(D.load_data(userdir))
    table = [("data-2", "sign number 1 says hello.", 1.0), ("data-2", "Sign number 2 says hello", 0.0),
             ("numeric", "It is 640.4 px wide", 1.0), ("numeric", "641", 0.0), ("number-answer", "about 699", 1.0),
             ("number-answer", "701", 0.0), ("choice", "The answer is B.", 1.0), ("choice", "A) the first image", 0.0),
             ("regex", "120x300", 1.0), ("regex", "64 x 64", 0.0), ("python", "square", 0.5), ("python", "a b c", 1.0),
             ("exact-list", "nyc", 1.0), ("exact-list", "Boston", 0.0), ("text-only", "4.0", 1.0), ("chat-open", "300 px", 1.0),
             ("nfkc", "a", 1.0), ("system", "brown!", 1.0)]
    assert [check(r[k], a) for k, a, _ in table] == [s for _, _, s in table]
    with pytest.raises(TrainingError, match="record 'subjective': this check compares with a gold answer"):
        check(r["subjective"], "nice")


GOOD = {"image": "img/square.png", "question": "Q?", "answer": "a"}
BAD = [  # (line written, field, reason; None: no field)
    ("{not json", None, "not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('["a"]', None, "a record is a JSON object, got list"),
    ({**GOOD, "qestion": "x"}, "qestion", "unknown field (did you mean 'question'?)"),
    ({**GOOD, "colour": "x"}, "colour", "unknown field (expected id, images, messages, answer, trace, mode, meta, "
                                        "system, check, image, question)"),
    ({**GOOD, "image": "img/missing.png"}, "image", "image file not found: {root}/img/missing.png"),
    ({"images": ["img/square.png", "nope.png"], "question": "Q?", "answer": "a"}, "images[1]",
     "image file not found: {root}/nope.png"),
    ({**GOOD, "image": "notes.png"}, "image", "not a readable image: {root}/notes.png (UnidentifiedImageError: "
                                              "cannot identify image file '{root}/notes.png')"),
    ({"images": ["img/square.png"], "question": "<image> and <image>?", "answer": "a"}, "images",
     "2 <image> placeholders but 1 images"),
    ({"images": [], "messages": [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "a"}]},
     "images", "1 <image> placeholders but 0 images"),
    ({**GOOD, "check": {"kind": "numbr"}}, "check.kind", "unknown kind 'numbr' (expected exact, numeric, choice, regex, python)"),
    ({**GOOD, "check": {"kind": "regex", "pattern": "[a"}}, "check.pattern",
     "bad regex '[a': unterminated character set at position 0"),
    ({**GOOD, "check": {"kind": "numeric", "tol": 1}}, "check.tol", "unknown for kind 'numeric' (expected tolerance, rel_tolerance)"),
    ({**GOOD, "check": {"kind": "python", "function": "no_such_mod_zz:f"}}, "check.function",
     "cannot import module 'no_such_mod_zz' (ModuleNotFoundError: No module named 'no_such_mod_zz')"),
    ({**GOOD, "check": {"kind": "python", "function": f"{PYMOD}:nope"}}, "check.function",
     f"module '{PYMOD}' has no function 'nope'"),
    ({**GOOD, "check": {"kind": "python", "function": f"{PYMOD}:at_least"}}, "check.function",
     f"{PYMOD}:at_least raised KeyError on the gold answer: 'words'"),
    ({**GOOD, "check": {"kind": "numeric"}}, "answer", "the numeric check needs a number, got 'a'"),
    ({**GOOD, "check": {"kind": "choice"}, "answer": "AB"}, "answer",
     "the choice check needs one of the letters ABCDEFGHIJKLMNOPQRSTUVWXYZ, got 'AB'"),
    ({**GOOD, "check": {"kind": "regex", "pattern": "[0-9]+"}}, "answer",
     "the gold answer 'a' does not fully match check.pattern '[0-9]+'"),
    ({"image": "img/square.png", "question": "Q?"}, "answer",
     "the shorthand needs a gold answer (a record with 'messages' may have none)"),
    ({**GOOD, "messages": []}, "question", "give 'messages' or the shorthand 'question', not both"),
    ({**GOOD, "images": ["img/square.png"]}, "image", "give 'image' or 'images', not both"),
    ({"answer": "a"}, "messages", "missing: give 'messages', or the shorthand 'question' and 'answer'"),
    ({"images": [], "messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role",
     "must be 'user' (turns alternate user, assistant; a system prompt goes first or in 'system'), got 'assistant'"),
    ({"images": [], "messages": [{"role": "user", "content": "Q"}]}, "messages",
     "must end with an assistant turn, or with a user turn and a non-null 'answer' (got 1 turns)"),
    ({"images": [], "messages": [{"role": "user", "content": ["Q"]}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "must be text (<image> marks an image), got list"),
    ({**GOOD, "question": "Q?<|im_end|>"}, "messages[0].content",
     "holds '<|im_end|>', which the chat renderer writes itself"),
    ({**GOOD, "trace": "<think>x</think>"}, "trace", "holds '<think>', which the chat renderer writes itself"),
    ({**GOOD, "mode": "think"}, "mode", "mode 'think' needs a non-empty trace"),
    ({**GOOD, "system": ""}, "system", "must be non-empty text or null, got empty text"),
    ({**GOOD, "answer": True}, "answer", "must be text, a number or null, got bool"),
    ({**GOOD, "id": "bad-1"}, "id", "duplicate id 'bad-1' (line 1 has it too)"),  # line 1's default id
]


@pytest.mark.parametrize("line,field,reason", BAD, ids=[f"{k}-{b[1]}" for k, b in enumerate(BAD)])
def test_a_bad_record_is_one_line_naming_file_line_and_field(userdir, line, field, reason):
    root = userdir.parent
    (root / "notes.png").write_text("not an image")
    p = root / "bad.jsonl"
    text = line if isinstance(line, str) else json.dumps(line)
    p.write_text(json.dumps(GOOD) + "\n\n" + text + "\n" + json.dumps({**GOOD, "id": "z"}) + "\n")
    with pytest.raises(TrainingError) as e:
        D.load_data(p)
    where = f"field {field!r}: " if field else ""
    assert str(e.value) == f"{p}:3: {where}{reason.format(root=root)}"


def test_every_bad_line_is_reported_up_to_max_errors_and_the_cli_prints_them(userdir, capsys):
    from r4b_edge.apps.cli import main

    lines = [json.dumps(GOOD if k % 2 else {**GOOD, "check": {"kind": "numbr"}}) for k in range(50)]
    p = userdir.parent / "many.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingError) as e:
        D.load_data(p)
    msg = str(e.value).splitlines()
    assert len(msg) == 21 and all(m.startswith(f"{p}:{2 * k + 1}: field 'check.kind': ") for k, m in enumerate(msg[:20]))
    assert msg[20] == f"{p}: 5 more bad records (25 in all)"
    assert main(["train", "check-data", str(p), "--max-errors", "3"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"r4b-edge train: error: {p}:1: field 'check.kind': unknown kind 'numbr' (expected exact, numeric, " \
                     f"choice, regex, python)"
    assert len(err) == 4 and err[3] == f"{p}: 22 more bad records (25 in all)" and "Traceback" not in "".join(err)
    assert main(["train", "check-data", str(userdir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 50 and out["checks"]["python"] == 1


def test_reading_checks_no_images_by_default_and_names_a_missing_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(GOOD) + "\n")
    assert D.read_jsonl(p)[0]["images"] == ["img/square.png"]  # run-internal files: images not opened
    with pytest.raises(TrainingError, match=r"^data file .*nope.jsonl does not exist$"):
        D.load_data(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainingError, match=r"empty.jsonl: no records$"):
        D.read_jsonl(tmp_path / "empty.jsonl")


def test_rollouts_score_with_the_records_checks(userdir, tmp_path):
    """The bundled model rolls out world records (with their check, and without: as written
    before records named one) and user records; each reward is `check(record, answer)`."""
    torch = pytest.importorskip("torch")
    from r4b_edge.api import BUNDLED_MODEL
    from r4b_edge.train import world as W
    from r4b_edge.train.data import PixelCache
    from r4b_edge.train.evaluate import load_eval_model
    from r4b_edge.train.rollout import Roller, encode_prompt, items_from_records

    if not (BUNDLED_MODEL / "config.json").exists():
        pytest.skip("no bundled model")
    torch.set_num_threads(1)
    world = D.read_jsonl(W.write_world(tmp_path, W.EVAL_SEED, {"digit": 2, "sum": 2}, "eval"))
    legacy = [{k: v for k, v in r.items() if k != "check"} for r in world]
    user = [dict(r, images=[f"img/{n}.png"]) for r, n in zip(world, ("a", "b"))]
    _write_images(tmp_path)
    for r, n in zip(world, ("a", "b")):
        Image.open(tmp_path / r["images"][0]).save(tmp_path / "img" / f"{n}.png")
    user[0] = dict(user[0], system="Answer with a number.", check={"kind": "numeric"})
    user[1] = dict(user[1], check={"kind": "python", "function": f"{PYMOD}:at_least", "words": 4})
    model, cfg, tok = load_eval_model(BUNDLED_MODEL)
    roller = Roller(model, tok, cfg, tmp_path, PixelCache(cfg.image_size, cfg.image_mean, cfg.image_std))
    items = items_from_records(world + legacy + user)
    assert items[8]["system"] == "Answer with a number." and items[0]["record"] is world[0]
    ro = roller.run(items, "no-think", max_new=12, chunk=8)
    for x, it in zip(ro, items):
        assert x.reward == check(it["record"], x.parsed.answer)
    assert [x.reward for x in ro[:4]] == [x.reward for x in ro[4:8]] == \
        [float(W.check_answer(x.parsed.answer or "", it["answer"])) for x, it in zip(ro[:4], items)]
    assert ro[9].reward in (0.25, 0.5, 0.75, 1.0)  # the python check's partial score
    assert ro[8].prompt == encode_prompt(tok, items[8]["question"], "no-think", cfg.image_token_index,
                                         cfg.tokens_per_view, system="Answer with a number.")
    assert ro[8].prompt != encode_prompt(tok, items[8]["question"], "no-think", cfg.image_token_index, cfg.tokens_per_view)
    with pytest.raises(TrainingError, match="rollouts take single-turn records with one image"):
        items_from_records([by_id(D.load_data(userdir))["chat-open"]])
