"""`r4b-edge train plan`: the bytes one GPU holds to fine-tune a model folder, and whether they fit.

The model is built on the meta device from the folder's config.json (no weights are read), so the
parameter counts are the real module shapes. The layout assumed (docs/training.md, "Memory plan"):
FSDP2 (`fully_shard` per decoder layer, per vision layer, embed_tokens, lm_head, then the root) on
every GPU count, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), AdamW, activation
checkpointing per layer in both towers, a chunked loss over answer positions, packed sequences.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from r4b_edge.errors import ModelFormatError, ModelNotFoundError, TrainingError

GIB = 1 << 30
LOSS_CHUNK = 1024          # answer positions per chunk of the loss
LOGIT_BYTES = 14           # per position x vocab: bf16 logits 2 + fp32 copy 4 + log-softmax 4 + its grad 4
RESERVE = 0.10             # share of the GPU kept for the CUDA context, NCCL buffers, fragmentation
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUGGEST_LORA = 16
MAX_SUGGEST_GPUS = 256
R4B_IMAGE_TOKEN = 151646   # `<image>` in R-4B's tokenizer
R4B_VOCAB = 151936
ASSUMES = ("FSDP2 fully_shard per decoder layer, per vision layer, embed_tokens, lm_head, then the root, on every "
           "GPU count; MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), no autocast; AdamW (foreach); "
           f"activation checkpointing per layer in both towers; loss in chunks of {LOSS_CHUNK} answer positions; "
           "packed sequences (no attention mask); LoRA on every linear named like a target, as peft matches")

_UNIT = [(re.compile(r"^model\.language_model\.layers\.(\d+)\."), "text.{}"),
         (re.compile(r"^model\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\."), "vision.{}"),
         (re.compile(r"^model\.language_model\.embed_tokens\."), "embed"),
         (re.compile(r"^lm_head\."), "lm_head")]
_MODULES = [("vision tower", "model.vision_tower."), ("projector", "model.multi_modal_projector."),
            ("image_newline", "model.image_newline"), ("embed_tokens", "model.language_model.embed_tokens."),
            ("decoder layers", "model.language_model.layers."), ("final norm", "model.language_model.norm."),
            ("lm_head", "lm_head.")]


def fsdp_unit(name: str) -> str:
    """The FSDP2 unit a parameter belongs to: text.i, vision.i, embed, lm_head or root."""
    for pat, unit in _UNIT:
        m = pat.match(name)
        if m:
            return unit.format(*m.groups())
    return "root"


def shard_numel(shape: Sequence[int], gpus: int) -> int:
    """Elements of one rank's shard: FSDP2 splits dim 0 into `gpus` chunks and pads every rank to
    the largest, ceil(dim0 / gpus) rows (a 0-dim tensor counts as one row)."""
    rows = int(shape[0]) if len(shape) else 1
    return -(-rows // gpus) * math.prod(int(s) for s in shape[1:])


@dataclass(frozen=True)
class Param:
    """One parameter tensor: name, shape, whether it trains, its FSDP2 unit."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    unit: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Setup:
    """The run being planned (the CLI flags)."""

    gpus: int = 1
    gpu_memory_gib: float = 80.0
    lora: int | None = None
    seq_len: int = 4096
    micro_batch: int = 1
    stage: str = "anneal"
    group: int = 4
    images: int = 1

    def check(self) -> None:
        """TrainingError naming the first bad flag, with the value and the fix."""
        bad = [("--gpus", self.gpus < 1, f"must be at least 1 (got {self.gpus}): the GPUs the run shards over"),
               ("--gpu-memory", not self.gpu_memory_gib > 0,
                f"must be a positive number of GiB per GPU (got {self.gpu_memory_gib:g}), e.g. 24 or 80"),
               ("--lora", self.lora is not None and self.lora < 1,
                f"must be a rank of at least 1 (got {self.lora}); leave it out for a full fine-tune"),
               ("--seq-len", self.seq_len < 1, f"must be at least 1 token (got {self.seq_len})"),
               ("--micro-batch", self.micro_batch < 1, f"must be at least 1 sequence (got {self.micro_batch})"),
               ("--group", self.group < 1, f"must be at least 1 (got {self.group}): BPO rolls out 2 x group"),
               ("--images", self.images < 0, f"must be 0 or more per sequence (got {self.images})"),
               ("--stage", self.stage not in ("anneal", "bpo"), f"must be anneal or bpo (got {self.stage!r})")]
        for flag, wrong, msg in bad:
            if wrong:
                raise TrainingError(f"{flag} {msg}")


