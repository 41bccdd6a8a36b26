"""Issue 24: `train anneal|bpo --model --data --out` on a narrow model in the R-4B layout (2 layers,
AnyRes pinpoints) and the ~50-record user JSONL of test_user_data.py: the data is checked before any
model loads; FSDP2 (gloo) on 1 and 2 processes gives the same losses on the same global batch;
kill -9 + the same command resumes to the same weights; the output folder loads in r4b-edge and
exports to GGUF; LoRA ships merged with the unmerged model's logits; BPO runs on the annealed model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from r4b_edge.errors import TrainingError  # noqa: E402
from r4b_edge.train import finetune  # noqa: E402

from .test_user_data import PYMOD, SIZES, _write_images, user_records  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
FAST = ["--samples", "2", "--trace-tries", "1", "--max-new-tokens", "6", "--threads", "1"]


def write_data(d: Path, recs: list[dict] | None = None) -> Path:
    _write_images(d)
    (d / f"{PYMOD}.py").write_text("def at_least(answer, record):\n"
                                   "    return min(1.0, len(answer.split()) / record['check']['words'])\n")
    p = d / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in (recs or user_records())))
    return p


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, tiny_tokenizer_dir, tiny_tokenizer):
    """A narrow random model in the R-4B layout: 2+2 layers, AnyRes pinpoints, the real tokenizer layout."""
    from r4b_edge.testing import tiny_config, write_random_checkpoint

    cfg = tiny_config(anyres=True, vocab_size=tiny_tokenizer.vocab_size, image_token_index=tiny_tokenizer.image)
    return write_random_checkpoint(tmp_path_factory.mktemp("narrow") / "model", cfg, tiny_tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("userdata"))


def cli(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    r = subprocess.run(pre + ["-m", "r4b_edge.train"] + args, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def rows(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, stage: str) -> list[float]:
    return [x["loss"] for x in rows(run, stage) if "loss" in x]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---- before any model loads -------------------------------------------------------------------

def test_bad_data_and_too_long_records_fail_before_any_model_loads(tmp_path, narrow):
    bad = write_data(tmp_path / "bad", user_records()[:3] + [{"image": "img/missing.png", "question": "q?", "answer": "a"}])
    with pytest.raises(TrainingError, match=r"data.jsonl:4: field 'image': image file not found"):
        finetune.main("anneal", ["--model", str(tmp_path / "no-such-model"), "--data", str(bad), "--out", str(tmp_path / "r")])
    good = write_data(tmp_path / "good")
    from r4b_edge.model.config import RConfig
    from r4b_edge.model.tokenizer import Tokenizer

    cfg, tok = RConfig.from_file(narrow / "config.json"), Tokenizer.from_dir(narrow)
    recs = finetune.load_data(good)
    imgs = finetune.Images(cfg, good.parent)
    lens = finetune.data_lengths(recs, tok, cfg, imgs, "anneal", 8)
    longest = max(lens, key=lens.get)
    # images at their AnyRes sizes (the runtime's counts): sizes differ by the image's shape
    from r4b_edge.model.processing import prepare_image

    assert imgs.n_tokens("img/wide.png") == prepare_image(good.parent / "img/wide.png", cfg).n_tokens
    assert imgs.n_tokens("img/square.png") == cfg.tokens_per_view + 8 * 8 + 8
    assert len({imgs.n_tokens(n) for n in SIZES}) >= 3
    with pytest.raises(TrainingError, match=rf"record {longest!r} takes {lens[longest]} positions.*over --max-len 100"):
        finetune.main("anneal", ["--model", str(narrow), "--data", str(good), "--out", str(tmp_path / "r"),
                                 "--max-len", "100"])
    assert not (tmp_path / "r").exists()


# ---- the runs -------------------------------------------------------------------------------------

def anneal_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["anneal", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "6",
            "--micro-batch", "1", "--save-every", "1", "--lr", "2e-3", *FAST, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, narrow, data):
    """one: anneal in 1 process (grad-accum 2); two: 2 processes under torchrun (grad-accum 1):
    the same global batch of 2 sequences per step."""
    base = tmp_path_factory.mktemp("runs")
    t0 = time.time()
    cli(anneal_args(narrow, data, base / "one", "--grad-accum", "2"))
    t1 = time.time()
    cli(anneal_args(narrow, data, base / "two", "--grad-accum", "1"), nproc=2)
    t2 = time.time()
    return base, {"one": t1 - t0, "two": t2 - t1}


@pytest.mark.slow
def test_anneal_curates_writes_the_mix_and_trains(runs, data):
    base, _ = runs
    one = base / "one"
    counts = json.loads((one / "anneal" / "curation.json").read_text())
    recs = finetune.load_data(data)
    assert counts["records"] == len(recs) == 50
    assert counts["direct"] + counts["think"] + counts["dropped_no_trace"] == 50
    assert counts["subjective"] == sum(r["answer"] is None for r in recs)
    cur = [json.loads(x) for x in (one / "anneal" / "curated.jsonl").read_text().splitlines()]
    assert len(cur) == counts["direct"] + counts["think"]
    assert all(x["mode"] == "think" and x.get("trace") for x in cur if x["meta"]["curation"].startswith("think"))
    # a random model answers nearly nothing right: records with a trace become thinking samples
    assert counts["think_from_record"] >= 10
    # 2 processes curate the same items the same way (samples seeded per item and sample)
    assert (base / "two" / "anneal" / "curated.jsonl").read_text() == (one / "anneal" / "curated.jsonl").read_text()
    ls = losses(one, "anneal")
    assert len(ls) == 6 and all(x > 0 for x in ls)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(runs):
    base, secs = runs
    a, b = losses(base / "one", "anneal"), losses(base / "two", "anneal")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-3 * abs(x), (a, b)
    tp = [r["tokens_per_s_per_process"] for r in rows(base / "one", "anneal") if "tokens_per_s_per_process" in r]
    tp2 = [r["tokens_per_s_per_process"] for r in rows(base / "two", "anneal") if "tokens_per_s_per_process" in r]
    print(f"\nnarrow model, CPU: {sorted(tp)[len(tp) // 2]:.0f} tokens/s per process (1 process), "
          f"{sorted(tp2)[len(tp2) // 2]:.0f} (2 processes); wall {secs}")


@pytest.mark.slow
def test_output_loads_in_the_runtime_and_exports_to_gguf(runs, data, tmp_path):
    import r4b_edge

    out = runs[0] / "one" / "anneal" / "model"
    m = r4b_edge.load(str(out), backend="torch", device="cpu", threads=1)
    res = m.chat(str(data.parent / "img" / "wide.png"), "What is written?", mode="no-think", max_tokens=4)
    assert isinstance(res.answer, str)
    m.close()
    pytest.importorskip("gguf")
    from r4b_edge.export.gguf import export_gguf

    g = export_gguf(out, tmp_path / "gguf", quant="F16")
    assert any(Path(g.out_dir).glob("*.gguf"))


def test_output_loads_in_transformers_with_the_same_logits(runs):
    """The fine-tuned folder is a Hugging Face repo: transformers' AutoModel (remote code) loads it
    and computes the same logits as r4b-edge's torch model on a text prompt."""
    import torch
    transformers = pytest.importorskip("transformers")

    from r4b_edge.model.checkpoint import load_checkpoint

    out = runs[0] / "one" / "anneal" / "model"
    hf = transformers.AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ours, _, tok = load_checkpoint(out, device="cpu", dtype=torch.float32)
    ids = torch.tensor([tok.encode("<|im_start|>user\nhow many shapes?<|im_end|>\n<|im_start|>assistant\n")])
    with torch.inference_mode():
        want = ours.forward(ours.embed_tokens(ids), use_cache=False)[0]
        got = hf(input_ids=ids).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())


