"""The public API: load, chat, stream, conversation, and its errors."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import r4b_edge
from r4b_edge import (
    AnswerDelta, BackendUnavailableError, ContextLengthError, Decision, Done, GenerationOptionError,
    ImageError, ModelFormatError, ModelNotFoundError, Progress, ReasoningDelta,
)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m = r4b_edge.load(tiny_ckpt, backend="torch", device="cpu")
    yield m
    m.close()


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(p)
    return p


def test_chat_and_stream_agree(model, png):
    r = model.chat(png, "what colour?", max_tokens=10)
    events = list(model.stream(png, "what colour?", max_tokens=10))
    assert all(isinstance(e, Progress) for e in events[:events.index(next(e for e in events if not isinstance(e, Progress)))])
    events = [e for e in events if not isinstance(e, Progress)]
    assert isinstance(events[0], Decision) and isinstance(events[-1], Done)
    s = events[-1].result
    assert (s.answer, s.reasoning, s.token_ids) == (r.answer, r.reasoning, r.token_ids)
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == r.answer
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == r.reasoning
    assert r.to_dict()["stats"]["image_tokens"] > 0


def test_inputs_kinds(model, png):
    arr = np.asarray(Image.open(png))
    a = model.chat(png, "q", max_tokens=5)
    b = model.chat(png.read_bytes(), "q", max_tokens=5)
    c = model.chat(Image.open(png), "q", max_tokens=5)
    d = model.chat(arr, "q", max_tokens=5)
    assert a.token_ids == b.token_ids == c.token_ids == d.token_ids
    t = model.chat(None, "text only", max_tokens=5)
    assert t.stats.image_tokens == 0


def test_conversation_multi_turn_drops_reasoning(model, png):
    conv = model.conversation(png)
    r1 = conv.ask("first?", mode="think", max_tokens=8)
    r2 = conv.ask("second?", max_tokens=8)
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[0].images == 1 and conv.messages[2].images == 0
    assert conv.messages[1].content == r1.answer
    assert r2.stats.prompt_tokens > r1.stats.prompt_tokens
    conv.reset()
    assert conv.messages == []


# ---- the messages-level entry (#25 item 2): one way into the engine ---------------------------
def test_chat_messages_is_the_path_of_chat_and_conversation(model, png):
    q = [r4b_edge.Message("user", "what colour?", images=1)]
    assert model.chat_messages(q, [png], max_tokens=10).token_ids == model.chat(png, "what colour?", max_tokens=10).token_ids
    conv = model.conversation(png, system="be brief")
    conv.ask("first?", max_tokens=6)
    r2 = conv.ask("second?", max_tokens=6)
    again = model.chat_messages(conv.messages[:3], [png], system="be brief", max_tokens=6)
    assert (again.token_ids, again.stats.prompt_tokens) == (r2.token_ids, r2.stats.prompt_tokens)
    events = [e for e in model.stream_messages(q, [png], max_tokens=10) if not isinstance(e, Progress)]
    assert isinstance(events[0], Decision) and isinstance(events[-1], Done)


def test_stream_messages_takes_prepared_images_as_they_are(model, png, monkeypatch):
    prepared = model.prepare(png)
    want = model.chat(png, "q", max_tokens=5).token_ids
    monkeypatch.setattr(r4b_edge.api, "prepare_image", lambda *a: pytest.fail("prepared twice"))
    monkeypatch.setattr(r4b_edge.api, "load_image", lambda *a, **k: pytest.fail("read twice"))
    assert model.chat_messages([r4b_edge.Message("user", "q", images=1)], [prepared], max_tokens=5).token_ids == want


def test_stream_messages_errors_at_the_call(model, png, tmp_path):
    q = [r4b_edge.Message("user", "q", images=1)]
    with pytest.raises(GenerationOptionError, match="unknown generation option"):  # before the image is read
        model.stream_messages(q, [tmp_path / "missing.png"], max_tokenz=5)
    with pytest.raises(GenerationOptionError, match="max_tokens must be an integer"):
        model.stream_messages(q, [png], max_tokens="5")
    with pytest.raises(GenerationOptionError, match="1 image placeholders but 0 images"):
        model.stream_messages(q, [])
    with pytest.raises(GenerationOptionError, match="must end with a user turn"):
        model.stream_messages([r4b_edge.Message("assistant", "a")])


@pytest.mark.parametrize("alias,name", [("long", "think"), ("short", "no-think"), ("nothink", "no-think"),
                                        ("auto", "auto")])
def test_result_mode_is_the_canonical_name(model, png, alias, name):
    assert model.chat(png, "q", mode=alias, max_tokens=3).mode == name
    assert r4b_edge.check_options(mode=alias).mode == name


def test_check_options_raises_what_the_api_raises():
    with pytest.raises(GenerationOptionError, match="unknown generation option"):
        r4b_edge.check_options(max_tokenz=5)
    with pytest.raises(GenerationOptionError, match="within \\[0, 1\\], got 2.0"):
        r4b_edge.check_options(think_threshold=2.0)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(mode="maybe"), GenerationOptionError, "unknown mode 'maybe'"),
    (dict(think_threshold=2.0), GenerationOptionError, "within [0, 1], got 2.0"),
    (dict(max_tokens="5"), GenerationOptionError, "max_tokens must be an integer >= 1, got '5'"),
    (dict(temperature=None), GenerationOptionError, "temperature must be a finite number >= 0, got None"),
    (dict(max_tokenz=5), GenerationOptionError, "unknown generation option(s): max_tokenz"),
])
def test_option_errors(model, png, kw, err, msg):
    with pytest.raises(err, match=None) as e:
        model.chat(png, "q", **kw)
    assert msg in str(e.value)
    with pytest.raises(err):
        model.stream(png, "q", **kw)  # raised at the call, not at first next()


@pytest.mark.parametrize("mode", ["think", "auto", "no-think"])
def test_max_tokens_is_a_hard_bound(model, png, mode):
    """#14 item 1: think mode with a budget of 1 and max_tokens 3 returned 45 tokens."""
    for max_tokens in (1, 3, 10):
        r = model.chat(png, "what?", mode=mode, max_think_tokens=1, max_tokens=max_tokens)
        assert len(r.token_ids) <= max_tokens
        assert r.stats.think_tokens + r.stats.answer_tokens == len(r.token_ids)