@dataclass
class Plan:
    """Bytes per GPU by row, the peak, and the verdict."""

    model: str
    setup: Setup
    params: dict[str, int]
    trainable_params: int
    lora_source: str | None
    views: int
    view_grid: tuple[int, int]
    image_tokens: int
    rows: dict[str, int]
    phases: dict[str, int]
    peak: int
    gpu_bytes: int
    usable: int
    fits: bool
    suggestion: str = ""

    def to_json(self) -> dict[str, Any]:
        """Everything in bytes, plus the layout the numbers assume."""
        d = asdict(self)
        d["view_grid"] = list(self.view_grid)
        d["assumes"] = ASSUMES
        return d


# ---- the model's shapes ------------------------------------------------------------------------
def meta_model(config: Any) -> Any:
    """RForConditionalGeneration of `config` on the meta device (no memory, no weights read)."""
    import torch

    from r4b_edge.model.modeling import RForConditionalGeneration

    with torch.device("meta"):
        return RForConditionalGeneration(config, init_weights=False)


def distinct_params(model: Any) -> list[tuple[str, Any]]:
    """(name, parameter) once per tensor (a tied LM head counts once)."""
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def lora_shapes(model: Any, rank: int) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """LoRA adapter tensors (name, shape) for LORA_TARGETS, matched as peft matches them (a module
    whose name ends in a target: the decoder's 7 linears and SigLIP's q/k/v_proj; not out_proj/fc*).
    Counted by peft on the meta model when peft is installed, else by the same rule: A [r, in],
    B [out, r] per target nn.Linear. Returns (tensors, "peft X.Y" | "formula")."""
    try:
        import peft
    except ImportError:
        from torch import nn

        out = []
        for n, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS:
                out += [(f"{n}.lora_A.weight", (rank, mod.in_features)),
                        (f"{n}.lora_B.weight", (mod.out_features, rank))]
        return out, "formula r*(in+out) per target linear (peft not installed)"
    fresh = meta_model(model.config)
    pm = peft.get_peft_model(fresh, peft.LoraConfig(r=rank, target_modules=list(LORA_TARGETS)))
    out = [(n.removeprefix("base_model.model.").replace(".default", ""), tuple(p.shape))
           for n, p in pm.named_parameters() if "lora_" in n]
    return out, f"peft {peft.__version__}"


def param_table(model: Any, lora: int | None) -> tuple[list[Param], str | None]:
    """Every parameter tensor with its trainability and unit; with `lora` the base is frozen and
    the adapters are the only trainable tensors."""
    base = [Param(n, tuple(p.shape), lora is None, fsdp_unit(n)) for n, p in distinct_params(model)]
    if lora is None:
        return base, None
    shapes, source = lora_shapes(model, lora)
    return base + [Param(n, s, True, fsdp_unit(n)) for n, s in shapes], source


def module_counts(model: Any) -> dict[str, int]:
    """Parameters per top-level part of the model, and the total."""
    out = {k: 0 for k, _ in _MODULES}
    total = 0
    for n, p in distinct_params(model):
        total += p.numel()
        for k, prefix in _MODULES:
            if n.startswith(prefix):
                out[k] += p.numel()
                break
        else:
            out.setdefault("other", 0)
            out["other"] += p.numel()
    out["total"] = total
    return out


# ---- bytes -------------------------------------------------------------------------------------
def state_bytes(params: Sequence[Param], gpus: int) -> dict[str, int]:
    """Per-rank bytes of the sharded state: weights (trainable fp32 = the master copy, frozen bf16),
    gradients (fp32, trainable only), optimizer (AdamW exp_avg + exp_avg_sq fp32, and a 4-byte step
    per trainable tensor), the optimizer step's foreach temporary (one fp32 sqrt(exp_avg_sq))."""
    tr = sum(shard_numel(p.shape, gpus) for p in params if p.trainable)
    fr = sum(shard_numel(p.shape, gpus) for p in params if not p.trainable)
    n_tr = sum(1 for p in params if p.trainable)
    return {"weights": 4 * tr + 2 * fr, "gradients": 4 * tr, "optimizer": 8 * tr + 4 * n_tr, "step_temp": 4 * tr}


