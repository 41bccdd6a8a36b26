"""llama.cpp's own C++ Jinja engine (`common/jinja`, what llama-server, llama-cli and
llama-mtmd-cli apply templates with) renders the GGUF chat template exactly as r4b-edge renders
the conversation, for llama-server's and MTMDChatHandler's message shapes in every mode.

Needs a llama.cpp source tree (e.g. `vendor/llama.cpp` of the llama-cpp-python 0.3.36 sdist):
`R4B_LLAMA_CPP_SRC=/path/to/llama.cpp pytest tests/export/test_gguf_template_llamacpp.py`.
The engine is compiled once (a few minutes on 2 cores) into R4B_LLAMA_CPP_BUILD (default: a
temp folder). Skipped without a source tree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from r4b_edge.model.template import CHAT_TEMPLATE, Message, chat_template_jinja

from ..model import test_template_jinja as T

SRC = os.environ.get("R4B_LLAMA_CPP_SRC")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SRC or not (Path(SRC) / "common" / "jinja").is_dir(),
                                 reason="set R4B_LLAMA_CPP_SRC to a llama.cpp source tree")]

DRIVER = r"""
#include "json.h"
#include "jinja/runtime.h"
#include "jinja/parser.h"
#include "jinja/lexer.h"
#include "jinja/caps.h"
#include <fstream>
#include <iostream>
#include <sstream>
using json = common_json;
static std::string slurp(const char * p) { std::ifstream f(p); std::stringstream s; s << f.rdbuf(); return s.str(); }
int main(int, char ** argv) {
    std::string tmpl = slurp(argv[1]);
    json cases = json::parse(slurp(argv[2]));
    jinja::lexer lexer;
    auto toks = lexer.tokenize(tmpl);
    jinja::program prog = jinja::parse_from_tokens(toks);
    jinja::caps caps = jinja::caps_get(prog);
    json out = json::object();
    out["string_content"] = caps.supports_string_content;
    out["typed_content"] = caps.supports_typed_content;
    json rendered = json::array();
    for (size_t i = 0; i < cases.size(); i++) {
        try {
            jinja::context ctx(tmpl);
            jinja::global_from_json(ctx, cases[i], true);
            jinja::runtime runtime(ctx);
            rendered.push_back(jinja::runtime::gather_string_parts(runtime.execute(prog))->as_string().str());
        } catch (const std::exception & e) {
            rendered.push_back(std::string("ERROR: ") + e.what());
        }
    }
    out["rendered"] = rendered;
    std::cout << out.dump() << std::endl;
}
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled driver (objects are reused across runs when R4B_LLAMA_CPP_BUILD is set)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    import llama_cpp

    src = Path(SRC)
    build = Path(os.environ.get("R4B_LLAMA_CPP_BUILD") or tmp_path_factory.mktemp("jinja-build"))
    build.mkdir(parents=True, exist_ok=True)
    (build / "drv.cpp").write_text(DRIVER)
    inc = [f"-I{src / d}" for d in ("common", "vendor", "include", "ggml/include")]
    objs = []
    for f in [*sorted((src / "common" / "jinja").glob("*.cpp")), src / "common" / "json.cpp",
              src / "common" / "unicode.cpp", build / "drv.cpp"]:
        o = build / (f.stem + ".o")
        if not o.exists() or f.name == "drv.cpp":
            subprocess.run([cxx, "-std=c++17", "-O1", *inc, "-c", str(f), "-o", str(o)], check=True)
        objs.append(str(o))
    lib = Path(llama_cpp.__file__).parent / "lib"  # ggml_abort lives in libggml-base
    exe = build / "drv"
    subprocess.run([cxx, *objs, f"-L{lib}", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(exe)], check=True)
    return exe


def _render(engine: Path, tmp_path: Path, template: str, cases: list) -> dict:
    (tmp_path / "t.jinja").write_text(template)
    (tmp_path / "c.json").write_text(json.dumps(cases))
    out = subprocess.run([str(engine), str(tmp_path / "t.jinja"), str(tmp_path / "c.json")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_llama_cpp_engine_renders_our_prompts(engine: Path, tmp_path: Path) -> None:
    from llama_cpp.llama_chat_format import MTMDChatHandler

    cases, want = [], []
    for name, (request, msgs) in sorted(T.CASES.items()):
        has_url = any(isinstance(m["content"], list) and T.URL in m["content"] for m in request)
        for mode in T.MODES:
            cases.append({"messages": T._llama_server_shape(request, T.SERVER_MARKER),
                          "add_generation_prompt": True, "thinking_mode": mode})
            want.append(T.ours(msgs, mode, marker=T.SERVER_MARKER if has_url else "<image>"))
            if name != "hf_image_first":
                conv = [MTMDChatHandler._convert_message_for_template(m, "<__media__>") for m in request]
                cases.append({"messages": conv, "add_generation_prompt": True, "thinking_mode": mode})
                want.append(T.ours(msgs, mode, marker="<__media__>"))
    cli = {"messages": [{"role": "user", "content": "<__media__>What is the sum?"}], "add_generation_prompt": True}
    out = _render(engine, tmp_path, CHAT_TEMPLATE, cases + [cli])
    assert out["string_content"] and out["typed_content"]  # llama.cpp passes both shapes through
    got = out["rendered"]
    bad = [(c, g, w) for c, g, w in zip(cases, got, want) if g != w]
    assert not bad, f"{len(bad)}/{len(want)} differ, first: {bad[0]}"
    assert got[-1] == T.ours([Message("user", "What is the sum?", images=1)], "auto", marker="<__media__>")
    short = _render(engine, tmp_path, chat_template_jinja("short"), [cli])["rendered"][0]
    assert short == T.ours([Message("user", "What is the sum?", images=1)], "short", marker="<__media__>")
