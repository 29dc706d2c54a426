"""edgec's own onnxruntime loop over an onnx-* output folder: a KV cache it owns, exact rollback, every logit.

onnxruntime-genai runs the folder's model.onnx (its generator cannot roll back and only exposes its last step's
logits). This loop runs model.edgec.onnx, the converter's second graph over the same weights (model.onnx.data,
memory-mapped), whose interface is declared in `convert/onnx_graph.py`: sliding layers take this loop's own
seqlens / total length / position ids, and LOGITS_FROM = -1 computes only the last position's logits.

KV cache: one buffer per layer and K/V on the execution provider's device (the profile's `ort_device`, recorded in
edgec.json), bound as GroupQueryAttention's past AND present (IOBinding), so every run writes its new positions in
place and nothing is copied per step. On CPU the buffers are numpy arrays that the OrtValues share.
  full layers     every position, grown in FULL_CHUNK steps (x1.5 at least) up to max_context; growing copies the
                  cache once (through the host on a GPU: rare, amortized)
  sliding layers  the last window + ROLLBACK_MARGIN positions and a PREFILL_CHUNK of room; GQA attends to the last
                  `window` of them (`local_window_size`), at rows counted from `sw_start`; when full, the kept
                  positions move to the front (through the host on a GPU: once per ROLLBACK_MARGIN + PREFILL_CHUNK
                  tokens)
The allocation rule is WindowedBackend's (edgec/runtime/base.py); `plan` prices it.
`truncate(n)` is exact: full layers just move the length; sliding layers too while their kept history covers the
window before n, otherwise the kept token ids are prefilled again (rare, correct).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import manifest
from ..convert import onnx_graph as G  # the graph's interface
from ..errors import EdgecError, MissingBackend, require
from ..jsonio import load_json
from ..memory import Plan, Weights, kv_bytes, position_bytes
from ..spec import GptOssConfig
from .base import WindowedBackend

EMBEDDING = "model.embed_tokens.weight"
IO_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _embedding_extents(extents: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) of the embedding table, or of each of its vocabulary shards (`EMBEDDING.<j>`, written one
    after the other) where the target caps buffer sizes."""
    return [v for k, v in extents.items() if k == EMBEDDING or k.startswith(EMBEDDING + ".")]