def gather_bytes(params: Sequence[Param]) -> int:
    """FSDP2's unsharded working set: the root unit's bf16 params (kept gathered from forward to
    backward) + two other units' bf16 params (the current one and the prefetched next) + one unit's
    unsharded gradient in bf16 and in fp32 for the reduce-scatter (the largest unit throughout)."""
    units: dict[str, list[int]] = {}
    for p in params:
        u = units.setdefault(p.unit, [0, 0])
        u[0] += p.numel
        u[1] += p.numel if p.trainable else 0
    root = units.pop("root", [0, 0])
    biggest = max((u[0] for u in units.values()), default=0)
    biggest_tr = max((u[1] for u in units.values()), default=0)
    return 2 * root[0] + 2 * 2 * biggest + (2 + 4) * max(biggest_tr, root[1])


def decoder_layer_saved(tc: dict, tokens: int) -> int:
    """Bytes autograd saves in one Qwen3 layer's forward (bf16, SDPA with GQA, no mask), per token:
    16H (2 RMSNorms: fp32 input 4H, bf16 normed 2H, output 2H) + 10 q_dim + 10 kv_dim (q/k norm
    fp32 input + normed, roped q/k, v, attention output) + 8I (gate, up, SiLU, product)
    + 8 n_heads + 4 n_kv_heads (rsqrt, logsumexp) + 8; measured with saved_tensors_hooks."""
    H, I, d = tc["hidden_size"], tc["intermediate_size"], tc["head_dim"]
    nq, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    return tokens * (16 * H + 10 * nq * d + 10 * nkv * d + 8 * I + 8 * nq + 4 * nkv + 8)


def vision_layer_saved(vc: dict, tokens: int) -> int:
    """Bytes autograd saves in one SigLIP layer's forward (bf16), per patch: 16D (2 LayerNorms'
    input + output, q, k, v, attention output) + 4I (fc1 out, GELU out) + 4 n_heads + 8."""
    D, I, nh = vc["hidden_size"], vc["intermediate_size"], vc["num_attention_heads"]
    return tokens * (16 * D + 4 * I + 4 * nh + 8)


def decoder_activations(tc: dict, tokens: int) -> int:
    """Checkpointed decoder: every layer's bf16 input (2H per token per layer) + RoPE cos/sin (4
    head_dim) + the final norm (6H + 4) + one layer's recompute (decoder_layer_saved) + its backward
    transients (incoming and outgoing hidden grads 4H, two I-wide grads 4I), per token."""
    H, I, d, n = tc["hidden_size"], tc["intermediate_size"], tc["head_dim"], tc["num_hidden_layers"]
    return tokens * (n * 2 * H + 4 * d + 6 * H + 4 + 4 * H + 4 * I) + decoder_layer_saved(tc, tokens)


def vision_activations(vc: dict, text_hidden: int, tokens: int) -> int:
    """Checkpointed SigLIP over `tokens` patches: every layer's bf16 input (2D) + the patch
    embedding's saved pixels (6 patch^2) + the projector (4D + 4 text hidden + 4) + one layer's
    recompute (vision_layer_saved) + its backward transients (4D + 4I), per patch."""
    D, I, n, P = vc["hidden_size"], vc["intermediate_size"], vc["num_hidden_layers"], vc["patch_size"]
    per = n * 2 * D + 6 * P * P + 4 * D + 4 * text_hidden + 4 + 4 * D + 4 * I
    return tokens * per + vision_layer_saved(vc, tokens)


def logits_bytes(vocab: int, answer_positions: int, chunk: int = LOSS_CHUNK) -> int:
    """One chunk of the loss: min(chunk, positions) x vocab x LOGIT_BYTES."""
    return min(chunk, answer_positions) * vocab * LOGIT_BYTES


def kv_cache_bytes(tc: dict, sequences: int, seq_len: int) -> int:
    """bf16 K and V of every layer for `sequences` rollouts of `seq_len` positions."""
    return sequences * seq_len * tc["num_hidden_layers"] * 2 * tc["num_key_value_heads"] * tc["head_dim"] * 2


