"""Synthetic gpt-oss checkpoints that follow the published layout to the byte, at any size.

Weights are random but realistic in scale (bf16 elsewhere) so logits are well spread. MXFP4 experts use codes over
the whole E2M1 table and E8M0 block scales as unkind as trained weights quantized to MXFP4: per-block amax varies
log-normally, so the scale bytes of one row span `scale_spread` binades (default 8; 0 = one scale everywhere), plus
rare outlier blocks 1-3 binades above that; the centre is chosen so each expert matmul keeps unit output scale
(about 2**-10 at full size for the default spread).
Everything streams: tensors are generated in chunks and written straight to disk, so the 20b preset
(~13.8 GB) is written with bounded memory. The same seed gives the same values in both layouts.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from numpy.random import default_rng  # at import, not lazily mid-write (see fsutil.atomic_dir)

from .fsutil import SYNTH_MARKER, atomic_dir
from .safetensors_io import NP_DTYPE, SafetensorsWriter, bf16_to_f32, f32_to_bf16
from .spec import GptOssConfig, TensorSpec, hf_tensors, original_sources, original_tensors

CHUNK_BYTES = 16 << 20
LUT_RMS = math.sqrt(68.5 / 8)  # rms of the E2M1 table over uniformly random codes
SCALE_SPREAD = 8  # default binades spanned by the block scales of one expert row
OUTLIER_RATE = 1 / 1024  # blocks whose scale sits 1-3 binades above the row's normal range

GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
                     "pad_token_id": 199999, "transformers_version": "4.55.0.dev0"}


def _std(cfg: GptOssConfig, t: TensorSpec) -> tuple[float, float]:
    """(mean, std) of a bf16 tensor class."""
    name = t.name
    if t.kind == "norm":
        return 1.0, 0.1
    if t.kind == "embed":
        return 0.0, 1.0
    if t.kind == "lm_head":
        return 0.0, 2.5 / math.sqrt(cfg.hidden_size)
    if t.kind == "sinks":
        return 0.0, 1.0
    if t.kind in ("attn_bias", "expert_bias"):
        return 0.0, 0.1
    if name.endswith("router.bias"):
        return 0.0, 0.5
    if name.endswith("o_proj.weight"):
        return 0.0, 0.5 / math.sqrt(cfg.q_dim)
    return 0.0, 1.5 / math.sqrt(cfg.hidden_size)  # q/k/v and router


def _scale_byte(k: int, spread: int = 0) -> int:
    """E8M0 centre that gives a K-input MXFP4 matmul roughly unit output scale (120 = 2**-7 at K=2880 with one
    scale everywhere; lower for a spread, whose large blocks dominate the output power)."""
    return 127 + round(math.log2(1.0 / (LUT_RMS * math.sqrt(k * _power(spread)))))


def _offsets(spread: int) -> tuple[np.ndarray, np.ndarray]:
    """Binade offsets of the block scales from the centre and their probabilities: a normal with sigma spread/4,
    rounded and clipped to +-spread/2, and the outliers 1-3 binades above the top."""
    h = spread // 2
    if h == 0:
        return np.zeros(1), np.ones(1)
    cdf = [0.5 * (1 + math.erf((j + 0.5) / (spread / 4) / math.sqrt(2))) for j in range(-h, h)]
    p = np.diff([0.0, *cdf, 1.0]) * (1 - OUTLIER_RATE)
    return np.arange(-h, h + 4), np.concatenate([p, np.full(3, OUTLIER_RATE / 3)])


def _power(spread: int) -> float:
    """Mean of 4**offset: how much the spread raises the expert matmul's output power."""
    off, p = _offsets(spread)
    return float((p * 4.0 ** off).sum())


def _scales(rng: np.random.Generator, shape: tuple[int, ...], k: int, spread: int) -> np.ndarray:
    """Scale bytes drawn through a 65536-entry table of the offsets (2 bytes of randomness per byte written)."""
    off, p = _offsets(spread)
    counts = np.round(np.cumsum(p) * 65536).astype(np.int64)
    table = np.repeat((_scale_byte(k, spread) + off).astype(np.uint8), np.diff(counts, prepend=0))
    return table[rng.integers(0, 65536, size=shape, dtype=np.uint16)]


