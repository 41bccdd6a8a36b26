"""RConfig: the R-4B `config.json` (model_type "R"), parsed and validated without torch.

Layout (LLaVA-OneVision family): a Qwen3 `text_config`, a SigLIP `vision_config`
(`model_type` "siglip_vision_model"), and the multimodal fields at top level.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError

_TEXT_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "max_position_embeddings",
)
_VISION_REQUIRED = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "image_size", "patch_size",
)
_ANYRES_MAX = re.compile(r"^anyres_max_([1-9]\d*)$")


def _err(field_name: str, problem: str, source: str = "config.json") -> ModelFormatError:
    return ModelFormatError(f"{source}: field `{field_name}` {problem}")


def _as_int(d: dict, key: str, prefix: str, source: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _err(f"{prefix}{key}", f"must be a positive integer (got {v!r})", source)
    return v


@dataclass
class RConfig:
    """The R-4B model configuration (see docs/design.md)."""

    text_config: dict
    vision_config: dict
    image_token_index: int
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
    image_grid_pinpoints: list[list[int]] | None = None
    vision_aspect_ratio: str = "anyres"
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    raw: dict = field(default_factory=dict)
    preprocessor: dict = field(default_factory=dict)

    # ---- derived -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text_config["max_position_embeddings"])

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config["patch_size"])

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def anyres(self) -> bool:
        """True when images are tiled (AnyRes): an `anyres*` aspect ratio and pinpoints."""
        return bool(self.image_grid_pinpoints) and self.vision_aspect_ratio.startswith("anyres")

    @property
    def anyres_max_patches(self) -> int | None:
        """N of `anyres_max_N` (feature-map downsampling as in LLaVA-OneVision), else None."""
        m = _ANYRES_MAX.match(self.vision_aspect_ratio)
        return int(m.group(1)) if m else None

    @property
    def rope_theta(self) -> float:
        """RoPE base, from `rope_theta` or transformers-5 `rope_parameters`."""
        tc = self.text_config
        rp = tc.get("rope_parameters") or {}
        return float(tc.get("rope_theta", rp.get("rope_theta", 1_000_000.0)))

    @property
    def image_mean(self) -> list[float]:
        return self._norm_stat("image_mean")

    @property
    def image_std(self) -> list[float]:
        return self._norm_stat("image_std")

    def _norm_stat(self, key: str) -> list[float]:
        for src in (self.preprocessor, self.vision_config, self.raw):
            v = src.get(key)
            if v is not None:
                v = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
                if len(v) != 3:
                    raise _err(key, f"must have 3 values (got {len(v)})")
                return v
        return [0.5, 0.5, 0.5]

    # ---- io ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "RConfig":
        """Parse and validate an R-4B config dict; ModelFormatError names the bad field."""
        if not isinstance(d, dict):
            raise ModelFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        tc, vc = d.get("text_config"), d.get("vision_config")
        if not isinstance(tc, dict):
            raise _err("text_config", "is missing or not an object", source)
        if not isinstance(vc, dict):
            raise _err("vision_config", "is missing or not an object", source)
        tc, vc = copy.deepcopy(tc), copy.deepcopy(vc)
        for k in _TEXT_REQUIRED:
            _as_int(tc, k, "text_config.", source)
        for k in _VISION_REQUIRED:
            _as_int(vc, k, "vision_config.", source)
        tc.setdefault("num_key_value_heads", tc["num_attention_heads"])
        tc.setdefault("head_dim", tc["hidden_size"] // tc["num_attention_heads"])
        if tc["num_attention_heads"] % _as_int(tc, "num_key_value_heads", "text_config.", source):
            raise _err("text_config.num_key_value_heads",
                       f"({tc['num_key_value_heads']}) must divide num_attention_heads "
                       f"({tc['num_attention_heads']})", source)
        if "rope_theta" not in tc and not isinstance(tc.get("rope_parameters"), dict):
            tc["rope_parameters"] = {"rope_theta": 1_000_000.0, "rope_type": "default"}
        if vc["hidden_size"] % vc["num_attention_heads"]:
            raise _err("vision_config.num_attention_heads",
                       f"({vc['num_attention_heads']}) must divide hidden_size ({vc['hidden_size']})", source)
        if vc["patch_size"] > vc["image_size"]:  # 384 / 14 is fine: the conv floors to 27 x 27
            raise _err("vision_config.patch_size",
                       f"({vc['patch_size']}) must not exceed image_size ({vc['image_size']})", source)
        vmt = vc.get("model_type", "siglip_vision_model")
        if vmt not in ("siglip_vision_model", "siglip2_vision_model"):
            raise _err("vision_config.model_type", f"must be 'siglip_vision_model' (got {vmt!r})", source)
        vc["model_type"] = "siglip_vision_model"

        iti = d.get("image_token_index", d.get("image_token_id"))
        if isinstance(iti, bool) or not isinstance(iti, int) or not 0 <= iti < tc["vocab_size"]:
            raise _err("image_token_index",
                       f"must be an integer in [0, vocab_size={tc['vocab_size']}) (got {iti!r})", source)
        vfl = d.get("vision_feature_layer", -1)
        n_vl = vc["num_hidden_layers"]
        if isinstance(vfl, bool) or not isinstance(vfl, int) or not -n_vl <= vfl <= n_vl or vfl == 0:
            raise _err("vision_feature_layer",
                       f"must be an integer in [-{n_vl}, -1] or [1, {n_vl}] (got {vfl!r})", source)
        strat = d.get("vision_feature_select_strategy", "full")
        if strat != "full":
            raise _err("vision_feature_select_strategy",
                       f"must be 'full' (SigLIP has no CLS token; got {strat!r})", source)
        pins = d.get("image_grid_pinpoints")
        S = vc["image_size"]
        if pins is not None:
            if not isinstance(pins, list) or not pins:
                raise _err("image_grid_pinpoints", "must be a non-empty list of [height, width]", source)
            out = []
            for p in pins:
                if (not isinstance(p, (list, tuple)) or len(p) != 2
                        or not all(isinstance(x, int) and x > 0 and x % S == 0 for x in p)):
                    raise _err("image_grid_pinpoints",
                               f"entry {p!r} must be [height, width], multiples of image_size {S}", source)
                out.append([int(p[0]), int(p[1])])
            pins = out
        var = d.get("vision_aspect_ratio", "anyres" if pins else "base")
        if not isinstance(var, str) or not (var in ("base", "anyres") or _ANYRES_MAX.match(var)):
            raise _err("vision_aspect_ratio", f"must be 'anyres', 'anyres_max_N' (N >= 1) or 'base' (got {var!r})",
                       source)
        act = d.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise _err("projector_hidden_act", f"must be 'gelu' (got {act!r})", source)
        tie = bool(d.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
        return cls(
            text_config=tc, vision_config=vc, image_token_index=iti, vision_feature_layer=vfl,
            vision_feature_select_strategy=strat, image_grid_pinpoints=pins, vision_aspect_ratio=var,
            projector_hidden_act=act, tie_word_embeddings=tie, raw=copy.deepcopy(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "RConfig":
        """Read `config.json` (a file, or a folder holding it) and, when present beside it,
        `preprocessor_config.json` (see `merge_preprocessor` for which file decides what)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ModelFormatError(f"config.json not found at {p}")
        d = read_json(p)
        pp = p.parent / PREPROCESSOR_CONFIG
        if not pp.is_file():
            return cls.from_dict(d, source=str(p))
        d, pixels = merge_preprocessor(d, read_json(pp), source=str(pp))
        cfg = cls.from_dict(d, source=str(p))
        cfg.preprocessor = pixels
        return cfg

    def to_dict(self) -> dict:
        """The R-4B config.json layout (unknown fields of `raw` are kept)."""
        d = copy.deepcopy(self.raw)
        d.update({
            "architectures": ["RForConditionalGeneration"],
            "model_type": "R",
            "text_config": copy.deepcopy(self.text_config),
            "vision_config": copy.deepcopy(self.vision_config),
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "image_grid_pinpoints": copy.deepcopy(self.image_grid_pinpoints),
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "projector_hidden_act": self.projector_hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
        })
        d["text_config"].setdefault("model_type", "qwen3")
        if self.image_mean != [0.5] * 3 and "image_mean" not in d["vision_config"]:
            d["vision_config"]["image_mean"] = self.image_mean
            d["vision_config"]["image_std"] = self.image_std
        return d

    def save(self, path: str | Path) -> None:
        """Write config.json to `path` (a file path)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


PREPROCESSOR_CONFIG = "preprocessor_config.json"
_BICUBIC = 3  # PIL.Image.BICUBIC, transformers' PILImageResampling.BICUBIC


def read_json(p: Path) -> dict:
    """A JSON object from `p`; ModelFormatError names the file otherwise."""
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{p}: cannot be read as JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelFormatError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def _stat3(v: Any, key: str, source: str) -> list[float]:
    """A mean/std as the HF image processor takes it: one number for all channels, or three."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)] * 3
    if (isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        return [float(x) for x in v]
    raise _err(key, f"must be a number or a list of 3 numbers (got {v!r})", source)


def merge_preprocessor(d: dict, pre: dict, source: str = PREPROCESSOR_CONFIG) -> tuple[dict, dict]:
    """Fold preprocessor_config.json (`pre`) into the config.json dict `d`, read the way
    transformers' LLaVA-OneVision image processor reads it. Returns (config dict, pixel stats).

    Precedence (docs/interop.md): preprocessor_config.json decides how pixels are made
    (`image_mean`/`image_std`, over the config.json copies; `do_normalize: false` means mean 0,
    std 1); config.json decides the model. What both files name must agree, else ModelFormatError:
    `size` ({"height", "width"} or {"shortest_edge"}) must be the tower's `vision_config.image_size`,
    and `image_grid_pinpoints` must equal config.json's when config.json has them (when it has
    none, the preprocessor's are used). Settings r4b-edge does not implement (another `resample`
    than bicubic, a `rescale_factor` other than 1/255, center cropping) are errors too.
    """
    d = copy.deepcopy(d)
    if pre.get("do_normalize", True) is False:
        pixels = {"image_mean": [0.0] * 3, "image_std": [1.0] * 3}
    else:
        pixels = {k: _stat3(pre[k], k, source) for k in ("image_mean", "image_std") if pre.get(k) is not None}
    if pre.get("resample", _BICUBIC) != _BICUBIC:
        raise _err("resample", f"must be {_BICUBIC} (bicubic, what r4b-edge resizes with; got {pre['resample']!r})",
                   source)
    rf = pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) is not False else None
    if rf is None or not isinstance(rf, (int, float)) or abs(rf - 1 / 255) > 1e-9:
        raise _err("rescale_factor", f"must be 1/255 with do_rescale on (got do_rescale="
                   f"{pre.get('do_rescale', True)!r}, rescale_factor={rf!r})", source)
    if pre.get("do_center_crop"):
        raise _err("do_center_crop", "must be off (R-4B resizes the whole image)", source)
    vc = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else {}
    size, view = pre.get("size"), vc.get("image_size")
    if size is not None:
        if not isinstance(size, dict):
            raise _err("size", f"must be an object with height/width or shortest_edge (got {size!r})", source)
        sides = {size.get("height"), size.get("width")} if "height" in size else {size.get("shortest_edge")}
        if len(sides) != 1 or (view is not None and sides != {view}):
            raise _err("size", f"{size} must be square and equal config.json vision_config.image_size ({view})",
                       source)
    pins = pre.get("image_grid_pinpoints")
    if pins is not None:
        have = d.get("image_grid_pinpoints")
        if have is None:
            d["image_grid_pinpoints"] = copy.deepcopy(pins)
        elif [list(p) for p in have] != [list(p) for p in pins]:
            raise _err("image_grid_pinpoints", f"{pins} differ from config.json's {have}", source)
    return d, pixels