class OnnxBackend(WindowedBackend):
    name = "onnx"
    PREFILL_CHUNK: ClassVar[int] = 256  # prompt tokens per session run (bounds the [chunk, vocab] all_logits buffer)

    # ---- options and plan (class level) --------------------------------------------------------------------
    @classmethod
    def kv_dtype_of(cls, recipe: dict[str, Any]) -> str:
        """The KV cache's dtype: the graph's io dtype (fp32 when the dense weights are integer blocks)."""
        from ..convert.onnx import io_dtype

        return IO_DTYPES.get(str(recipe.get("io_dtype") or io_dtype(str(recipe.get("dense", "fp32")))), "float32")

    @classmethod
    def recipe_of(cls, folder: Path) -> dict[str, Any]:
        """The folder's recipe, refused in one line when an older edgec wrote another graph contract."""
        recipe = load_json(Path(folder) / "edgec.json").get("recipe") or {}
        if recipe.get("graph_format") != G.GRAPH_FORMAT:
            raise EdgecError(f"{folder}: converted by an older edgec (ONNX graph format "
                             f"{recipe.get('graph_format', 1)}, this edgec runs {G.GRAPH_FORMAT}); re-convert it "
                             f"with `edgec convert`")
        return recipe

    @classmethod
    def options(cls, folder: Path) -> dict[str, tuple]:
        recipe = cls.recipe_of(folder)
        return {"kv_dtype": (cls.kv_dtype_of(recipe),), "compute": (cls.kv_dtype_of(recipe),), "provider": (),
                "threads": ()}

    @classmethod
    def held_weights(cls, folder: Path) -> Weights:
        """The weights file's bytes (and the graphs'); `embedding`: the embedding table's bytes in it; `experts`:
        the expert weights' bytes that the CPU provider runs as stored (see `_extents`)."""
        folder = Path(folder)
        total = sum(f.stat().st_size for f in [folder / G.EDGEC_GRAPH, *G.data_files(folder)] if f.is_file())
        extents, experts = cls._extents(folder)
        return Weights(total, embedding=sum(n for _, n in _embedding_extents(extents)),
                       experts=sum(extents.get(i, (0, 0))[1] for i in experts))

    @staticmethod
    def _extents(folder: Path) -> tuple[dict[str, tuple[int, int]], set[str]]:
        """(offset, length) in model.onnx.data of each initializer stored there, and the names of the expert weights
        that onnxruntime's CPU QMoE runs as stored (`weights_prepacked=1`: read through the map as routed to; the
        other QMoE layouts and the block scales it repacks at load)."""
        as_stored = lambda n: any(a.name == "weights_prepacked" and a.i == 1 for a in n.attribute)
        graph = require("onnx", "onnx").load(str(folder / G.EDGEC_GRAPH), load_external_data=False).graph
        ext = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer if t.external_data}
        experts = {n.input[i] for n in graph.node if n.op_type == "QMoE" and as_stored(n) for i in (2, 5)}
        return {k: (int(e.get("offset", 0)), int(e.get("length", 0))) for k, e in ext.items()}, experts

    def embedding_range(self) -> tuple[Path, int, int]:
        """The embedding table's bytes in model.onnx.data: (file, start, end) (an unsplit output's: onnx-cpu's)."""
        parts = _embedding_extents(self._extents(self.folder)[0]) or [(0, 0)]
        return self.folder / G.DATA, min(o for o, _ in parts), max(o + n for o, n in parts)

    @classmethod
    def plan(cls, cfg: GptOssConfig, context: int, weights: Weights, recipe: dict[str, Any] | None = None,
             **_: Any) -> Plan:
        """Weights as the folder stores them, KV by the loop's allocation rule in the graph's io dtype, and a step's
        temporaries: on the CPU provider GroupQueryAttention's scores for a prefill chunk over the whole context (its
        CPU kernel materializes them), and the logits.
        A GPU provider copies every initializer to the device. The CPU provider maps model.onnx.data: the matrices it
        repacks are read at load, QMoE's experts (which it runs as stored) page in as they are first routed to (all
        of them within a few hundred tokens), and of the embedding table only the pages of tokens seen (`mapped`:
        clean file pages, reread if the OS drops them; how many a row brings in is the OS's choice)."""
        recipe = recipe or {}
        dtype = cls.kv_dtype_of(recipe)
        value = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
        full, sliding = cls.kv_positions(cfg, context)
        per = position_bytes(cfg, value)
        cpu = recipe.get("execution_provider") in (None, "CPUExecutionProvider")
        temps = cfg.num_attention_heads * cls.PREFILL_CHUNK * context * 4 * cpu + 2 * cfg.vocab_size * 4
        kv = kv_bytes(cfg, full, sliding, per, per)
        if not cpu:
            return Plan("onnx", context, weights.total, kv, temps, dtype, "as stored, on the device")
        return Plan("onnx", context, weights.total - weights.embedding, kv, temps, dtype, "as stored, memory-mapped",
                    mapped=weights.embedding, paged=weights.experts if recipe.get("experts") == "mxfp4" else 0)

    @classmethod
    def plan_folder(cls, folder: Path, context: int, **options: Any) -> Plan:
        return super().plan_folder(folder, context, recipe=cls.recipe_of(folder), **options)

    def memory_plan(self, context: int | None = None) -> Plan:
        return self.plan_folder(self.folder, context or self.max_context)

    def __init__(self, folder: str | Path, max_context: int | None = None, provider: str | None = None,
                 threads: int | None = None, device_buffers: bool | None = None, **_: object):
        """`provider` overrides the folder's execution provider; `device_buffers` forces the GPU path's buffer
        handling (OrtValues allocated by onnxruntime, moved through the host) on whatever device is used."""
        ort = self.ort = require("onnxruntime", "onnx")
        self.folder = Path(folder)
        m = manifest.read(self.folder)
        self.config = m.config
        recipe = self.recipe_of(self.folder)
        genai = load_json(self.folder / "genai_config.json")
        self.max_context = int(max_context or genai["model"]["context_length"])
        provider = provider or recipe.get("execution_provider") or "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise MissingBackend(f"{self.folder}: target {m.target} needs onnxruntime's {provider}, which "
                                 f"this onnxruntime build lacks (has: {', '.join(ort.get_available_providers())})")
        self.device = "cpu" if provider == "CPUExecutionProvider" else str(recipe.get("ort_device", "cpu"))
        self.on_host = self.device == "cpu" and not device_buffers
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / G.EDGEC_GRAPH), so, providers=[provider])
        past = [i for i in self.session.get_inputs() if i.name.startswith(G.PAST.split("%")[0])]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32
        layer = lambda name: int(name.split(".")[1])
        self.full = [i.name for i in past if not self.config.is_sliding(layer(i.name))]
        self.sliding = [i.name for i in past if self.config.is_sliding(layer(i.name))]
        self.present = {G.PAST % (i, k): G.PRESENT % (i, k) for i in range(self.config.num_hidden_layers)
                        for k in ("key", "value")}
        self.reset()

    # ---- cache -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.ids: list[int] = []
        self.kv: dict = {}  # name -> OrtValue [1, kv heads, capacity, head dim] on self.device (past and present)
        self.host: dict[str, np.ndarray] = {}  # on_host: the numpy arrays those OrtValues share
        self.sw_start = 0  # absolute position of row 0 of the sliding buffers
        self._grow_full(1)
        cap = self.sliding_positions(self.config, self.max_context)
        for n in self.sliding:
            self._alloc(n, np.zeros(self._shape(cap), dtype=self.dtype))

    def kv_bytes(self) -> int:
        return int(sum(np.prod(v.shape()) for v in self.kv.values()) * np.dtype(self.dtype).itemsize)

    def _shape(self, positions: int) -> tuple[int, int, int, int]:
        c = self.config
        return (1, c.num_key_value_heads, positions, c.head_dim)

    def _alloc(self, name: str, data: np.ndarray) -> None:
        """(Re)place buffer `name` with `data`'s contents, on the device."""
        if self.on_host:
            self.host[name] = data
            self.kv[name] = self.ort.OrtValue.ortvalue_from_numpy(data)
        else:
            self.kv[name] = self.ort.OrtValue.ortvalue_from_shape_and_type(data.shape, self.dtype, self.device)
            self.kv[name].update_inplace(data)

    def _read(self, name: str) -> np.ndarray:
        """Buffer `name` as a host array (the buffer itself on CPU, a copy from a device)."""
        return self.host[name] if self.on_host else self.kv[name].numpy()

    def _grow_full(self, need: int) -> None:
        """Make the full layers' buffers hold `need` positions (growing by 1.5x, in FULL_CHUNK steps)."""
        have = self.kv[self.full[0]].shape()[2] if self.full and self.full[0] in self.kv else 0
        cap = self.full_capacity(need, have, self.max_context)
        if cap == have:
            return
        for n in self.full:
            new = np.zeros(self._shape(cap), dtype=self.dtype)
            if n in self.kv:
                new[:, :, : self.length] = self._read(n)[:, :, : self.length]
            self._alloc(n, new)

    def _move_sliding(self, drop: int, upto: int) -> None:
        for name in self.sliding:
            b = self._read(name)
            b[:, :, : upto - drop] = b[:, :, drop:upto]
            if not self.on_host:
                self.kv[name].update_inplace(b)

    # ---- running -----------------------------------------------------------------------------------------
    def _run(self, ids: list[int], logits: str) -> np.ndarray | None:
        chunk, all_logits = np.asarray(ids, dtype=np.int64), logits == "all"
        start, n = self.length, chunk.size
        total = start + n
        self._grow_full(total)
        self._slide(start, n)
        rel = total - self.sw_start  # sliding layers: positions held once this chunk is written
        bind = self.session.io_binding()
        feeds = {G.INPUT_IDS: chunk[None], G.ATTENTION_MASK: np.ones((1, total), dtype=np.int64),
                 G.SLIDING_SEQLENS_K: np.array([rel - 1], dtype=np.int32),
                 G.SLIDING_TOTAL: np.array(rel, dtype=np.int32),
                 G.POSITION_IDS: np.arange(start, total, dtype=np.int64)[None],
                 G.LOGITS_FROM: np.array([0 if all_logits else -1], dtype=np.int64)}
        for k, v in feeds.items():
            bind.bind_cpu_input(k, v)
        bind.bind_output(G.LOGITS)  # onnxruntime allocates it on CPU
        for name, value in self.kv.items():  # past and present are the same buffer: new positions land in place
            bind.bind_ortvalue_input(name, value)
            bind.bind_ortvalue_output(self.present[name], value)
        self.session.run_with_iobinding(bind)
        out = bind.get_outputs()[0].numpy()
        self.ids.extend(int(t) for t in chunk)
        return None if logits == "none" else out[0]
