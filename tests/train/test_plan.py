"""`r4b-edge train plan`: counts from the meta model equal the real model's, the state bytes equal
what a real tiny model + AdamW allocate after one step (full, LoRA-like, peft), FSDP2's padded
shards, the activation formulas against autograd's saved tensors, R-4B's true size, the README
table, flag errors and --json."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from r4b_edge.train import plan as P  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"


def _nbytes(tensors) -> int:
    """Bytes of distinct tensors (by identity)."""
    seen = {id(t): t for t in tensors if t is not None}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _step(model, params) -> "torch.optim.AdamW":
    """One forward (an AnyRes image + text), backward and AdamW step over `params`."""
    cfg = model.config
    S = cfg.image_size
    torch.manual_seed(0)
    pv = torch.randn(5, 3, S, S)
    feats = model.image_features(pv, (2, 2), (2 * S, 2 * S))
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    embeds = torch.cat([model.embed_tokens(ids), feats[None].to(model.dtype)], dim=1)
    logits, _ = model.forward(embeds, use_cache=False)
    logits.float().logsumexp(-1).mean().backward()
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    opt.step()
    return opt


def _allocated(model, opt) -> dict[str, int]:
    params = [p for _, p in P.distinct_params(model)]
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"weights": _nbytes(params), "gradients": _nbytes(p.grad for p in params), "optimizer": _nbytes(state)}


def _planned(params, gpus: int = 1) -> dict[str, int]:
    st = P.state_bytes(params, gpus)
    return {k: st[k] for k in ("weights", "gradients", "optimizer")}


def test_counts_equal_the_real_model(tiny_ckpt: Path) -> None:
    from r4b_edge.model.checkpoint import load_checkpoint
    from r4b_edge.model.config import RConfig

    real, _, _ = load_checkpoint(tiny_ckpt)
    meta = P.meta_model(RConfig.from_file(tiny_ckpt))
    counts = P.module_counts(meta)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    table, _ = P.param_table(meta, None)
    assert [(p.name, p.shape) for p in table] == [(n, tuple(p.shape)) for n, p in real.named_parameters()]


def test_full_state_bytes_equal_adamw_after_a_step(tiny_ckpt: Path) -> None:
    """Full fine-tune: fp32 params (FSDP2's sharded master), fp32 grads, AdamW m + v + step."""
    from r4b_edge.model.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(tiny_ckpt)
    model.train()
    opt = _step(model, model.parameters())
    table, _ = P.param_table(P.meta_model(model.config), None)
    assert _planned(table) == _allocated(model, opt)


def test_lora_like_state_bytes(tiny_ckpt: Path) -> None:
    """Only some params train (fp32); the rest are frozen bf16: no grads, no optimizer state."""
    from r4b_edge.model.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(bool(re.search(r"\.(q_proj|v_proj)\.weight$", n)))
        if p.requires_grad:
            p.data = p.data.float()
    # the fp32 weights meet bf16 activations: run the step under autocast, as a mixed policy would
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt = _step(model, [p for p in model.parameters() if p.requires_grad])
    params = [P.Param(n, tuple(p.shape), p.requires_grad, P.fsdp_unit(n)) for n, p in P.distinct_params(model)]
    assert 0 < sum(p.trainable for p in params) < len(params)
    assert _planned(params) == _allocated(model, opt)


def test_peft_state_bytes_and_counts(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With peft: the plan's LoRA tensors are peft's (r * (in + out) per target linear, SigLIP's q/k/v
    included), the formula agrees, and a real peft model's bytes after a step equal the plan's."""
    peft = pytest.importorskip("peft")
    from r4b_edge.model.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    meta = P.meta_model(cfg)
    table, source = P.param_table(meta, 4)
    assert source.startswith("peft")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "peft", None)
        formula, fsource = P.lora_shapes(meta, 4)
    assert fsource.startswith("formula")
    assert sorted(formula) == sorted((p.name, p.shape) for p in table if p.trainable)
    want = sum(4 * (mod.in_features + mod.out_features) for n, mod in meta.named_modules()
               if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in P.LORA_TARGETS)
    assert sum(p.numel for p in table if p.trainable) == want

    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(P.LORA_TARGETS)))
    pm.train()
    opt = _step(pm.base_model.model, [p for p in pm.parameters() if p.requires_grad])
    assert {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.float32}
    assert _planned(table) == _allocated(pm.base_model.model, opt)


def test_sharding_pads_per_tensor_like_fsdp2(tiny_ckpt: Path) -> None:
    """Per-rank bytes are ceil(dim0 / N) rows per tensor: equal to FSDP2's local shards (fully_shard
    on a fake 3-rank process group), and about 1/N of one GPU's."""
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from r4b_edge.model.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(tiny_ckpt)
    table, _ = P.param_table(P.meta_model(model.config), None)
    one, three = P.state_bytes(table, 1), P.state_bytes(table, 3)
    assert one["weights"] / 3 <= three["weights"] < one["weights"] / 3 + 4 * sum(
        math.prod(p.shape[1:]) for p in table)
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=3)
    try:
        mesh = init_device_mesh("cpu", (3,))
        for layer in [*model.model.language_model.layers, *model.model.vision_tower.vision_model.encoder.layers,
                      model.model.language_model.embed_tokens, model.lm_head]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    assert local == three["weights"]