@pytest.mark.parametrize("prompt,msg", [
    (None, "prompt must be a string, got NoneType None"),
    (["q"], "prompt must be a string, got list ['q']"),
    ("caf\udce9", "prompt is not valid Unicode: a lone surrogate '\\udce9' at character 3"),
])
def test_prompt_errors(model, png, prompt, msg):
    with pytest.raises(GenerationOptionError) as e:
        model.chat(png, prompt)
    assert msg in str(e.value)
    with pytest.raises(GenerationOptionError):
        model.stream(png, prompt)  # raised at the call
    with pytest.raises(GenerationOptionError):
        model.conversation(png).ask(prompt)


def test_image_errors(model, tmp_path):
    with pytest.raises(ImageError, match="missing.png"):
        model.chat(tmp_path / "missing.png", "q")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="bad.png"):
        model.chat(bad, "q")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt"):
        model.chat(txt, "q")


def test_pixel_limit(tiny_ckpt, tmp_path):
    m = r4b_edge.api.Model(r4b_edge.api.create_backend(tiny_ckpt, "torch", "cpu"), max_pixels=100)
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(p)
    with pytest.raises(ImageError) as e:
        m.chat(p, "q")
    assert "400" in str(e.value) and "100" in str(e.value)


def test_context_error(model):
    with pytest.raises(ContextLengthError) as e:
        model.chat(None, "word " * 3000)
    assert "2048" in str(e.value)


