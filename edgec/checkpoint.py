"""Streaming, validating reader for gpt-oss checkpoints in the HF layout or OpenAI's `original/` layout.

`Checkpoint.open(path)` validates every shard header against the spec before any work and raises an
`EdgecError` naming the file and tensor of the first problem. Tensors are then read one at a time through a
memory map, always by their HF name (the original layout's fused qkv is split by row views).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mxfp4
from .errors import EdgecError
from .jsonio import load_json
from .safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16
from .spec import EXPERT_LAYOUTS, GptOssConfig, TensorSpec, hf_tensors, original_sources, original_tensors

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
LAYER = re.compile(r"(?:model\.layers|block)\.(\d+)\.")
SCAN_CHUNK = 1 << 24  # values per step of the non-finite scan (bounded memory)


def _safe_member(root: Path, name: str, where: str) -> Path:
    """A file named by an index, refusing names that leave `root`. The file itself may be a symlink: the Hugging Face
    cache links every file of a snapshot into its blobs/ folder."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
        raise EdgecError(f"{where}: shard path {name!r} escapes the checkpoint folder")
    return root / p



def nonfinite_line(path: Path | str, name: str, count: int) -> str:
    """The one line that reports a tensor's non-finite values (inspect, convert)."""
    return f"{path}: tensor {name}: {count} non-finite values (NaN/Inf)"