def tensor_chunks(cfg: GptOssConfig, t: TensorSpec, seed: int, spread: int = SCALE_SPREAD) -> Iterator[np.ndarray]:
    """The tensor's values in row chunks, deterministic in (seed, tensor name, chunk)."""
    row_shape = t.shape[1:]
    row_bytes = max(1, t.nbytes // max(t.shape[0], 1))
    rows = max(1, CHUNK_BYTES // row_bytes)
    key = zlib.crc32(t.name.encode())
    for i, s in enumerate(range(0, t.shape[0], rows)):
        n = min(rows, t.shape[0] - s)
        rng = default_rng([seed, key, i])
        shape = (n, *row_shape)
        if t.kind == "expert_blocks":
            yield rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif t.kind == "expert_scales":
            k = cfg.intermediate_size if "down_proj" in t.name else cfg.hidden_size
            yield _scales(rng, shape, k, spread)
        else:
            mean, std = _std(cfg, t)
            yield f32_to_bf16(rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))


def dense_chunks(cfg: GptOssConfig, t: TensorSpec, seed: int, spread: int = SCALE_SPREAD) -> Iterator[np.ndarray]:
    """A dense expert tensor (`experts_dtype` layout): exactly the MXFP4 synth's values, decoded, transposed to
    [E, in, out] and stored in t.dtype (every MXFP4 value is exact in bf16, f32 and, in range, f16)."""
    from . import mxfp4

    mx = {x.name: x for x in hf_tensors(cfg)}
    if t.kind == "expert_bias":
        for c in tensor_chunks(cfg, mx[t.name], seed, spread):
            yield c if t.dtype == "BF16" else bf16_to_f32(c).astype(NP_DTYPE[t.dtype])
        return
    scales = np.concatenate(list(tensor_chunks(cfg, mx[t.name + "_scales"], seed, spread)))
    e = 0
    for blocks in tensor_chunks(cfg, mx[t.name + "_blocks"], seed, spread):
        with np.errstate(over="ignore"):
            vals = mxfp4.decode(blocks, scales[e : e + len(blocks)]).transpose(0, 2, 1)
        e += len(blocks)
        yield f32_to_bf16(vals) if t.dtype == "BF16" else vals.astype(NP_DTYPE[t.dtype])


def shard_names(n: int) -> list[str]:
    """Published gpt-oss shard naming: model-00000-of-00002.safetensors ... (zero-based, of n-1)."""
    return [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]


def _split(specs: list[TensorSpec], n: int) -> list[list[TensorSpec]]:
    """Split tensors in model order into n shards of roughly equal bytes."""
    total = sum(t.nbytes for t in specs)
    out: list[list[TensorSpec]] = [[] for _ in range(n)]
    acc = 0
    for t in specs:
        i = min(n - 1, int(acc * n / total)) if total else 0
        out[i].append(t)
        acc += t.nbytes
    return [s for s in out if s] or [[]]


def write_hf(cfg: GptOssConfig, root: Path, seed: int, shards: int, progress: Callable[[int], None],
             spread: int = SCALE_SPREAD, experts: str = "mxfp4") -> None:
    specs = hf_tensors(cfg, experts)
    groups = _split(specs, shards)
    names = shard_names(len(groups))
    weight_map = {}
    for fname, group in zip(names, groups, strict=True):
        with SafetensorsWriter(root / fname, [(t.name, t.dtype, t.shape) for t in group], {"format": "pt"}) as w:
            for t in group:
                dense = experts != "mxfp4" and t.kind in ("expert_dense", "expert_bias")
                for chunk in (dense_chunks if dense else tensor_chunks)(cfg, t, seed, spread):
                    w.write(t.name, chunk)
                    progress(chunk.nbytes)
                weight_map[t.name] = fname
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in specs)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    (root / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


def write_original(cfg: GptOssConfig, root: Path, seed: int, progress: Callable[[int], None],
                   spread: int = SCALE_SPREAD) -> None:
    """OpenAI's layout: one `model.safetensors`, fused qkv, `block.N.*` names, same values as the HF layout."""
    root.mkdir(parents=True, exist_ok=True)
    by_hf = {t.name: t for t in hf_tensors(cfg)}
    parts: dict[str, list[str]] = {}
    for hf_name, (orig, _) in original_sources(cfg).items():
        parts.setdefault(orig, []).append(hf_name)
    specs = original_tensors(cfg)
    with SafetensorsWriter(root / "model.safetensors", [(t.name, t.dtype, t.shape) for t in specs],
                           {"format": "pt"}) as w:
        for t in specs:
            for hf_name in parts[t.name]:  # q, k, v rows in order for the fused qkv
                for chunk in tensor_chunks(cfg, by_hf[hf_name], seed, spread):
                    w.write(t.name, chunk)
                    progress(chunk.nbytes)
    (root / "config.json").write_text(json.dumps(cfg.to_original(), indent=2) + "\n")


def synthesize(cfg: GptOssConfig, out: Path, seed: int = 0, shards: int | None = None, layout: str = "hf",
               force: bool | str = False, progress: Callable[[int], None] = lambda n: None,
               scale_spread: int = SCALE_SPREAD, experts_dtype: str = "mxfp4") -> Path:
    """Write a synthetic checkpoint to `out` atomically. layout: hf, original or both (HF + original/);
    experts_dtype: "mxfp4" or BF16/F16/F32 for the dense 16-bit experts of a fine-tune (HF layout only);
    scale_spread: binades spanned by the MXFP4 block scales of an expert row (0: one scale everywhere).
    `force`: as `atomic_dir` (True replaces only an earlier edgec output, marked by SYNTH_MARKER)."""
    from .harmony.tokenizer import write_tokenizer_files

    if shards is None:
        shards = 3 if cfg.hidden_size >= 2880 and cfg.num_hidden_layers >= 24 else 2
        if cfg.num_local_experts >= 128:
            shards = 15
    with atomic_dir(out, force=force) as tmp:
        (tmp / SYNTH_MARKER).write_text("written by edgec synth\n")
        if layout in ("hf", "both"):
            write_hf(cfg, tmp, seed, shards, progress, scale_spread, experts_dtype)
            write_tokenizer_files(tmp)
        if layout in ("original", "both"):
            write_original(cfg, tmp / "original" if layout == "both" else tmp, seed, progress, scale_spread)
            if layout == "original":
                write_tokenizer_files(tmp)
    return out


def total_bytes(cfg: GptOssConfig, layout: str, experts_dtype: str = "mxfp4") -> int:
    n = sum(t.nbytes for t in hf_tensors(cfg, experts_dtype))
    return n * (2 if layout == "both" else 1)