def _saved(fn, model) -> int:
    """Bytes of the non-parameter tensors autograd saves while `fn` runs (distinct storages)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("layers", [1, 2])
def test_activation_formulas_match_autograd(layers: int) -> None:
    """Per-layer saved bytes (bf16, CPU SDPA) of a Qwen3 layer and a SigLIP layer, and the per-layer
    input a checkpointed layer keeps, as the plan's formulas say."""
    from r4b_edge.model.modeling import RForConditionalGeneration
    from r4b_edge.testing import tiny_config

    torch.manual_seed(0)
    T, V = 24, 3

    def measure(n: int, ckpt: bool) -> tuple[int, int]:
        cfg = tiny_config(vocab_size=128, num_hidden_layers=n, intermediate_size=96)
        d = cfg.to_dict()
        d["vision_config"]["num_hidden_layers"] = n
        cfg = type(cfg).from_dict(d)
        m = RForConditionalGeneration(cfg).to(torch.bfloat16).train()
        if ckpt:
            for sub in (m.model.language_model, m.model.vision_tower.vision_model):
                sub.activation_checkpointing_enable({"use_reentrant": False})
        x = torch.randn(1, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        px = torch.randn(V, 3, cfg.image_size, cfg.image_size, dtype=torch.bfloat16)
        text = _saved(lambda: m.model.language_model(inputs_embeds=x, use_cache=False), m)
        vision = _saved(lambda: m.vision_hidden_states(px), m)
        return text, vision

    cfg = tiny_config(vocab_size=128, intermediate_size=96)
    tc, vc = cfg.text_config, cfg.vision_config
    Tv = V * cfg.tokens_per_view
    (t1, v1), (t2, v2) = measure(layers, False), measure(layers + 1, False)
    assert t2 - t1 == P.decoder_layer_saved(tc, T)
    assert v2 - v1 == P.vision_layer_saved(vc, Tv)
    (c1, w1), (c2, w2) = measure(layers, True), measure(layers + 1, True)
    assert c2 - c1 == T * 2 * tc["hidden_size"]
    assert w2 - w1 == Tv * 2 * vc["hidden_size"]


def test_r4b_true_size(tmp_path: Path) -> None:
    folder = P.write_r4b_config(tmp_path / "r4b")
    assert [f.name for f in folder.iterdir()] == ["config.json"]
    p = P.plan(folder, P.Setup(gpus=8, gpu_memory_gib=80))
    assert abs(p.params["total"] / 4.82e9 - 1) < 0.005
    assert (p.views, p.view_grid) == (5, (2, 2)) and p.image_tokens <= 4096  # 3x3 (7,371 tokens) does not fit
    assert P.plan(folder, P.Setup(seq_len=8192)).views == 10
    # LoRA r=16: 36 x 7 decoder linears + 27 x 3 SigLIP q/k/v; peft 0.22.0 counts the same 36,016,128
    lora = P.plan(folder, P.Setup(gpu_memory_gib=24, lora=16))
    assert lora.trainable_params == 36_016_128 and lora.fits
    # the 1/N sharding: 16 bytes per trainable param over 8 GPUs, plus padding
    n = p.params["total"]
    assert 16 * n / 8 <= p.rows["weights"] + p.rows["gradients"] + p.rows["optimizer"] < 16 * n / 8 * 1.001


def test_readme_table_is_the_tools_output(tmp_path: Path) -> None:
    folder = P.write_r4b_config(tmp_path / "r4b")
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- train-plan-table -->\n(.*?)\n<!-- /train-plan-table -->", text, re.S)
    assert m, "README.md lost its train-plan table markers"
    assert m.group(1).strip() == P.table(folder), "regenerate: r4b-edge train plan --model DIR --table"


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from r4b_edge.apps.cli import main

    rc = main(["train", "plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flags,name", [(["--gpus", "0"], "--gpus"), (["--gpu-memory", "-1"], "--gpu-memory"),
                                        (["--lora", "0"], "--lora"), (["--micro-batch", "0"], "--micro-batch")])
def test_bad_flags_one_line(capsys: pytest.CaptureFixture, tiny_ckpt: Path, flags: list[str], name: str) -> None:
    rc, out, err = _cli(capsys, "--model", str(tiny_ckpt), *flags)
    assert rc == 1 and not out
    assert len(err.strip().splitlines()) == 1 and f"error: {name} " in err


def test_unpulled_repo_names_the_pull(capsys: pytest.CaptureFixture) -> None:
    rc, _, err = _cli(capsys, "--model", "SomeOrg/Not-Pulled")
    assert rc == 1 and "r4b-edge pull SomeOrg/Not-Pulled --format hf" in err and "folder" in err


def test_json_and_text(capsys: pytest.CaptureFixture, tiny_ckpt: Path) -> None:
    rc, out, _ = _cli(capsys, "--model", str(tiny_ckpt), "--gpus", "2", "--gpu-memory", "0.001", "--seq-len", "256",
                      "--stage", "bpo", "--lora", "4", "--json")
    assert rc == 0
    d = json.loads(out)
    ph, rows = d["phases"], d["rows"]
    assert d["setup"]["gpus"] == 2 and rows["reference"] == 0 and rows["kv_cache"] > 0
    assert d["peak"] == ph["persistent"] + max(ph["backward"], ph["optimizer_step"], ph["rollout"])
    assert d["fits"] == (d["peak"] <= d["usable"]) and d["suggestion"]
    two = P.plan(tiny_ckpt, P.Setup(gpus=2, seq_len=256)).peak
    mem = f"{two / (1 - P.RESERVE) / P.GIB * 1.0001:.9f}"  # 2 GPUs fit, 1 does not
    rc, out, _ = _cli(capsys, "--model", str(tiny_ckpt), "--gpu-memory", mem, "--seq-len", "256")
    assert rc == 0 and "MiB" in out and re.match(r"DOES NOT FIT: try --gpus 2(,|$)", out.strip().splitlines()[-1])
