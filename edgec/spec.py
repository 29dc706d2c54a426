"""The one gpt-oss model specification: config, tensor names, shapes and dtypes for both checkpoint layouts.

Every converter and runtime reads the model through this module. Names are the Hugging Face names; the
OpenAI `original/` layout is described here too and mapped onto the HF names (fused qkv split by rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import EdgecError
from .safetensors_io import DTYPE_SIZE

MXFP4_BLOCK = 32  # values per MXFP4 block (16 bytes of codes + 1 scale byte)
HARMONY_VOCAB = 201088  # o200k_harmony: 199998 ranks + specials up to 201087
MAX_SIZE = 1 << 24  # any one size or token id of a config; gpt-oss is far below (vocabulary 201,088)
MAX_LAYERS = 1024  # gpt-oss-120b has 36; bounds every per-layer loop before the tensors are looked at
INT_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
              "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size", "sliding_window",
              "max_position_embeddings", "initial_context_length", "bos_token_id", "eos_token_id", "pad_token_id")
FLOAT_FIELDS = ("rope_theta", "swiglu_limit", "swiglu_alpha", "rms_norm_eps", "yarn.factor", "yarn.beta_fast",
                "yarn.beta_slow")
POSITIVE_FLOATS = ("rope_theta", "swiglu_limit", "rms_norm_eps", "yarn.factor", "yarn.beta_fast", "yarn.beta_slow")


def _int(v: Any) -> int:
    """An integer field of a config file: an int, or a float with an integral value (1.5, true, "24" are refused)."""
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


def _integer_fields(d: Any, where: str) -> None:
    """Integer fields of a config file that hold something else, named in one line (before any is converted)."""
    if not isinstance(d, dict):
        return
    for key in (*INT_FIELDS, "num_experts", "experts_per_token"):
        v = d.get(key)
        if key in d and (v is not None or key == "sliding_window") and not isinstance(v, list):  # eos may be a list
            try:
                _int(v)
            except ValueError:
                raise EdgecError(f"{where}: {key} must be an integer, got {v!r}") from None


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling as the checkpoint states it (`rope_scaling` / `rope_parameters`)."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False


@dataclass(frozen=True)
class GptOssConfig:
    """Architecture hyper-parameters of a gpt-oss model (HF `config.json` names)."""

    num_hidden_layers: int = 24
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    vocab_size: int = HARMONY_VOCAB
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    yarn: Yarn = field(default_factory=Yarn)
    max_position_embeddings: int = 131072
    initial_context_length: int = 4096
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 199998
    eos_token_id: int = 200002
    pad_token_id: int = 199999

    def __post_init__(self) -> None:
        """Every config edgec builds (config.json, original/config.json, edgec.json, presets) is checked here."""
        if bad := self._bad_fields():
            raise EdgecError("; ".join(bad))
        if not self.layer_types:
            types = tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                          for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        if bad := self._bad_shapes():
            raise EdgecError("; ".join(bad))

    def _bad_fields(self) -> list[str]:
        """Types and ranges of the fields (before anything is sized from them)."""
        out = []
        for f in INT_FIELDS:
            v, low = getattr(self, f), 0 if f.endswith("token_id") else 1
            if type(v) is not int or not low <= v <= MAX_SIZE:
                out.append(f"{f} must be at least {low} and at most {MAX_SIZE}, got {v!r}")
        if not out and self.num_hidden_layers > MAX_LAYERS:
            out.append(f"num_hidden_layers {self.num_hidden_layers} is more than edgec supports ({MAX_LAYERS})")
        for f in FLOAT_FIELDS:
            v = getattr(self, f) if "." not in f else getattr(self.yarn, f.split(".")[1])
            if type(v) not in (int, float) or not math.isfinite(v) or (f in POSITIVE_FLOATS and v <= 0):
                out.append(f"{f} must be a finite{' positive' if f in POSITIVE_FLOATS else ''} number, got {v!r}")
        if type(self.yarn.original_max_position_embeddings) is not int or \
                not 1 <= self.yarn.original_max_position_embeddings <= MAX_SIZE:
            out.append(f"rope_scaling.original_max_position_embeddings must be an integer from 1 to {MAX_SIZE}")
        if not out and self.rope_theta <= 1:  # RoPE's frequencies are powers of it (and YaRN divides by its log)
            out.append(f"rope_theta must be greater than 1, got {self.rope_theta!r}")
        if not isinstance(self.layer_types, tuple) or not all(isinstance(t, str) for t in self.layer_types):
            out.append("layer_types must be a list of strings")
        return out

    def _bad_shapes(self) -> list[str]:
        """Relations between the fields."""
        out = []
        if len(self.layer_types) != self.num_hidden_layers:
            out.append("layer_types must list one type per layer")
        if set(self.layer_types) - {"sliding_attention", "full_attention"}:
            out.append(f"unknown layer types {sorted(set(self.layer_types))}")
        if self.num_attention_heads % self.num_key_value_heads:
            out.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_size % MXFP4_BLOCK or self.intermediate_size % MXFP4_BLOCK:
            out.append(f"hidden_size and intermediate_size must be multiples of {MXFP4_BLOCK} (MXFP4 blocks)")
        if self.head_dim % 2:
            out.append("head_dim must be even (RoPE)")
        if self.num_experts_per_tok > self.num_local_experts:
            out.append("num_experts_per_tok must be between 1 and num_local_experts")
        return out

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    @property
    def full_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_sliding(i)]

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_sliding(i)]

    def params(self) -> dict[str, int]:
        """Parameter counts: total, and active per token (embedding lookup excluded, top-k experts only)."""
        total = sum(t.params for t in hf_tensors(self))
        expert = sum(t.params for t in hf_tensors(self) if t.kind.startswith("expert"))
        embed = self.vocab_size * self.hidden_size
        inactive = expert * (self.num_local_experts - self.num_experts_per_tok) // self.num_local_experts
        return {"total": total, "active": total - embed - inactive, "experts": expert}

    # ---- (de)serialisation ---------------------------------------------------------------------------
    @classmethod
    def checked(cls, where: str, **kw: Any) -> GptOssConfig:
        """cls(**kw), its problems reported as one line naming `where`."""
        try:
            return cls(**kw)
        except EdgecError as e:
            raise EdgecError(f"{where}: {e}") from None
        except TypeError as e:  # an unknown field (edgec.json written by another version)
            raise EdgecError(f"{where}: malformed config ({e})") from None

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> GptOssConfig:
        """Read an HF `config.json` dict (either `rope_scaling` or `rope_parameters` spelling)."""
        if d.get("model_type") != "gpt_oss":
            arch = d.get("architectures") or d.get("model_type") or "unknown"
            raise EdgecError(f"{where}: not a gpt-oss checkpoint (model_type={d.get('model_type')!r}, "
                             f"architectures={arch!r}); edgec converts GptOssForCausalLM only")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        _integer_fields(d, where)
        try:
            yarn = Yarn(
                factor=float(rope.get("factor", 32.0)),
                beta_fast=float(rope.get("beta_fast", 32.0)),
                beta_slow=float(rope.get("beta_slow", 1.0)),
                original_max_position_embeddings=_int(rope.get("original_max_position_embeddings", 4096)),
                truncate=bool(rope.get("truncate", False)),
            )
            theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
            eos = d.get("eos_token_id", 200002)
            if isinstance(eos, list):
                if not eos:
                    raise ValueError("eos_token_id is an empty list")
                eos = eos[0]
            heads = _int(d["num_attention_heads"])
            kw = dict(
                num_hidden_layers=_int(d["num_hidden_layers"]),
                hidden_size=_int(d["hidden_size"]),
                intermediate_size=_int(d["intermediate_size"]),
                head_dim=_int(d.get("head_dim") or (_int(d["hidden_size"]) // heads if heads > 0 else 0)),
                num_attention_heads=heads,
                num_key_value_heads=_int(d["num_key_value_heads"]),
                num_local_experts=_int(d.get("num_local_experts", d.get("num_experts", 0))),
                num_experts_per_tok=_int(d.get("num_experts_per_tok", d.get("experts_per_token", 4))),
                vocab_size=_int(d["vocab_size"]),
                sliding_window=_int(d.get("sliding_window", 128)),
                layer_types=tuple(d.get("layer_types") or ()),
                rope_theta=float(theta),
                yarn=yarn,
                max_position_embeddings=_int(d.get("max_position_embeddings", 131072)),
                initial_context_length=_int(d.get("initial_context_length", 4096)),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
                swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                bos_token_id=_int(d.get("bos_token_id") or 199998),
                eos_token_id=_int(eos),
                pad_token_id=_int(d.get("pad_token_id") or 199999),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise EdgecError(f"{where}: malformed gpt-oss config ({type(e).__name__}: {e})") from None
        return cls.checked(where, **kw)

    @classmethod
    def from_original(cls, d: dict[str, Any], where: str = "original/config.json") -> GptOssConfig:
        """Read OpenAI's `original/config.json` (num_experts, experts_per_token, rope_ntk_*)."""
        _integer_fields(d, where)
        try:
            kw = dict(
                num_hidden_layers=_int(d["num_hidden_layers"]),
                hidden_size=_int(d["hidden_size"]),
                intermediate_size=_int(d["intermediate_size"]),
                head_dim=_int(d.get("head_dim", 64)),
                num_attention_heads=_int(d["num_attention_heads"]),
                num_key_value_heads=_int(d["num_key_value_heads"]),
                num_local_experts=_int(d["num_experts"]),
                num_experts_per_tok=_int(d["experts_per_token"]),
                vocab_size=_int(d["vocab_size"]),
                sliding_window=_int(d.get("sliding_window", 128)),
                rope_theta=float(d.get("rope_theta", 150000.0)),
                yarn=Yarn(
                    factor=float(d.get("rope_scaling_factor", 32.0)),
                    beta_fast=float(d.get("rope_ntk_beta", 32.0)),
                    beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
                    original_max_position_embeddings=_int(d.get("initial_context_length", 4096)),
                    truncate=False,
                ),
                initial_context_length=_int(d.get("initial_context_length", 4096)),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise EdgecError(f"{where}: malformed gpt-oss original config ({type(e).__name__}: {e})") from None
        return cls.checked(where, **kw)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` a published gpt-oss checkpoint carries (key order as published)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "experts_per_token": self.num_experts_per_tok,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "quantization_config": {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.yarn.beta_fast,
                "beta_slow": self.yarn.beta_slow,
                "factor": self.yarn.factor,
                "original_max_position_embeddings": self.yarn.original_max_position_embeddings,
                "rope_type": "yarn",
                "truncate": self.yarn.truncate,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "transformers_version": "4.55.0.dev0",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original(self) -> dict[str, Any]:
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.yarn.factor,
            "rope_ntk_alpha": self.yarn.beta_slow,
            "rope_ntk_beta": self.yarn.beta_fast,
        }

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "edgec.json") -> GptOssConfig:
        """Inverse of `as_dict` (the config an edgec.json manifest records), checked."""
        if not isinstance(d, dict) or not isinstance(d.get("yarn", {}), dict):
            raise EdgecError(f"{where}: malformed config in manifest (expected a JSON object)")
        try:
            yarn = Yarn(**d.get("yarn", {}))
        except TypeError as e:
            raise EdgecError(f"{where}: malformed config in manifest ({e})") from None
        types = d.get("layer_types", ())
        return cls.checked(where, **{**d, "yarn": yarn, "layer_types": tuple(types) if isinstance(types, list)
                                     else types})

    def with_(self, **kw: Any) -> GptOssConfig:
        return replace(self, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # embedded default: tiny but with the real vocabulary, so Harmony chat works end to end
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=8,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4),
    "small": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=8,
                  num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=4),
    "20b": dict(num_hidden_layers=24, num_local_experts=32),
    "120b": dict(num_hidden_layers=36, num_local_experts=128),
}


def family(cfg: GptOssConfig) -> str | None:
    """`gpt-oss-20b` / `gpt-oss-120b` for a config with that model's per-layer shape (a layer slice included), else
    None."""
    for name in ("20b", "120b"):
        ref = preset(name)
        if all(getattr(cfg, k) == getattr(ref, k) for k in ("hidden_size", "intermediate_size", "num_local_experts",
                                                    "num_experts_per_tok", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim", "vocab_size")):
            return f"gpt-oss-{name}"
    return None


def preset(name: str, **overrides: Any) -> GptOssConfig:
    if name not in PRESETS:
        raise EdgecError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    kw = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    kw.pop("layer_types", None)
    return GptOssConfig.checked(f"preset {name}", **kw)


# ---- tensors -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: name, safetensors dtype, shape, class (for target profiles) and layer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    layer: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZE[self.dtype]

    @property
    def params(self) -> int:
        if self.kind == "expert_scales":
            return 0
        if self.kind == "expert_blocks":
            return math.prod(self.shape) * 2  # two FP4 codes per byte
        return math.prod(self.shape)


EXPERT_LAYOUTS = ("mxfp4", "BF16", "F16", "F32")  # experts as MXFP4 blocks + scales, or dense 16/32-bit


def hf_tensors(cfg: GptOssConfig, experts: str = "mxfp4") -> list[TensorSpec]:
    """Every tensor of the HF layout, in model order. `experts`: "mxfp4" (the published layout, `_blocks` [E, out,
    in/32, 16] + `_scales` [E, out, in/32]) or a dtype of the dense layout transformers saves for a dequantized or
    fine-tuned model (`gate_up_proj` [E, hidden, 2*inter] with gate/up columns interleaved as the blocks' rows,
    `down_proj` [E, inter, hidden]: [E, in, out], the transpose of the blocks' rows; biases in the same dtype)."""
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size  # noqa: E741
    G = H // MXFP4_BLOCK
    out = [TensorSpec("model.embed_tokens.weight", "BF16", (V, H), "embed")]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."

        def t(name: str, dtype: str, shape: tuple[int, ...], kind: str, p: str = p, n: int = n) -> None:
            out.append(TensorSpec(p + name, dtype, shape, kind, n))

        t("input_layernorm.weight", "BF16", (H,), "norm")
        t("self_attn.q_proj.weight", "BF16", (cfg.q_dim, H), "attn")
        t("self_attn.q_proj.bias", "BF16", (cfg.q_dim,), "attn_bias")
        t("self_attn.k_proj.weight", "BF16", (cfg.kv_dim, H), "attn")
        t("self_attn.k_proj.bias", "BF16", (cfg.kv_dim,), "attn_bias")
        t("self_attn.v_proj.weight", "BF16", (cfg.kv_dim, H), "attn")
        t("self_attn.v_proj.bias", "BF16", (cfg.kv_dim,), "attn_bias")
        t("self_attn.o_proj.weight", "BF16", (H, cfg.q_dim), "attn")
        t("self_attn.o_proj.bias", "BF16", (H,), "attn_bias")
        t("self_attn.sinks", "BF16", (cfg.num_attention_heads,), "sinks")
        t("post_attention_layernorm.weight", "BF16", (H,), "norm")
        t("mlp.router.weight", "BF16", (E, H), "router")
        t("mlp.router.bias", "BF16", (E,), "router")
        if experts == "mxfp4":
            t("mlp.experts.gate_up_proj_blocks", "U8", (E, 2 * I, G, 16), "expert_blocks")
            t("mlp.experts.gate_up_proj_scales", "U8", (E, 2 * I, G), "expert_scales")
            t("mlp.experts.gate_up_proj_bias", "BF16", (E, 2 * I), "expert_bias")
            t("mlp.experts.down_proj_blocks", "U8", (E, H, I // MXFP4_BLOCK, 16), "expert_blocks")
            t("mlp.experts.down_proj_scales", "U8", (E, H, I // MXFP4_BLOCK), "expert_scales")
            t("mlp.experts.down_proj_bias", "BF16", (E, H), "expert_bias")
        else:
            t("mlp.experts.gate_up_proj", experts, (E, H, 2 * I), "expert_dense")
            t("mlp.experts.gate_up_proj_bias", experts, (E, 2 * I), "expert_bias")
            t("mlp.experts.down_proj", experts, (E, I, H), "expert_dense")
            t("mlp.experts.down_proj_bias", experts, (E, H), "expert_bias")
    out.append(TensorSpec("model.norm.weight", "BF16", (H,), "norm"))
    out.append(TensorSpec("lm_head.weight", "BF16", (V, H), "lm_head"))
    return out


# HF name suffix -> original name suffix, for tensors that are stored 1:1
_ORIG_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_ORIG_GLOBAL = {"model.embed_tokens.weight": "embedding.weight", "model.norm.weight": "norm.scale",
                "lm_head.weight": "unembedding.weight"}


def original_sources(cfg: GptOssConfig) -> dict[str, tuple[str, slice | None]]:
    """HF tensor name -> (original tensor name, row slice of it or None)."""
    q, kv = cfg.q_dim, cfg.kv_dim
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    out: dict[str, tuple[str, slice | None]] = {k: (v, None) for k, v in _ORIG_GLOBAL.items()}
    for n in range(cfg.num_hidden_layers):
        for suffix, orig in _ORIG_LAYER.items():
            out[f"model.layers.{n}.{suffix}"] = (f"block.{n}.{orig}", None)
        for x, sl in rows.items():
            out[f"model.layers.{n}.self_attn.{x}_proj.weight"] = (f"block.{n}.attn.qkv.weight", sl)
            out[f"model.layers.{n}.self_attn.{x}_proj.bias"] = (f"block.{n}.attn.qkv.bias", sl)
    return out


def original_tensors(cfg: GptOssConfig) -> list[TensorSpec]:
    """Every tensor of OpenAI's `original/` layout, in model order."""
    by_hf = {t.name: t for t in hf_tensors(cfg)}
    out: list[TensorSpec] = []
    seen: set[str] = set()
    for hf_name, (orig, sl) in original_sources(cfg).items():
        if orig in seen:
            continue
        seen.add(orig)
        t = by_hf[hf_name]
        if sl is not None:  # fused qkv
            fused = cfg.q_dim + 2 * cfg.kv_dim
            shape = (fused, cfg.hidden_size) if orig.endswith("weight") else (fused,)
            out.append(TensorSpec(orig, "BF16", shape, "attn" if orig.endswith("weight") else "attn_bias", t.layer))
        else:
            out.append(TensorSpec(orig, t.dtype, t.shape, t.kind, t.layer))
    order = {t.name: i for i, t in enumerate(hf_tensors(cfg))}
    hf_of = {}
    for hf_name, (orig, _) in original_sources(cfg).items():
        hf_of.setdefault(orig, hf_name)
    return sorted(out, key=lambda t: order[hf_of[t.name]])


def check_token_ids(ids: Iterable[int], vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary: one line naming the first."""
    if (bad := next((int(t) for t in ids if not 0 <= t < vocab_size), None)) is not None:
        raise EdgecError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
