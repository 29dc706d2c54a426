"""ONNX graph building blocks for edgec's gpt-oss converter, and the interface of the graphs it writes.

Every initializer's bytes go straight into `model.onnx.data` as they are produced (`ExternalData`); the graphs
only hold TensorProtos that point at offsets in that file, so each ModelProto stays a few hundred KB.

The contract (named here once; `convert/onnx.py` builds it, `runtime/onnx_backend.py` and genai_config.json use it):
  GENAI_GRAPH (model.onnx)        what onnxruntime-genai runs through genai_config.json: input_ids, attention_mask,
                                  past_key_values.<layer>.<key|value> -> logits (every position), present.*; sliding
                                  layers use GroupQueryAttention's windowed cache (`sliding_window_cache`)
  EDGEC_GRAPH (model.edgec.onnx)  what edgec's own loop runs: the same nodes and weights (both graphs point into the
                                  same model.onnx.data) except that sliding layers take the loop's own
                                  SLIDING_SEQLENS_K / SLIDING_TOTAL / POSITION_IDS (a buffer that keeps history past
                                  the window, for exact rollback), and LOGITS_FROM picks the first position whose
                                  logits are computed (-1: the last only).
  F32_GRAPH (model.f32.edgec.onnx) an fp16 onnx-webgpu output's float32-activation twin of EDGEC_GRAPH, for adapters
                                  without shader-f16 (`widen_f32`): its fp16 initializers are FLOAT ones in widened
                                  files (WIDE, WIDE.1, ...) that are never written; the browser builds them from
                                  model.onnx.data by the table edgec.json's recipe records (edgec/web/static/model.js).
GRAPH_FORMAT is recorded in edgec.json; a folder written under another contract is refused with "re-convert".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgecError

ALIGN = 4096  # page-aligned offsets so onnxruntime can memory-map the weights

GRAPH_FORMAT = 2
GENAI_GRAPH, EDGEC_GRAPH, DATA = "model.onnx", "model.edgec.onnx", "model.onnx.data"
F32_GRAPH, WIDE = "model.f32.edgec.onnx", DATA + ".f32"
INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
PAST, PRESENT = "past_key_values.%d.%s", "present.%d.%s"  # % (layer, "key" | "value")
SLIDING_SEQLENS_K, SLIDING_TOTAL, POSITION_IDS, LOGITS_FROM = ("sliding_seqlens_k", "sliding_total_sequence_length",
                                                             "position_ids", "logits_from")
GENAI, EDGEC = "genai", "edgec"  # the two graphs a node, input or output can be restricted to

# ONNX TensorProto data type codes
FLOAT, UINT8, INT64, INT32, BOOL, FLOAT16, BFLOAT16, FLOAT8E8M0 = 1, 2, 7, 6, 9, 10, 16, 24
ITEMSIZE = {FLOAT: 4, UINT8: 1, INT64: 8, INT32: 4, BOOL: 1, FLOAT16: 2, BFLOAT16: 2, FLOAT8E8M0: 1}


def to_io(x: np.ndarray, io: str) -> np.ndarray:
    """float32 values -> the bytes of the io dtype (bf16 as uint16 bits)."""
    from ..safetensors_io import f32_to_bf16

    if io == "fp32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if io == "fp16":
        return np.ascontiguousarray(x, dtype=np.float16)
    return f32_to_bf16(x)


def bf16_to_io(bf16: np.ndarray, io: str) -> np.ndarray:
    """A checkpoint's BF16 values (uint16 bits) -> the bytes of the io dtype (bf16: as they are)."""
    if io == "bf16":
        return np.ascontiguousarray(bf16, dtype=np.uint16)
    from ..safetensors_io import bf16_to_f32

    return to_io(bf16_to_f32(bf16), io)


def keep_scales(pair: tuple[np.ndarray, np.ndarray], scales: list[np.ndarray]) -> np.ndarray:
    """For a (weights, scales) stream written as two tensors: return the weights, keep the (small) scales in
    `scales` to be written after them."""
    scales.append(pair[1])
    return pair[0]


IO_CODE = {"fp32": FLOAT, "fp16": FLOAT16, "bf16": BFLOAT16}