@pytest.mark.slow
def test_kill_9_and_the_same_command_resumes(runs, narrow, data, tmp_path):
    base, _ = runs
    run = tmp_path / "killed"
    args = anneal_args(narrow, data, run, "--grad-accum", "2")
    p = subprocess.Popen([sys.executable, "-m", "r4b_edge.train", *args], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run / "anneal" / "state" / "latest.json"
    t0 = time.time()
    while time.time() - t0 < 300:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 2:
            break
        assert p.poll() is None, "finished before it could be killed"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "anneal" / "model" / "config.json").exists()
    cli(args)
    assert any(r.get("event") == "resume" for r in rows(run, "anneal"))
    a, b = weights(base / "one" / "anneal" / "model"), weights(run / "anneal" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bpo_on_the_annealed_model(runs, data, tmp_path):
    import r4b_edge

    ann = runs[0] / "one" / "anneal" / "model"
    cli(["bpo", "--model", str(ann), "--data", str(data), "--out", str(tmp_path / "rl"), "--steps", "2",
         "--group", "2", "--prompts", "2", "--max-new-tokens", "6", "--threads", "1", "--lr", "1e-3"])
    rl = [r for r in rows(tmp_path / "rl", "bpo") if "step" in r]
    assert len(rl) == 2 and all("reward/think" in r and "reward/no-think" in r and "kl" in r for r in rl)
    w0, w1 = weights(ann), weights(tmp_path / "rl" / "bpo" / "model")
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)
    r4b_edge.load(str(tmp_path / "rl" / "bpo" / "model"), backend="torch", device="cpu", threads=1).close()