def test_model_folder_errors(tiny_ckpt, tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        r4b_edge.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        r4b_edge.load(broken, backend="torch")
    with pytest.raises(ModelFormatError, match="holds no config.json"):
        r4b_edge.load(tmp_path)


def test_backend_not_installed_names_extra(tiny_ckpt, monkeypatch):
    import r4b_edge.backends as b

    monkeypatch.setattr(b, "is_installed", lambda name: name != "torch")
    with pytest.raises(BackendUnavailableError) as e:
        r4b_edge.load(tiny_ckpt, backend="torch")
    assert "pip install 'r4b-edge[torch]'" in str(e.value)


def test_wrong_backend_for_files(tiny_ckpt):
    with pytest.raises(ModelFormatError, match="export it first"):
        r4b_edge.load(tiny_ckpt, backend="llama")


def test_import_does_not_import_torch():
    code = "import sys, r4b_edge, r4b_edge.api, r4b_edge.engine.generate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_layering_core_imports_no_upper_floor():
    """r4b_edge/ (the ground floor) never imports train/export/apps/benchmarks."""
    import pathlib
    import re

    root = pathlib.Path(r4b_edge.__file__).parent
    bad = []
    for f in root.rglob("*.py"):
        for line in f.read_text().splitlines():
            if re.match(r"\s*(from|import)\s+(r4b_edge\.)?(train|export|apps|benchmarks)\b", line) or \
               re.match(r"\s*from\s+\.+(train|export|apps|benchmarks)\b", line):
                bad.append(f"{f.name}: {line.strip()}")
    assert not bad, bad


def test_faces_enter_through_the_api():
    """#25 item 2: apps/ never reaches past `Model` into its engine nor builds GenerationOptions itself
    (`Model.stream_messages` and `check_options` are the entry; reading a default is fine)."""
    import pathlib
    import re

    import r4b_edge.apps

    root = pathlib.Path(r4b_edge.apps.__file__).parent
    bad = [f"{f.name}: {line.strip()}" for f in root.rglob("*.py") for line in f.read_text().splitlines()
           if re.search(r"(?<!r4b_edge)\.engine\b|\bEngine\(|GenerationOptions\([^)]|options_from", line)]
    assert not bad, bad


# ---- image_tokens, n_ctx (issue 28) --------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_png(tmp_path_factory):
    """50 x 70 (h x w): the tiny model tiles it 2x2 (70 positions); a budget of 50 gives 1x2 (44),
    of 20 the base view alone (16)."""
    p = tmp_path_factory.mktemp("img") / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(p)
    return p


def test_image_tokens_default_and_per_call(model, wide_png):
    from r4b_edge.model.image_budget import AUTO_CPU_POSITIONS_PER_THREAD

    assert model.image_tokens == "auto"
    assert model.image_budget() == AUTO_CPU_POSITIONS_PER_THREAD * model.backend.threads
    assert model.prepare(wide_png).grid == (2, 2)  # the tiny model's images all fit the auto budget
    assert [model.prepare(wide_png, image_tokens=n).n_tokens for n in (None, "full", 50, 20)] == [70, 70, 44, 16]
    assert model.chat(wide_png, "q", max_tokens=2).stats.image_tokens == 70
    assert model.chat(wide_png, "q", max_tokens=2, image_tokens=50).stats.image_tokens == 44
    events = list(model.stream(wide_png, "q", max_tokens=2, image_tokens=20))
    assert events[-1].result.stats.image_tokens == 16
    msgs = [r4b_edge.Message("user", "q", images=1)]
    assert model.chat_messages(msgs, [wide_png], max_tokens=2, image_tokens=50).stats.image_tokens == 44
    assert model.conversation(wide_png, image_tokens=20).ask("q", max_tokens=2).stats.image_tokens == 16
    info = model.info()
    assert info["image_tokens"] == "auto" and info["image_budget"] == model.image_budget()
    assert info["n_ctx"] == 2048


def test_load_sets_the_default_budget(tiny_ckpt, wide_png):
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", image_tokens=50) as m:
        assert m.image_tokens == 50 and m.prepare(wide_png).grid == (1, 2)
        assert m.chat(wide_png, "q", max_tokens=2).stats.image_tokens == 44
        assert m.chat(wide_png, "q", max_tokens=2, image_tokens=None).stats.image_tokens == 70
        m.image_tokens = "full"
        assert m.image_tokens is None and m.prepare(wide_png).n_tokens == 70


@pytest.mark.parametrize("bad", [0, -1, 2.5, "many", True])
def test_image_tokens_errors(model, tiny_ckpt, wide_png, bad):
    from r4b_edge.errors import ImageTokensError

    msg = rf"image_tokens must be a whole number >= 1 .*'auto' or 'full'.*got {re.escape(repr(bad))}"
    with pytest.raises(ImageTokensError, match=msg):
        r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", image_tokens=bad)
    with pytest.raises(ImageTokensError, match=msg):
        model.chat(wide_png, "q", image_tokens=bad)
    with pytest.raises(ImageTokensError, match=msg):
        model.stream(wide_png, "q", image_tokens=bad)
    with pytest.raises(ImageTokensError, match=msg):
        model.stream_messages([r4b_edge.Message("user", "q")], [], image_tokens=bad)
    with pytest.raises(ImageTokensError, match=msg):
        model.image_tokens = bad
    assert isinstance(ImageTokensError("x"), GenerationOptionError)


def test_image_tokens_on_a_conversation_turn_is_refused(model, wide_png):
    from r4b_edge.errors import ImageTokensError

    with pytest.raises(ImageTokensError, match=r"Model.conversation\(image, image_tokens=...\)"):
        model.conversation(wide_png).ask("q", image_tokens=20)


def test_context_error_names_both_fixes(tiny_ckpt, wide_png):
    """A prompt over --n-ctx: the message names a --n-ctx that fits and an --image-tokens that fits."""
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", n_ctx=60, image_tokens=None) as m:
        assert m.backend.n_ctx == 60
        with pytest.raises(ContextLengthError) as e:
            m.chat(wide_png, "q")
        msg = str(e.value)
        need = int(re.search(r"--n-ctx (\d+) \(load\(n_ctx=\1\)\), up to the model's 2048", msg).group(1))
        per_image = int(re.search(r"--image-tokens (\d+) \(image_tokens=\1; now 70 for 1 image", msg).group(1))
        assert need > 60 and 16 <= per_image < 70
        r = m.chat(wide_png, "q", max_tokens=2, image_tokens=per_image)  # the named budget fits
        assert r.stats.image_tokens <= per_image
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", n_ctx=need, image_tokens=None) as m:
        assert m.chat(wide_png, "q", max_tokens=2).stats.image_tokens == 70  # and so does the named n_ctx


def test_n_ctx_is_checked(tiny_ckpt):
    from r4b_edge.errors import BackendOptionError

    for bad in (0, -3, "big", 1.5):
        with pytest.raises(BackendOptionError, match=rf"n_ctx \(--n-ctx\) must be a whole number .*got {re.escape(repr(bad))}"):
            r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", n_ctx=bad)
    with r4b_edge.load(tiny_ckpt, backend="torch", device="cpu", n_ctx=10**6) as m:
        assert m.backend.n_ctx == 2048  # capped at the model's context


def test_check_options_checks_image_tokens():
    from r4b_edge.errors import ImageTokensError

    assert r4b_edge.check_options(image_tokens=1280, mode="think").mode == "think"
    with pytest.raises(ImageTokensError, match="got 0"):
        r4b_edge.check_options(image_tokens=0)
