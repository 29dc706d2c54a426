"""gpt-oss -> MLX (mlx-lm layout): experts stay MXFP4 bit for bit, dense weights bf16 or MLX affine 8-bit.

Output names are the ones mlx-lm's `models/gpt_oss.py` `sanitize` produces from an HF checkpoint:
`mlp.experts.{gate,up,down}_proj.{weight,scales,bias}` with `weight` = the MXFP4 blocks viewed as uint32 words
and gate/up de-interleaved by rows (even rows gate, odd rows up). Every other tensor keeps its HF name. With
`--dense q8` the linear layers and the embedding become `{weight (uint32), scales, biases}` (affine, 8 bits).

Streaming: tensors are planned from the headers, then copied expert by expert / row chunk by row chunk from
the memory map into `SafetensorsWriter`s; the map's pages are dropped every ROW_CHUNK_BYTES written, so peak RSS
is set by the chunk size, never by the model size. Chunks that are verbatim views of the source (everything but the
de-interleaved gate/up and q8 outputs) are copied file to file inside the kernel, and only hashed from the map.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint
from ..errors import EdgecError, require
from ..fsutil import atomic_dir, fsync_folder
from ..jsonio import load_json
from ..progress import byte_progress
from ..safetensors_io import SafetensorsWriter
from .common import copy_tokenizer_files, write_manifest

MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
ROW_CHUNK_BYTES = 64 << 20  # dense tensors are copied / quantized in row chunks of about this size
Q8_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.router.weight")

# an output tensor: (name, safetensors dtype, shape, producer yielding (array chunk, source bytes consumed))
Plan = tuple[str, str, tuple[int, ...], Callable[[], Iterator[tuple[np.ndarray, int]]]]


class _Sha256:
    """sha256 fed on a worker thread (hashlib drops the GIL), so the manifest's digest costs no second read and
    overlaps the writes. At most 2 buffers wait, which bounds the memory (and mapped pages) held."""

    def __init__(self, first: bytes, pool: ThreadPoolExecutor):
        self.h, self.pool = hashlib.sha256(first), pool
        self.pending: deque[Future] = deque()

    def update(self, b: np.ndarray) -> None:
        while len(self.pending) >= 2:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self.h.update, b))

    def hexdigest(self) -> str:
        while self.pending:
            self.pending.popleft().result()
        return self.h.hexdigest()


def _rows(arr: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """A 1-D/2-D tensor copied in row chunks (bytes consumed = bytes produced)."""
    if arr.ndim < 2:
        yield arr, arr.nbytes
        return
    step = max(1, ROW_CHUNK_BYTES // max(1, arr[0].nbytes))
    for s in range(0, arr.shape[0], step):
        part = np.ascontiguousarray(arr[s : s + step])
        yield part, part.nbytes


def _per_expert(arr: np.ndarray, rows: slice, words: bool, consumed_share: float) -> Iterator[tuple[np.ndarray, int]]:
    """One expert at a time, `rows` of its output dimension; blocks [E, R, G, 16] become uint32 [R, G*4]."""
    for e in range(arr.shape[0]):
        part = np.ascontiguousarray(arr[e, rows])
        if words:
            part = part.reshape(part.shape[0], -1).view("<u4")
        yield part, int(arr[e].nbytes * consumed_share)


def _q8(arr_u16: np.ndarray, group: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """MLX affine 8-bit quantization (mx.quantize itself), row chunk by row chunk: (wq, scales, biases, bytes)."""
    mx = require("mlx.core", "mlx")
    step = max(1, ROW_CHUNK_BYTES // max(1, arr_u16[0].nbytes))
    for s in range(0, arr_u16.shape[0], step):
        part = np.ascontiguousarray(arr_u16[s : s + step])
        w = mx.array(part).view(mx.bfloat16)
        wq, scales, biases = mx.quantize(w, group_size=group, bits=8, mode="affine")
        mx.eval(wq, scales, biases)
        out = (np.array(wq), np.array(scales.view(mx.uint16)), np.array(biases.view(mx.uint16)), part.nbytes)
        del w, wq, scales, biases
        yield out


def plan(ckpt: Checkpoint, dense: str, group: int) -> list[Plan]:
    """Every output tensor in model order, with the function that streams its bytes."""
    out: list[Plan] = []
    q8_cache: dict[str, list] = {}

    def q8_parts(name: str, i: int) -> Callable[[], Iterator[tuple[np.ndarray, int]]]:
        # the three outputs of one quantized tensor are produced in one pass; weight first, then scales, biases
        def gen() -> Iterator[tuple[np.ndarray, int]]:
            if i == 0:
                q8_cache[name] = []
                for wq, sc, bi, nb in _q8(ckpt.raw(name + ".weight"), group):
                    q8_cache[name].append((sc, bi))
                    yield wq, nb
            else:
                for parts in q8_cache[name]:
                    yield parts[i - 1], 0
                if i == 2:
                    del q8_cache[name]
        return gen

    for t in ckpt.specs():
        name, shape = t.name, tuple(t.shape)
        arr = lambda n=name: ckpt.raw(n)
        if t.kind in ("expert_blocks", "expert_scales", "expert_bias"):
            base, part = name.rsplit(".", 1)  # model.layers.N.mlp.experts, gate_up_proj_blocks
            which, kind = part.rsplit("_", 1)
            words = kind == "blocks"
            suffix = {"blocks": "weight", "scales": "scales", "bias": "bias"}[kind]
            dtype = {"blocks": "U32", "scales": "U8", "bias": "BF16"}[kind]
            tail = (shape[2] * 4,) if words else shape[2:]
            if which == "gate_up_proj":
                for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
                    out.append((f"{base}.{proj}.{suffix}", dtype, (shape[0], shape[1] // 2) + tail,
                                lambda a=arr, r=rows, w=words: _per_expert(a(), r, w, 0.5)))
            else:
                out.append((f"{base}.{which}.{suffix}", dtype, (shape[0], shape[1]) + tail,
                            lambda a=arr, w=words: _per_expert(a(), slice(None), w, 1.0)))
        elif dense == "q8" and (name.endswith(Q8_SUFFIXES) or name in ("model.embed_tokens.weight", "lm_head.weight")):
            rows, cols = shape
            if cols % group:
                raise EdgecError(f"{ckpt.path}: tensor {name}: {cols} columns are not a multiple of the q8 group "
                                 f"size {group}; use --dense bf16")
            stem = name[: -len(".weight")]
            out.append((f"{stem}.weight", "U32", (rows, cols // 4), q8_parts(name[: -len('.weight')], 0)))
            out.append((f"{stem}.scales", "BF16", (rows, cols // group), q8_parts(stem, 1)))
            out.append((f"{stem}.biases", "BF16", (rows, cols // group), q8_parts(stem, 2)))
        else:
            out.append((name, t.dtype, shape, lambda a=arr: _rows(a())))
    return out


def _shards(entries: list[Plan], limit: int) -> list[list[Plan]]:
    from ..safetensors_io import DTYPE_SIZE

    shards: list[list[Plan]] = [[]]
    size = 0
    for e in entries:
        nb = math.prod(e[2]) * DTYPE_SIZE[e[1]]
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nb
    return shards


def mlx_config(ckpt: Checkpoint, dense: str, group: int) -> dict[str, Any]:
    """The source config.json plus the `quantization` block mlx-lm reads (and `quantization_config` mirroring it,
    as mlx-lm's own save_config writes)."""
    cfg = load_json(ckpt.path / "config.json") if ckpt.layout == "hf" else ckpt.config.to_hf()
    quant: dict[str, Any] = dict(MXFP4)
    if dense == "q8":
        q8 = {"group_size": group, "bits": 8, "mode": "affine"}
        for i in range(ckpt.config.num_hidden_layers):
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.router"):
                quant[f"model.layers.{i}.{m}"] = q8
        quant["model.embed_tokens"] = q8
        quant["lm_head"] = q8
    cfg["quantization"] = quant
    cfg["quantization_config"] = quant
    return cfg


def convert(ckpt: Checkpoint, profile: dict[str, Any], out: Path, dense: str = "bf16", experts: str = "mxfp4",
            force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the MLX folder atomically; return a summary (also stored as the recipe in edgec.json)."""
    if experts != "mxfp4":
        raise EdgecError(f"target mlx cannot use --experts {experts}; supported: mxfp4")
    group = int(profile.get("dense", {}).get("q8_group_size", 64))
    entries = plan(ckpt, dense, group)
    shards = _shards(entries, int(profile.get("shard_bytes", 5_000_000_000)))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(t.nbytes for t in ckpt.specs())  # the bar's true total: the tensor bytes the plan consumes
    weight_map: dict[str, str] = {}
    written = 0
    sha: dict[str, str] = {}
    since_drop = 0
    with atomic_dir(out, force, keep=ckpt.source_files()) as tmp, \
            byte_progress(total, f"mlx {dense}/{experts}", progress) as advance, \
            ThreadPoolExecutor(max_workers=1) as pool:
        for fname, shard in zip(names, shards, strict=True):
            with SafetensorsWriter(tmp / fname, [(e[0], e[1], e[2]) for e in shard], {"format": "mlx"}) as w:
                digest = _Sha256(w.header, pool)
                for name, _, _, produce in shard:
                    for chunk, consumed in produce():
                        digest.update(chunk)
                        # verbatim chunks are views of the source map: copied file to file inside the kernel
                        w.write(name, chunk, source=ckpt.file_range(chunk))
                        advance(consumed)
                        since_drop += chunk.nbytes
                        if since_drop >= ROW_CHUNK_BYTES:  # keep the touched source pages out of our RSS
                            ckpt.release_pages()
                            since_drop = 0
                    weight_map[name] = fname
                sha[fname] = digest.hexdigest()
            written += (tmp / fname).stat().st_size
        index = {"metadata": {"total_size": written, "format": "mlx"}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(mlx_config(ckpt, dense, group), indent=2) + "\n")
        tokenizer = copy_tokenizer_files(ckpt, tmp)
        recipe = {"dense": dense, "experts": experts, "q8_group_size": group if dense == "q8" else None,
                  "expert_layout": "mlx-lm sanitize: uint32 words, gate/up de-interleaved by rows",
                  "tensors": len(weight_map), "shards": names}
        write_manifest(tmp, ckpt, profile, recipe, known_sha256=sha)
        fsync_folder(tmp)  # the shards fsynced as they closed; now the small files and the folder
    return {"files": names + ["model.safetensors.index.json", "config.json", *tokenizer, "edgec.json"],
            "tensors": len(weight_map), "bytes_written": written, "source_bytes": ckpt.source_bytes()}