def test_loss_goes_down_on_a_repeated_batch(tmp_path, narrow):
    d = write_data(tmp_path / "d", user_records()[:2])  # 2 records, global batch 2: the same batch every step
    finetune.main("anneal", ["--model", str(narrow), "--data", str(d), "--out", str(tmp_path / "r"), "--steps", "8",
                             "--grad-accum", "2", "--lr", "3e-3", "--save-every", "100", *FAST])
    ls = losses(tmp_path / "r", "anneal")
    assert len(ls) == 8 and ls[-1] < 0.7 * ls[0], ls


def test_lora_ships_merged_with_the_unmerged_logits(tmp_path, narrow):
    from r4b_edge.model.checkpoint import load_checkpoint
    from r4b_edge.train.scale import add_lora

    d = write_data(tmp_path / "d", user_records()[:4])
    finetune.main("anneal", ["--model", str(narrow), "--data", str(d), "--out", str(tmp_path / "r"), "--steps", "3",
                             "--lora", "4", "--lr", "1e-2", "--save-every", "100", *FAST])  # shipped in bf16
    st = torch.load(tmp_path / "r" / "anneal" / "lora.pt")
    base, _, _ = load_checkpoint(narrow, dtype=torch.float32)
    peft_model = add_lora(base, st["rank"])
    missing = peft_model.load_state_dict(st["tensors"], strict=False)
    assert not missing.unexpected_keys
    assert max(float(v.abs().max()) for k, v in st["tensors"].items() if "lora_B" in k) > 0  # trained
    merged, _, _ = load_checkpoint(tmp_path / "r" / "anneal" / "model", dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 24))
    with torch.no_grad():
        a = peft_model.model.forward(base.embed_tokens(ids), use_cache=False)[0]
        b = merged.forward(merged.embed_tokens(ids), use_cache=False)[0]
        plain = load_checkpoint(narrow, dtype=torch.float32)[0]
        c = plain.forward(plain.embed_tokens(ids), use_cache=False)[0]
    scale = float(a.abs().max())
    print(f"\nLoRA merged (bf16) vs unmerged (fp32): max abs logit diff {float((a - b).abs().max()):.2e} of max {scale:.2e}")
    assert float((a - b).abs().max()) <= 2 ** -6 * scale  # bf16 rounding of the weights
    assert float((a - c).abs().max()) > 10 * float((a - b).abs().max())  # the adapters changed the model


def test_chunked_head_equals_the_full_log_softmax_and_saves_no_logits(monkeypatch):
    """The loss's log-probabilities in chunks: equal to one full fp32 log-softmax (values and the
    hidden states' gradient), and autograd keeps no [positions x vocab] tensor between forward and
    backward (each chunk's logits are recomputed in backward)."""
    from r4b_edge.train import scale

    monkeypatch.setattr(scale, "CHUNK", 7)
    torch.manual_seed(0)
    head = scale.ChunkedHead(16, 50, bias=False)
    h = torch.randn(30, 16, requires_grad=True)
    t = torch.randint(0, 50, (30,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        lp = head(h, t)
    assert not [s for s in saved if s and s[-1] == 50 and len(s) > 1 and s[0] > 1], saved
    g, = torch.autograd.grad(lp.sum(), h)
    h2 = h.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(torch.nn.functional.linear(h2, head.weight).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    g2, = torch.autograd.grad(ref.sum(), h2)
    assert torch.allclose(lp, ref, atol=1e-5) and torch.allclose(g, g2, atol=1e-5)


def test_bpo_with_lora_uses_the_base_as_reference(tmp_path, narrow):
    d = write_data(tmp_path / "d", user_records()[36:42])
    finetune.main("bpo", ["--model", str(narrow), "--data", str(d), "--out", str(tmp_path / "r"), "--steps", "1",
                          "--lora", "2", "--group", "2", "--prompts", "1", "--max-new-tokens", "4", "--threads", "1"])
    r = [x for x in rows(tmp_path / "r", "bpo") if "step" in x]
    assert len(r) == 1 and r[0]["kl"] < 1e-6  # step 0: the policy is its base (LoRA B starts at 0)
    assert (tmp_path / "r" / "bpo" / "model" / "config.json").exists() and (tmp_path / "r" / "bpo" / "lora.pt").exists()


@pytest.mark.slow
def test_bpo_under_two_processes_steps_in_lockstep(runs, data, tmp_path):
    """Rollouts end at different lengths on each rank; FSDP2's collectives still pair up."""
    ann = runs[0] / "one" / "anneal" / "model"
    cli(["bpo", "--model", str(ann), "--data", str(data), "--out", str(tmp_path / "rl2"), "--steps", "2",
         "--group", "2", "--prompts", "2", "--max-new-tokens", "6", "--threads", "1", "--lr", "1e-3"], nproc=2)
    assert len([r for r in rows(tmp_path / "rl2", "bpo") if "step" in r]) == 2
