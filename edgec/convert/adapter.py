"""PEFT LoRA adapters merged into the weights as they are read: W + scale * B @ A, in float32, before any
quantization (the one adapter merge; `Checkpoint.raw`/`f32`/`experts` apply it).

An adapter folder is PEFT's `adapter_config.json` + `adapter_model.safetensors` (a pickled `.bin` is refused).
- Linear modules (`target_modules`: q/k/v/o_proj, the router `mlp.router`): lora_A [r, in], lora_B [out, r],
  the delta [out, in] is the HF weight's layout.
- Experts (`target_parameters`: `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), PEFT's `ParamWrapper` on
  transformers' GptOssExperts (`is_transposed=True`, parameter [E, in, out]): lora_A [r*E, in] read as [E, r, in],
  lora_B [out, r*E] read as [out, r, E] (note the two orders), and expert e's delta in [out, in] (the MXFP4 layout)
  is B[:, :, e] @ A[e]. Two parameters of one module nest (`experts.base_layer.lora_A` ...); which parameter a
  pair adapts is told by its shapes.
- Scale: lora_alpha / r (use_rslora: lora_alpha / sqrt(r)), or the one given (`--adapter-scale`).
Anything else PEFT can express (DoRA, rank/alpha patterns, LoRA biases, modules_to_save, ...) is refused in one
line, as are modules the model lacks, shapes that do not fit it, and non-finite values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgecError
from ..fsutil import sha256_file
from ..jsonio import load_json
from ..safetensors_io import SafetensorsFile, bf16_to_f32
from ..spec import GptOssConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEAR = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "router": "mlp"}
EXPERTS = ("gate_up_proj", "down_proj")
# fields PEFT writes whose non-default value changes the merge and is not implemented here: (field, default)
UNSUPPORTED = (("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False),
               ("fan_in_fan_out", False), ("modules_to_save", None), ("trainable_token_indices", None),
               ("layer_replication", None), ("use_qalora", False), ("alora_invocation_tokens", None),
               ("use_bdlora", None))


@dataclass
class Adapter:
    path: Path
    sha256: str  # of adapter_model.safetensors
    scale: float
    config_sha256: str = ""  # of adapter_config.json
    linear: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # HF weight name -> (A, B)
    experts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # HF parameter -> (A, B)

    def record(self) -> dict[str, object]:
        """What the manifest keeps of it (parity re-applies it to the source from this)."""
        return {"name": self.path.name, "path": str(self.path.resolve()), "sha256": self.sha256,
                "config_sha256": self.config_sha256, "scale": self.scale,
                "modules": len(self.linear) + len(self.experts)}


def load_adapters(folders: list, config: GptOssConfig, scales: list[float] | None = None) -> list[Adapter]:
    """`convert --adapter DIR ... [--adapter-scale X ...]`: no scale (each adapter's lora_alpha / r) or one each."""
    scales = list(scales or [])
    if scales and len(scales) != len(folders):
        raise EdgecError(f"--adapter-scale given {len(scales)} time(s) for {len(folders)} --adapter folder(s): give "
                         "none (lora_alpha / r each) or one per adapter, in the same order")
    return [load_adapter(f, config, scales[i] if scales else None) for i, f in enumerate(folders)]


def recorded_adapters(records: list[dict], config: GptOssConfig, where: str,
                      folders: list | None = None) -> list[Adapter]:
    """The adapters a manifest lists, read again from their recorded path (or from `folders`, in the same order)
    with the recorded scale; each must be the very adapter merged (sha256 of its weights and config)."""
    if folders and len(folders) != len(records):
        raise EdgecError(f"{where}: records {len(records)} adapter(s), --adapter given {len(folders)} time(s)")
    out = []
    for i, rec in enumerate(records):
        folder = Path(folders[i]) if folders else Path(rec["path"])
        if not folder.is_dir():
            raise EdgecError(f"{where}: adapter {rec['name']}: {folder} is gone (pass its folder with --adapter DIR)")
        ad = load_adapter(folder, config, float(rec["scale"]))
        if (ad.sha256, ad.config_sha256) != (rec["sha256"], rec.get("config_sha256", ad.config_sha256)):
            raise EdgecError(f"{folder}: not the adapter {rec['name']} this output merged (sha256 differs from "
                             f"{where})")
        out.append(ad)
    return out


def load_adapter(folder: str | Path, config: GptOssConfig, scale: float | None = None) -> Adapter:
    """Read and check one adapter folder against the model's config."""
    root = Path(folder)
    cfg_path, st_path = root / CONFIG, root / WEIGHTS
    if not cfg_path.is_file():
        raise EdgecError(f"{root}: not a PEFT adapter folder (no {CONFIG})")
    if not st_path.is_file():
        pickled = (root / "adapter_model.bin").is_file()
        raise EdgecError(f"{root}: no {WEIGHTS}" + (" (adapter_model.bin is a pickle, never loaded: re-save it "
                                                   "with safe_serialization=True)" if pickled else ""))
    c = load_json(cfg_path)
    if c.get("peft_type", "LORA") != "LORA":
        raise EdgecError(f"{cfg_path}: peft_type {c.get('peft_type')!r}: only LORA adapters merge")
    for key, default in UNSUPPORTED:
        if c.get(key, default) not in (default, None, {}, [], False):
            raise EdgecError(f"{cfg_path}: {key} {c[key]!r} is not supported")
    r, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise EdgecError(f"{cfg_path}: r must be a positive integer and lora_alpha a number")
    if scale is None:
        scale = alpha / (math.sqrt(r) if c.get("use_rslora") else r)
    ad = Adapter(root, sha256_file(st_path), float(scale), sha256_file(cfg_path))
    tensors = _read(st_path)
    for key in sorted(k for k in tensors if ".lora_A." in k):
        a, b = tensors.pop(key), tensors.pop(key.replace(".lora_A.", ".lora_B."), None)
        where = f"{st_path}: tensor {key}"
        if b is None:
            raise EdgecError(f"{where}: no matching lora_B")
        module = key[len(PREFIX):].split(".lora_A.")[0] if key.startswith(PREFIX) else key
        if module.endswith(".mlp.experts") or module.endswith(".mlp.experts.base_layer"):
            _add_experts(ad, config, module.split(".mlp.experts")[0], a, b, r, where)
        else:
            _add_linear(ad, config, module, a, b, r, where)
    if tensors:
        raise EdgecError(f"{st_path}: tensor {sorted(tensors)[0]}: not a LoRA A/B pair of a module edgec merges")
    return ad


def _read(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    try:
        out = {}
        for name, e in f.entries.items():
            raw = f.raw(name)
            if e["dtype"] not in ("F32", "BF16", "F16"):
                raise EdgecError(f"{path}: tensor {name}: dtype {e['dtype']}, expected F32, BF16 or F16")
            v = bf16_to_f32(raw) if e["dtype"] == "BF16" else raw.astype(np.float32)
            if not np.isfinite(v).all():
                raise EdgecError(f"{path}: tensor {name}: {int(np.count_nonzero(~np.isfinite(v)))} non-finite values")
            out[name] = v
        return out
    finally:
        f.close()


def _layer(config: GptOssConfig, prefix: str, where: str) -> int:
    parts = prefix.split(".")
    if len(parts) != 3 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() \
            or int(parts[2]) >= config.num_hidden_layers:
        raise EdgecError(f"{where}: the model has no module {prefix!r}")
    return int(parts[2])


def _add_linear(ad: Adapter, config: GptOssConfig, module: str, a: np.ndarray, b: np.ndarray, r: int,
                where: str) -> None:
    prefix, _, leaf = module.rpartition(".")
    block = prefix.rpartition(".")[2]
    if LINEAR.get(leaf) != block:
        raise EdgecError(f"{where}: the model has no linear module {module!r} edgec merges "
                         f"({', '.join(sorted(LINEAR))})")
    _layer(config, prefix.rpartition(".")[0], where)
    out_dim, in_dim = _linear_shape(config, leaf)
    if a.shape != (r, in_dim) or b.shape != (out_dim, r):
        raise EdgecError(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit {module} "
                         f"[{out_dim}, {in_dim}] with r {r}")
    ad.linear[module + ".weight"] = (a, b)


def _linear_shape(config: GptOssConfig, leaf: str) -> tuple[int, int]:
    h = config.hidden_size
    return {"q_proj": (config.q_dim, h), "k_proj": (config.kv_dim, h), "v_proj": (config.kv_dim, h),
            "o_proj": (h, config.q_dim), "router": (config.num_local_experts, h)}[leaf]


def _add_experts(ad: Adapter, config: GptOssConfig, prefix: str, a: np.ndarray, b: np.ndarray, r: int,
                 where: str) -> None:
    _layer(config, prefix, where)
    e, h, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    fits = [w for w, (o, i) in (("gate_up_proj", (2 * inter, h)), ("down_proj", (h, inter)))
            if a.shape == (r * e, i) and b.shape == (o, r * e)]
    if not fits:
        raise EdgecError(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} fit neither expert parameter "
                         f"of {prefix}.mlp.experts (E {e}, r {r})")
    name = f"{prefix}.mlp.experts.{fits[0]}"
    if name in ad.experts:
        raise EdgecError(f"{where}: a second LoRA for {name}")
    ad.experts[name] = (a.reshape(e, r, a.shape[1]), b.reshape(b.shape[0], r, e))


def linear_delta(adapters: list[Adapter], name: str) -> np.ndarray | None:
    """The summed float32 delta [out, in] of an HF linear weight, or None when no adapter touches it."""
    parts = [ad.scale * (b @ a) for ad in adapters if (ab := ad.linear.get(name)) for a, b in [ab]]
    return sum(parts[1:], parts[0]) if parts else None


def expert_delta(adapters: list[Adapter], param: str, expert: int) -> np.ndarray | None:
    """The summed float32 delta [out, in] of one expert of `...mlp.experts.gate_up_proj`/`down_proj`, or None."""
    parts = [ad.scale * (b[:, :, expert] @ a[expert]) for ad in adapters if (ab := ad.experts.get(param))
             for a, b in [ab]]
    return sum(parts[1:], parts[0]) if parts else None