def image_views(config: Any, seq_len: int, images: int) -> tuple[int, tuple[int, int], int]:
    """(views, grid, tokens per image) of the largest AnyRes grid whose image tokens, `images`
    times over, fit `seq_len` (an image exactly the pinpoint's size, the runtime's token count)."""
    from r4b_edge.model.processing import count_image_tokens

    base = config.tokens_per_view
    if images == 0:
        return 0, (0, 0), 0
    if images * base > seq_len:
        raise TrainingError(f"--seq-len {seq_len} cannot hold {images} image(s) of {base} tokens (the base view "
                            f"alone): raise --seq-len to at least {images * base} or lower --images")
    best = (1, (0, 0), base)
    if config.anyres:
        S = config.image_size
        for h, w in config.image_grid_pinpoints:
            n = count_image_tokens((h, w), config)
            cand = (1 + (h // S) * (w // S), (h // S, w // S), n)
            if images * n <= seq_len and (cand[0], cand[2]) > (best[0], best[2]):
                best = cand
    return best


# ---- the plan ----------------------------------------------------------------------------------
def plan_model(model: Any, setup: Setup, name: str = "", suggest: bool = True, cache: dict | None = None) -> Plan:
    """The plan of `setup` for a (meta) model; `cache` keeps the parameter tables between calls."""
    setup.check()
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    cache = cache if cache is not None else {}
    if setup.lora not in cache:
        cache[setup.lora] = param_table(model, setup.lora)
    params, source = cache[setup.lora]
    if "counts" not in cache:
        cache["counts"] = module_counts(model)
    N, B, L = setup.gpus, setup.micro_batch, setup.seq_len
    views, grid, img_tok = image_views(cfg, L, setup.images)
    st = state_bytes(params, N)
    rows = {"weights": st["weights"], "gradients": st["gradients"], "optimizer": st["optimizer"],
            "reference": 0, "fsdp_gather": gather_bytes(params),
            "activations": decoder_activations(tc, B * L),
            "logits": logits_bytes(cfg.vocab_size, B * L),
            "vision": vision_activations(vc, cfg.hidden_size, B * setup.images * views * cfg.tokens_per_view)
            if views else 0,
            "kv_cache": 0, "optimizer_step": st["step_temp"]}
    if setup.stage == "bpo":
        if setup.lora is None:
            rows["reference"] = sum(2 * shard_numel(p.shape, N) for p in params)
        rows["kv_cache"] = kv_cache_bytes(tc, B * 2 * setup.group, L)
    phases = {"persistent": rows["weights"] + rows["gradients"] + rows["optimizer"] + rows["reference"],
              "backward": rows["activations"] + rows["logits"] + rows["vision"] + rows["fsdp_gather"],
              "optimizer_step": rows["optimizer_step"],
              "rollout": rows["kv_cache"] + rows["fsdp_gather"] if setup.stage == "bpo" else 0}
    peak = phases["persistent"] + max(phases["backward"], phases["optimizer_step"], phases["rollout"])
    gpu = int(setup.gpu_memory_gib * GIB)
    usable = int(gpu * (1 - RESERVE))
    p = Plan(model=name, setup=setup, params=cache["counts"],
             trainable_params=sum(q.numel for q in params if q.trainable), lora_source=source, views=views,
             view_grid=grid, image_tokens=img_tok, rows=rows, phases=phases, peak=peak, gpu_bytes=gpu,
             usable=usable, fits=peak <= usable)
    if suggest:
        p.suggestion = suggestion(model, p, cache)
    return p


def suggestion(model: Any, p: Plan, cache: dict) -> str:
    """One line: what would make it fit (more GPUs, --lora, smaller micro-batch / seq-len)."""
    s = p.setup
    if p.fits:
        unit, scale = _unit(p)
        return f"{(p.usable - p.peak) / scale:.1f} {unit} to spare"

    def fits(**kw: Any) -> bool:
        try:
            return plan_model(model, replace(s, **kw), suggest=False, cache=cache).fits
        except TrainingError:  # e.g. a seq-len too short for the images
            return False

    opts = []
    more = next((n for n in range(s.gpus + 1, MAX_SUGGEST_GPUS + 1) if fits(gpus=n)), None)
    if more:
        opts.append(f"--gpus {more}")
    if s.lora is None and fits(lora=SUGGEST_LORA):
        opts.append(f"--lora {SUGGEST_LORA}")
    if s.micro_batch > 1 and fits(micro_batch=1):
        opts.append("--micro-batch 1")
    L = s.seq_len // 2
    while L >= 512 and not fits(seq_len=L):
        L //= 2
    if L >= 512:
        opts.append(f"--seq-len {L}")
    if not opts:
        return (f"nothing tried fits (up to {MAX_SUGGEST_GPUS} GPUs, --lora {SUGGEST_LORA}, --seq-len 512): "
                "use GPUs with more memory")
    return "try " + ", or ".join(opts)


def resolve_folder(model: str) -> Path:
    """The folder holding config.json: a path, a stored model name or a pulled repo id."""
    from r4b_edge import store

    try:
        path = store.resolve_model(model, backend="torch")
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"{model!r} is neither a folder nor a stored model, and train plan downloads nothing: run "
            f"`r4b-edge pull {model.split(':', 1)[0]} --format hf` first, or pass the model folder "
            "(only its config.json is read)") from None
    if not path.exists():
        raise ModelNotFoundError(f"model folder not found: {path}")
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"no config.json in {folder}: train plan needs the model's Hugging Face folder "
                               f"(`r4b-edge pull {model.split(':', 1)[0]} --format hf`), not a GGUF/ONNX export")
    return folder