def row_shards(rows: int, row_bytes: int, cap: int) -> list[tuple[int, int]]:
    """[(start, end), ...]: `rows` rows of `row_bytes` each in as few equal shards as keep every shard's bytes
    within `cap` (one shard when the whole fits, or cap is 0: no cap)."""
    n = -(-rows * row_bytes // cap) if cap else 1
    if n > 1 and row_bytes > cap:
        raise EdgecError(f"max_buffer_bytes {cap}: smaller than one row ({row_bytes} bytes)")
    step = -(-rows // n)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def data_files(folder: Path) -> list[Path]:
    """The folder's external-data files in write order: model.onnx.data, then model.onnx.data.1, .2, ..."""
    parts = sorted(Path(folder).glob(DATA + ".*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else -1)
    ok = lambda p: p.name == DATA or p.name[len(DATA) + 1:].isdigit()  # not a widened WIDE.1 (`materialize_wide`)
    return [p for p in [Path(folder) / DATA, *parts] if p.is_file() and ok(p)]


class ExternalData:
    """Append-only external-data file(s); `add` returns an EXTERNAL TensorProto (no bytes in the graph).

    `cap` (bytes, 0: none): the largest initializer the target's device allocates as one buffer (the onnx-webgpu
    profile's `max_buffer_bytes`, or `convert --max-buffer`); a larger one is refused before any of its bytes are
    written (the embedding and lm_head are sharded under it, QMoE's experts grouped: onnx_moe.py).
    `file_cap` (bytes, 0: one file): the largest data file (onnx-webgpu's `max_data_file_bytes`: onnxruntime-web
    fetches each file into one ArrayBuffer). A tensor that would cross it starts the next file, `model.onnx.data.1`,
    `.2`, ...; no tensor is split, each one's `location` names its file.
    `widen`: FLOAT16 tensors are also read as float32 (F32_GRAPH, `widen_f32`): both caps hold for widened bytes."""

    def __init__(self, path: Path, release=None, release_every: int = 64 << 20, cap: int = 0, file_cap: int = 0,
                 widen: bool = False):
        self.cap, self.file_cap, self.widen = cap, file_cap, widen
        self.largest = 0  # bytes of the largest initializer a device holds (widened where widen)
        self.path = self.first = Path(path)
        self.files = [self.path.name]
        self.f = open(self.path, "wb")
        self.offset = 0
        self.inits: list[Any] = []
        self.names: set[str] = set()
        self.release, self.release_every, self._since = release, release_every, 0

    def add(self, name: str, code: int, dims: Iterable[int], chunks: np.ndarray | Iterable[np.ndarray]) -> str:
        from onnx import TensorProto

        count = int(np.prod(list(dims), dtype=np.int64))
        size, wide = count * ITEMSIZE[code], count * self.width(code)
        if self.cap and wide > self.cap:
            raise EdgecError(f"{name}: {wide} bytes{' as float32' if wide > size else ''}, over the target's "
                             f"max_buffer_bytes ({self.cap}: one device buffer per initializer); convert with a "
                             f"smaller format (--experts int4) or a larger --max-buffer")
        if self.file_cap and wide > self.file_cap:
            raise EdgecError(f"{name}: {wide} bytes, over the target's max_data_file_bytes ({self.file_cap})")
        pad = (-self.offset) % ALIGN
        if self.file_cap and self.offset and self.offset + pad + size > self.file_cap:
            self.next_file()
            pad = 0
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for c in [chunks] if isinstance(chunks, np.ndarray) else chunks:
            b = np.ascontiguousarray(c)
            self.f.write(memoryview(b).cast("B"))
            self.offset += b.nbytes
            self._since += b.nbytes
            if self.release and self._since >= self.release_every:  # keep touched source pages out of RSS
                self.release()
                self._since = 0
        t = TensorProto(name=name, data_type=code, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(start)), ("length", str(self.offset - start))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        self.largest = max(self.largest, wide)
        self.names.add(name)
        return name

    def width(self, code: int) -> int:
        """Bytes per element a device buffer holds: FLOAT16 as float32 when widened, else the stored size."""
        return ITEMSIZE[FLOAT] if self.widen and code == FLOAT16 else ITEMSIZE[code]

    def next_file(self) -> None:
        self.f.close()
        self.path = self.first.with_name(f"{self.first.name}.{len(self.files)}")
        self.files.append(self.path.name)
        self.f = open(self.path, "wb")
        self.offset = 0

    def close(self) -> None:
        self.f.close()


class Graph:
    """Nodes, small constants, inputs and outputs; `model(only=GENAI|EDGEC)` assembles one of the two ModelProtos.

    A node, input or output added with `only=` belongs to that graph alone; everything else to both."""

    def __init__(self):
        self.nodes: list[tuple[Any, str | None]] = []
        self.consts: list[Any] = []
        self.inputs: list[tuple[Any, str | None]] = []
        self.outputs: list[tuple[Any, str | None]] = []
        self._n = 0

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str = "", domain: str = "",
             outputs: list[str] | None = None, only: str | None = None, **attrs: Any) -> list[str]:
        from onnx import helper

        self._n += 1
        name = name or f"/{op}_{self._n}"
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append((helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs), only))
        return outs

    def input(self, name: str, code: int, shape: list[Any], only: str | None = None) -> str:
        self.inputs.append((io_value(name, code, shape), only))
        return name

    def output(self, name: str, code: int, shape: list[Any], only: str | None = None) -> str:
        self.outputs.append((io_value(name, code, shape), only))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if not any(c.name == name for c in self.consts):
            self.consts.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def i64(self, *vals: int) -> str:
        return self.const(f"/const/i64/{list(vals)}", np.array(vals, dtype=np.int64))

    def scalar(self, v: float, io: str) -> str:
        return self.const(f"/const/{io}/{v}", to_io(np.array(v, dtype=np.float32), io))

    def model(self, ext: ExternalData, opset: int, only: str):
        from onnx import helper

        pick = lambda items: [x for x, o in items if o in (None, only)]
        nodes = pick(self.nodes)
        used = {name for n in nodes for name in n.input}
        g = helper.make_graph(nodes, "gpt-oss", pick(self.inputs), pick(self.outputs),
                              initializer=[c for c in self.consts if c.name in used] + ext.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                                helper.make_opsetid("com.microsoft", 1)], producer_name="edgec")
        m.ir_version = 10
        return m


def io_value(name: str, code: int, shape: list[Any]):
    from onnx import helper

    return helper.make_tensor_value_info(name, code, shape)


def widen_f32(model, file_cap: int = 0) -> tuple[Any, dict[str, Any]]:
    """F32_GRAPH from an fp16 graph (a ModelProto loaded without external data; changed in place): every FLOAT16
    input, output and value_info -> FLOAT, Casts to FLOAT16 -> FLOAT, in-graph fp16 constants and attribute tensors
    widened, and each external FLOAT16 initializer a FLOAT one at a 4096-aligned offset of the widened files WIDE,
    WIDE.1, ... (each within `file_cap`, 0: one file); other initializers (uint8 experts, int64) keep their place in
    the real data files. Returns (model, table): table = {"files": [{name, bytes}], "data": [real files the graph
    still reads], "tensors": [{tensor, file, offset, count, wide_file, wide_offset}]}, what the browser widens."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    def tensor(t):  # an in-graph tensor, fp16 -> fp32 (external ones are handled below)
        if t.data_type == FLOAT16 and t.data_location != TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    g = model.graph
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == FLOAT16:
            v.type.tensor_type.elem_type = FLOAT
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT16:
                a.i = FLOAT
            elif a.type == AttributeProto.TENSOR:
                tensor(a.t)
            elif a.type == AttributeProto.TENSORS:
                for t in a.tensors:
                    tensor(t)
    files: list[dict[str, Any]] = []
    data: set[str] = set()
    table: list[dict[str, Any]] = []
    for t in g.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            tensor(t)
            continue
        ext = {e.key: e.value for e in t.external_data}
        if t.data_type != FLOAT16:
            data.add(ext["location"])
            continue
        count = int(np.prod(list(t.dims), dtype=np.int64))
        size = count * ITEMSIZE[FLOAT]
        at = -(-files[-1]["bytes"] // ALIGN) * ALIGN if files else 0
        if not files or (file_cap and at and at + size > file_cap):
            files.append({"name": WIDE if not files else f"{WIDE}.{len(files)}", "bytes": 0})
            at = 0
        files[-1]["bytes"] = at + size
        table.append({"tensor": t.name, "file": ext["location"], "offset": int(ext.get("offset", 0)), "count": count,
                      "wide_file": files[-1]["name"], "wide_offset": at})
        t.data_type = FLOAT
        del t.external_data[:]
        for k, v in (("location", files[-1]["name"]), ("offset", str(at)), ("length", str(size))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return model, {"files": files, "data": sorted(data), "tensors": table}


def materialize_wide(folder: Path, table: dict[str, Any], dst: Path) -> list[Path]:
    """Write the widened files of `table` (widen_f32's) into `dst` from `folder`'s data files, as model.js builds
    them in the browser (fp16 -> fp32 is exact). For tests and CPU checks; convert never writes them."""
    out = []
    for f in table["files"]:
        with open(Path(dst) / f["name"], "wb") as fh:
            fh.truncate(f["bytes"])
        out.append(Path(dst) / f["name"])
    for t in table["tensors"]:
        x = np.fromfile(Path(folder) / t["file"], dtype="<f2", count=t["count"], offset=t["offset"])
        with open(Path(dst) / t["wide_file"], "r+b") as fh:
            fh.seek(t["wide_offset"])
            fh.write(x.astype("<f4").tobytes())
    return out