@dataclass
class Checkpoint:
    """An opened, validated checkpoint. Read tensors with `raw`, `f32` or `experts`.

    `experts_layout` is "mxfp4" (published) or the dtype of dense experts ("BF16", "F16", "F32": a fine-tune saved
    by transformers). Converters always see the MXFP4 layout (`specs`): for dense experts `raw(..._blocks)` and
    `raw(..._scales)` quantize one layer's tensor at a time (`convert.quantize`, per expert) and record the error
    in `quant_error`; `experts` and `f32` (the reference) read the dense values themselves.

    `adapters` (convert.adapter, set after opening) are merged as each tensor is read, in float32: `f32` and
    `experts` add the LoRA deltas, `raw` rounds an adapted linear weight to BF16 and requantizes the experts of an
    adapted MXFP4 parameter like dense ones (their error recorded too). Nothing else reads the weights, so every
    target and the reference see the merged model."""

    path: Path
    layout: str  # "hf" or "original"
    config: GptOssConfig
    files: dict[str, SafetensorsFile] = field(default_factory=dict)
    location: dict[str, str] = field(default_factory=dict)  # stored tensor name -> file name
    _sources: dict[str, tuple[str, slice | None]] = field(default_factory=dict)
    experts_layout: str = "mxfp4"
    quant_error: dict[str, list[float]] = field(default_factory=dict)  # "gate_up_proj"/"down_proj" -> per expert
    _quantized: dict[str, np.ndarray] = field(default_factory=dict)  # the last tensor pair quantized
    _measured: set[str] = field(default_factory=set)
    adapters: list = field(default_factory=list)  # convert.adapter.Adapter: LoRA deltas added as tensors are read

    # ---- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, check_scales: bool = True) -> Checkpoint:
        ckpt = cls.scan(path)
        problems = ckpt.problems(check_scales=check_scales)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise EdgecError(problems[0] + more)
        return ckpt

    @classmethod
    def scan(cls, path: str | Path) -> Checkpoint:
        """Read config and shard headers; raise only for problems that stop all inspection."""
        root = Path(path)
        if not root.exists():
            raise EdgecError(f"{root}: no such checkpoint folder")
        if not root.is_dir():
            raise EdgecError(f"{root}: expected a checkpoint folder (config.json + *.safetensors), got a file")
        cfg_path = root / "config.json"
        if not cfg_path.exists():
            raise EdgecError(f"{cfg_path}: file not found (not a checkpoint folder)")
        raw_cfg = load_json(cfg_path)
        if "model_type" not in raw_cfg and "num_experts" in raw_cfg and "experts_per_token" in raw_cfg:
            layout, config = "original", GptOssConfig.from_original(raw_cfg, str(cfg_path))
        else:
            layout, config = "hf", GptOssConfig.from_hf(raw_cfg, str(cfg_path))
        ckpt = cls(root, layout, config)
        index = root / INDEX
        if index.exists():
            wm = load_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise EdgecError(f"{index}: missing or empty weight_map")
            if not all(isinstance(n, str) for n in wm.values()):
                raise EdgecError(f"{index}: weight_map values must be file names")
            names = sorted(set(wm.values()))
            for n in names:
                _safe_member(root, n, str(index))
        else:
            names = sorted(p.name for p in root.glob("*.safetensors"))
            if not names:
                raise EdgecError(f"{root}: no *.safetensors shards and no {INDEX}")
        for n in names:
            f = SafetensorsFile(root / n)
            ckpt.files[n] = f
            for t in f.entries:
                if t in ckpt.location:
                    raise EdgecError(f"{root / n}: tensor {t}: also stored in {ckpt.location[t]}")
                ckpt.location[t] = n
        if index.exists():
            for t, n in load_json(index)["weight_map"].items():
                if t not in ckpt.files[n].entries:
                    raise EdgecError(f"{root / n}: tensor {t}: named in {INDEX} but not in this shard")
        stored = len({int(m.group(1)) for t in ckpt.location if (m := LAYER.match(t))})
        if config.num_hidden_layers > stored:  # checked before anything is sized from the config
            raise EdgecError(f"{cfg_path}: num_hidden_layers is {config.num_hidden_layers}, but the shards hold "
                             f"tensors of {stored} layer(s)")
        if layout == "hf":
            dense = ckpt.location.get("model.layers.0.mlp.experts.gate_up_proj")
            if dense is not None:
                dt = ckpt.files[dense].entries["model.layers.0.mlp.experts.gate_up_proj"]["dtype"]
                ckpt.experts_layout = dt if dt in EXPERT_LAYOUTS else "BF16"  # another dtype: `problems` names it
            ckpt._sources = {t.name: (t.name, None) for t in hf_tensors(config, ckpt.experts_layout)}
        else:
            ckpt._sources = original_sources(config)
        return ckpt

    def expected(self) -> list[TensorSpec]:
        return hf_tensors(self.config, self.experts_layout) if self.layout == "hf" else original_tensors(self.config)

    def problems(self, check_scales: bool = True) -> list[str]:
        """Every mismatch between the stored tensors and the spec, one line each (file and tensor named)."""
        out = []
        expected = {t.name: t for t in self.expected()}
        for name, t in expected.items():
            fname = self.location.get(name)
            if fname is None:
                out.append(f"{self.path}: tensor {name}: missing (expected {t.dtype} {list(t.shape)})")
                continue
            e = self.files[fname].entries[name]
            where = f"{self.path / fname}: tensor {name}"
            if e["dtype"] != t.dtype:
                out.append(f"{where}: dtype {e['dtype']}, expected {t.dtype}")
            elif tuple(e["shape"]) != t.shape:
                out.append(f"{where}: shape {list(e['shape'])}, expected {list(t.shape)}")
            elif check_scales and t.kind == "expert_scales":
                try:
                    mxfp4.check_scales(self.files[fname].raw(name), where)
                except EdgecError as err:
                    out.append(str(err))
        for name, fname in self.location.items():
            if name not in expected:
                out.append(f"{self.path / fname}: tensor {name}: unexpected tensor, not part of gpt-oss "
                           f"({self.layout} layout)")
        return out

    # ---- reading ------------------------------------------------------------------------------------------
    def specs(self) -> list[TensorSpec]:
        """The HF-named tensors this checkpoint provides, in model order."""
        return hf_tensors(self.config)

    def stored(self, name: str) -> np.ndarray:
        """Zero-copy view of an HF-named tensor as stored (BF16 as uint16, F16/F32 as such, MXFP4 parts as uint8)."""
        stored, rows = self._sources[name]
        arr = self.files[self.location[stored]].raw(stored)
        return arr if rows is None else arr[rows]

    def raw(self, name: str) -> np.ndarray:
        """An HF-named tensor of the MXFP4 layout (`specs`): a zero-copy view (BF16 as uint16, MXFP4 parts as uint8);
        for dense experts the blocks/scales quantized here and F16/F32 expert biases rounded to BF16."""
        if name.endswith(("_proj_blocks", "_proj_scales")) and (
                self.experts_layout != "mxfp4" or self._adapted(name.rsplit("_", 1)[0])):
            return self._quantize(name)
        if any(name in ad.linear for ad in self.adapters):
            return f32_to_bf16(self.f32(name))
        arr = self.stored(name)
        return f32_to_bf16(arr.astype(np.float32)) if arr.dtype in (np.float16, np.float32) else arr

    def _quantize(self, name: str) -> np.ndarray:
        from .convert.quantize import quantize_mxfp4, relative_error

        base, part = name.rsplit("_", 1)
        if name not in self._quantized:
            self._quantized.clear()
            layer, which = int(LAYER.match(base).group(1)), base.rsplit(".", 1)[1]
            n_exp = self.config.num_local_experts
            n, k = self.raw_shape(base)
            blocks = np.empty((n_exp, n, k // 32, 16), np.uint8)
            scales = np.empty((n_exp, n, k // 32), np.uint8)
            errs = []
            for e in range(n_exp):
                w = self.experts(layer, which, [e])[0]  # [out, in], float32, adapters merged
                blocks[e], scales[e] = quantize_mxfp4(w)
                errs.append(float(relative_error(w, blocks[e], scales[e])))
                if n * k * 2 >= SCAN_CHUNK:  # one expert's pages resident at a time
                    self.release_pages()
            self._quantized = {base + "_blocks": blocks, base + "_scales": scales}
            if base not in self._measured:  # a tensor read again is counted once
                self._measured.add(base)
                self.quant_error.setdefault(base.rsplit(".", 1)[1], []).extend(errs)
        return self._quantized[name]

    def raw_shape(self, base: str) -> tuple[int, int]:
        """(out, in) of one expert of `...mlp.experts.gate_up_proj`/`down_proj`."""
        h, inter = self.config.hidden_size, self.config.intermediate_size
        return (2 * inter, h) if base.endswith("gate_up_proj") else (h, inter)

    def _adapted(self, base: str) -> bool:
        return any(base in ad.experts for ad in self.adapters)

    @staticmethod
    def _dense_f32(a: np.ndarray) -> np.ndarray:
        return bf16_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32)

    def f32(self, name: str) -> np.ndarray:
        """A BF16 (or dense-expert F16/F32) tensor as float32 (a copy), adapters' LoRA deltas added."""
        from .convert.adapter import linear_delta

        w = self._dense_f32(self.stored(name))
        d = linear_delta(self.adapters, name) if self.adapters else None
        return w if d is None else w + d

    def experts(self, layer: int, which: str, experts: list[int] | np.ndarray) -> np.ndarray:
        """Only the given experts of `gate_up_proj` or `down_proj` as float32 [len, out, in]: MXFP4 decoded, or the
        dense 16-bit values themselves (transposed from [E, in, out]); adapters' expert deltas added."""
        from .convert.adapter import expert_delta

        p = f"model.layers.{layer}.mlp.experts.{which}"
        idx = np.asarray(experts)
        if self.experts_layout != "mxfp4":
            w = np.ascontiguousarray(self._dense_f32(self.stored(p)[idx]).transpose(0, 2, 1))
        else:
            w = mxfp4.decode(self.stored(p + "_blocks")[idx], self.stored(p + "_scales")[idx])
        for i, e in enumerate(idx.reshape(-1).tolist()):
            if (d := expert_delta(self.adapters, p, e)) is not None:
                w[i] += d
        return w

    def quant_summary(self) -> dict[str, dict[str, float]]:
        """Relative error ||W - Q(W)||_F / ||W||_F per expert matrix, mean and worst per tensor kind, of the dense
        experts quantized so far (empty for MXFP4 sources)."""
        return {k: {"mean": float(np.mean(v)), "worst": float(np.max(v)), "matrices": len(v)}
                for k, v in self.quant_error.items()}

    def nonfinite(self) -> dict[str, int]:
        """Non-finite values per tensor (HF names): BF16 NaN/Inf (exponent bits all ones) and MXFP4 values whose
        block scale overflows float32 (scale bytes 253-255 with large codes). Reads the BF16 tensors and the scales
        in bounded chunks, and only the blocks of suspicious scales; mapped pages are dropped after every chunk of a
        large tensor (a whole 1.2 GB embedding resident at once was most of convert's peak RSS)."""
        out: dict[str, int] = {}
        for t in self.specs() if self.experts_layout == "mxfp4" else hf_tensors(self.config, self.experts_layout):
            if t.dtype == "BF16":
                n = _nonfinite_bf16(self.stored(t.name).reshape(-1), self.release_pages)
            elif t.dtype in ("F16", "F32"):
                flat = self.stored(t.name).reshape(-1)
                n = sum(int(np.count_nonzero(~np.isfinite(flat[i : i + SCAN_CHUNK])))
                        for i in range(0, flat.size, SCAN_CHUNK))
            elif t.kind == "expert_blocks":
                n = _overflowing(self.stored(t.name), self.stored(t.name.replace("_blocks", "_scales")))
            else:
                continue
            if n:
                out[t.name] = n
            if t.nbytes >= SCAN_CHUNK:
                self.release_pages()
        return out

    def tokenizer_problem(self) -> str | None:
        """One line when no tokenizer.json is beside the weights (or above original/), else None."""
        if self.tokenizer_folder() is not None:
            return None
        return (f"{self.path}: no tokenizer.json (nor in the parent folder of original/): chat, generate and parity "
                "need it")

    def source_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

    def config_hash(self) -> str:
        return hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()

    def source_files(self) -> list[Path]:
        """Every file a conversion reads: config, index, shards and tokenizer files."""
        return [self.path / "config.json", self.path / INDEX, *(f.path for f in self.files.values()),
                *self.tokenizer_files()]

    def tokenizer_folder(self) -> Path | None:
        """The folder holding tokenizer.json: the checkpoint's, or for an `original/` folder its parent's."""
        return next((p.parent for p in self.tokenizer_files() if p.name == "tokenizer.json"), None)

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer and generation files present beside the weights (HF root for an `original/` folder)."""
        roots = [self.path] + ([self.path.parent] if self.layout == "original" else [])
        found: dict[str, Path] = {}
        for r in roots:
            for n in TOKENIZER_FILES:
                if n not in found and (r / n).is_file():
                    found[n] = r / n
        return list(found.values())

    def file_range(self, arr: np.ndarray) -> tuple[int, int] | None:
        """(fd, byte offset) of `arr` in its shard if it is a contiguous view returned by `raw`, else None."""
        return next((r for f in self.files.values() if (r := f.file_range(arr)) is not None), None)

    def release_pages(self) -> None:
        """Drop the mapped pages read so far from this process's RSS (streaming converters call it per chunk)."""
        for f in self.files.values():
            f.release_pages()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _nonfinite_bf16(flat: np.ndarray, release=None) -> int:
    """BF16 values with all exponent bits set (NaN/Inf), in chunks: a max per chunk, a count only where one is;
    `release()` (dropping the mapped pages read) after each chunk of a tensor longer than one."""
    buf = np.empty(min(flat.size, SCAN_CHUNK), np.uint16)
    n = 0
    for i in range(0, flat.size, SCAN_CHUNK):
        part = buf[: min(SCAN_CHUNK, flat.size - i)]
        np.bitwise_and(flat[i : i + SCAN_CHUNK], 0x7F80, out=part)
        if part.size and part.max() == 0x7F80:
            n += int(np.count_nonzero(part == 0x7F80))
        if release is not None and flat.size > SCAN_CHUNK:
            release()
    return n


def _overflowing(blocks: np.ndarray, scales: np.ndarray) -> int:
    """MXFP4 values that are not finite in float32: only blocks with a scale byte of 253 or more can overflow
    (6 * 2**126 > float32 max), so those few are decoded and counted."""
    flat = scales.reshape(-1)
    idx = np.concatenate([i + np.flatnonzero(flat[i : i + SCAN_CHUNK] >= 253)
                          for i in range(0, flat.size, SCAN_CHUNK)] or [np.zeros(0, np.int64)])
    if not idx.size:
        return 0
    with np.errstate(all="ignore"):
        vals = mxfp4.decode(blocks.reshape(-1, 1, 16)[idx], flat[idx, None])
    return int(np.count_nonzero(~np.isfinite(vals)))