def plan(model: str | Path, setup: Setup) -> Plan:
    """Plan `setup` for a model folder / store name / pulled repo id (only config.json is read)."""
    from r4b_edge.model.config import RConfig

    setup.check()
    folder = resolve_folder(str(model))
    return plan_model(meta_model(RConfig.from_file(folder / "config.json")), setup, name=str(folder))


# ---- output ------------------------------------------------------------------------------------
def _unit(p: Plan) -> tuple[str, int]:
    """GiB for a real GPU, MiB below 1 GiB (tiny models)."""
    return ("GiB", GIB) if p.gpu_bytes >= GIB else ("MiB", 1 << 20)


def format_plan(p: Plan) -> str:
    """The plan as text: the setup, one line per row with its formula, the peak and the verdict."""
    s, c = p.setup, p.params
    unit, scale = _unit(p)

    def amount(n: int) -> str:
        return f"{n / scale:.2f}"

    tr = ("full fine-tune" if s.lora is None
          else f"LoRA r={s.lora} ({p.trainable_params:,} adapter params: {p.lora_source})")
    img = (f"{s.images} image(s) x {p.views} views (grid {p.view_grid[0]}x{p.view_grid[1]}, {p.image_tokens:,} "
           f"tokens each)" if p.views else "no images")
    parts = ", ".join(f"{k} {v:,}" for k, v in c.items() if k != "total" and v)
    out = [f"train plan: {p.model}",
           f"  params {c['total']:,} ({parts})",
           f"  {s.gpus} x {s.gpu_memory_gib:g} GiB, {tr}, stage {s.stage}"
           + (f" (2 x {s.group} rollouts)" if s.stage == "bpo" else "")
           + f", micro-batch {s.micro_batch} x seq-len {s.seq_len:,}, {img}",
           f"  {'per GPU':<16}{unit:>8}  how"]
    how = {
        "weights": f"trainable fp32 (the master copy), frozen bf16; FSDP2 shards 1/{s.gpus}, padded per tensor",
        "gradients": "fp32, trainable params only, sharded",
        "optimizer": "AdamW exp_avg + exp_avg_sq fp32 (8 B/trainable param), sharded, + a 4 B step per tensor",
        "reference": "BPO's frozen reference policy, bf16, sharded" if s.lora is None
        else "none: the LoRA base (adapters off) is the reference",
        "fsdp_gather": "root unit + 2 largest units gathered in bf16 + one unit's grad (bf16 + fp32)",
        "activations": f"checkpointed: {s.micro_batch} x {s.seq_len} x hidden bf16 per layer + one layer's recompute",
        "logits": f"loss chunk: {min(LOSS_CHUNK, s.micro_batch * s.seq_len)} answer positions x vocab x "
                  f"{LOGIT_BYTES} B",
        "vision": "checkpointed SigLIP over the AnyRes views + the projector",
        "kv_cache": f"bf16 K/V of {s.micro_batch * 2 * s.group} rollouts x {s.seq_len} positions",
        "optimizer_step": "AdamW foreach temporary (fp32 sqrt of exp_avg_sq), step only",
    }
    for k, v in p.rows.items():
        if v or k in ("weights", "activations", "logits") or (s.stage == "bpo" and k in ("reference", "kv_cache")):
            out.append(f"  {k:<16}{amount(v):>8}  {how[k]}")
    ph = p.phases
    out.append(f"  {'peak':<16}{amount(p.peak):>8}  persistent {amount(ph['persistent'])} + max(backward "
               f"{amount(ph['backward'])}, optimizer step {amount(ph['optimizer_step'])}"
               + (f", rollout {amount(ph['rollout'])}" if s.stage == "bpo" else "") + ")")
    out.append(f"  {'GPU':<16}{amount(p.gpu_bytes):>8}  usable {amount(p.usable)} ({RESERVE:.0%} kept for the CUDA "
               "context, NCCL, fragmentation)")
    out.append(("FITS" if p.fits else "DOES NOT FIT") + f": {p.suggestion}")
    return "\n".join(out)


#: the README table: (label, setup) for R-4B's true shapes
TABLE_SETUPS: list[tuple[str, Setup]] = [
    (label, Setup(gpus=g, gpu_memory_gib=m, lora=r, stage=st, seq_len=4096, micro_batch=1, group=4))
    for st in ("anneal", "bpo")
    for label, g, m, r in (("1 x 24 GiB, --lora 16", 1, 24, 16), ("1 x 80 GiB, full", 1, 80, None),
                           ("8 x 80 GiB, full", 8, 80, None))]


def table(folder: str | Path) -> str:
    """The markdown table of TABLE_SETUPS for `folder` (GiB per GPU)."""
    from r4b_edge.model.config import RConfig

    model = meta_model(RConfig.from_file(Path(folder) / "config.json"))
    cache: dict = {}
    head = ("| GPUs, training | stage | weights | grads | optimizer | reference | activations | logits | vision "
            "| FSDP2 gather | KV cache | peak | usable | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, s in TABLE_SETUPS:
        p = plan_model(model, s, cache=cache)
        r = p.rows
        st = f"bpo (g={s.group})" if s.stage == "bpo" else "anneal"
        cells = [label, st] + [f"{r[k] / GIB:.1f}" if r[k] else "-"
                               for k in ("weights", "gradients", "optimizer", "reference", "activations", "logits",
                                         "vision", "fsdp_gather", "kv_cache")]
        cells += [f"{p.peak / GIB:.1f}", f"{p.usable / GIB:.1f}", "fits" if p.fits else "**does not fit**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_r4b_config(folder: str | Path) -> Path:
    """A config-only folder with R-4B's true shapes (export.scale_check.r4b_config); no weights."""
    from r4b_edge.export.scale_check import r4b_config

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    r4b_config(R4B_VOCAB, R4B_IMAGE_TOKEN).save(out / "config.json")
    return out


def main(argv: list[str] | None = None) -> int:
    """`train plan`: per-GPU memory of fine-tuning --model, and whether it fits."""
    ap = argparse.ArgumentParser(prog="r4b-edge train plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder, stored model name or pulled repo id (only config.json is read)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the run is sharded over (FSDP2)")
    ap.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU, GiB")
    ap.add_argument("--lora", type=int, default=None, metavar="RANK", help="LoRA rank (default: full fine-tune)")
    ap.add_argument("--seq-len", type=int, default=4096, help="positions per sequence, image tokens included")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    ap.add_argument("--stage", choices=["anneal", "bpo"], default="anneal")
    ap.add_argument("--group", type=int, default=4, help="BPO: g (2g rollouts per prompt)")
    ap.add_argument("--images", type=int, default=1, help="images per sequence (AnyRes views: the largest grid "
                                                          "that fits --seq-len)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    ap.add_argument("--table", action="store_true", help="print the README table (6 setups) for --model")
    ap.add_argument("--write-r4b-config", metavar="DIR", help="write a config-only folder with R-4B's true shapes")
    a = ap.parse_args(argv)
    if a.write_r4b_config:
        print(write_r4b_config(a.write_r4b_config))
        return 0
    if not a.model:
        raise TrainingError("--model is required: a model folder, a stored model name or a pulled repo id")
    setup = Setup(gpus=a.gpus, gpu_memory_gib=a.gpu_memory, lora=a.lora, seq_len=a.seq_len,
                  micro_batch=a.micro_batch, stage=a.stage, group=a.group, images=a.images)
    setup.check()
    if a.table:
        print(table(resolve_folder(a.model)))
        return 0
    p = plan(a.model, setup)
    print(json.dumps(p.to_json(), indent=1) if a.json else format_plan(p))
    return 0
