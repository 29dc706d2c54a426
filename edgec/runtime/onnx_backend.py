"""edgec's own onnxruntime loop over an onnx-* output folder: a KV cache it owns, exact rollback, every logit.

onnxruntime-genai runs the same folder (its generator cannot roll back and only exposes its last step's logits).
This loop runs the folder's model.onnx, weights memory-mapped from model.onnx.data, with four edits made in memory:
GroupQueryAttention's `sliding_window_cache` is switched off (the 128-key window is still applied by
`local_window_size`); the sliding layers' GQA nodes get their own `seqlens_k` / `total_sequence_length` and explicit
`position_ids` (GQA otherwise derives rotary positions from its past length, which is cut to the window here); and a
Slice before lm_head computes only the last position's logits unless every position is asked for.

KV cache:
  full layers     one buffer per K and V, grown in FULL_CHUNK steps (x1.5 at least) up to max_context. On the CPU
                  provider GQA's past and present share it (IOBinding binds both to the same OrtValue, so new
                  positions are written in place); other providers get the cached positions as past and their
                  present is copied back (GQA shares a buffer only when both sit on its device)
  sliding layers  the last window + ROLLBACK_MARGIN positions kept host side (buffers of window + ROLLBACK_MARGIN +
                  CHUNK positions that move only when full); each run feeds GQA the last `window` of them
`truncate(n)` is exact: full layers just move the length; sliding layers too while their kept history covers the
window before n, otherwise the kept token ids are prefilled again (rare, correct).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgecError, require
from ..spec import GptOssConfig, load_json
from .base import WindowedBackend, grown_capacity

CHUNK = 256  # prompt tokens per session run (bounds the [chunk, vocab] logits buffer of all_logits)
FULL_CHUNK = 1024  # full-attention buffers grow by at least this many positions
ROLLBACK_MARGIN = 1024  # sliding history kept beyond the window, so truncate(n) rarely recomputes

PROVIDERS = {"onnx-cpu": "CPUExecutionProvider", "onnx-cuda": "CUDAExecutionProvider",
             "onnx-dml": "DmlExecutionProvider", "onnx-webgpu": "WebGpuExecutionProvider",
             "onnx-trt-rtx": "NvTensorRTRTXExecutionProvider"}

# graph inputs added in memory for this loop
SW_SEQLENS, SW_TOTAL, POSITIONS, LOGITS_FROM = ("edgec_sliding_seqlens_k", "edgec_sliding_total",
                                                "edgec_position_ids", "edgec_logits_from")


def sliding_positions(cfg: GptOssConfig) -> int:
    """Positions allocated per sliding layer (`[kv] sliding_keep` of the onnx profiles; at most max_context)."""
    return cfg.sliding_window + ROLLBACK_MARGIN + CHUNK


def _edit_graph(model) -> None:  # noqa: ANN001
    """The in-memory edits described in the module docstring."""
    from onnx import TensorProto, helper

    g = model.graph
    g.input.extend([helper.make_tensor_value_info(SW_SEQLENS, TensorProto.INT32, [1]),
                    helper.make_tensor_value_info(SW_TOTAL, TensorProto.INT32, []),
                    helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [1, "sequence_length"]),
                    helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1])])
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        for a in [a for a in node.attribute if a.name == "sliding_window_cache"]:
            node.attribute.remove(a)
        window = next((a.i for a in node.attribute if a.name == "local_window_size"), -1)
        if window > 0:
            node.input[5], node.input[6], node.input[9] = SW_SEQLENS, SW_TOTAL, POSITIONS
    norm = "/model/norm/output_0"  # the final RMSNorm's output, lm_head's input (see convert/onnx.py)
    consumers = [n for n in g.node if norm in n.input]
    if not consumers:
        raise EdgecError("model.onnx: no final norm output '/model/norm/output_0' (not an edgec onnx folder?)")
    big = helper.make_tensor("/edgec/i64max", TensorProto.INT64, [1], [np.iinfo(np.int64).max])
    one = helper.make_tensor("/edgec/axis1", TensorProto.INT64, [1], [1])
    g.initializer.extend([big, one])
    g.node.append(helper.make_node("Slice", [norm, LOGITS_FROM, big.name, one.name], ["/edgec/norm_tail"],
                                   name="/edgec/LogitsFrom"))
    for n in consumers:
        n.input[list(n.input).index(norm)] = "/edgec/norm_tail"


class OnnxBackend(WindowedBackend):
    name = "onnx"

    def __init__(self, folder: str | Path, max_context: int | None = None, provider: str | None = None,
                 threads: int | None = None, share_buffers: bool | None = None, **_: object):
        ort = self.ort = require("onnxruntime", "onnx")
        onnx = require("onnx", "onnx")
        self.folder = Path(folder)
        manifest = load_json(self.folder / "edgec.json")
        self.config = GptOssConfig.from_dict(manifest["config"], str(self.folder / "edgec.json"))
        genai = load_json(self.folder / "genai_config.json")
        self.max_context = int(max_context or genai["model"]["context_length"])
        target = manifest.get("target", "onnx-cpu")
        provider = provider or PROVIDERS.get(target, "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            raise EdgecError(f"{self.folder}: target {target} needs onnxruntime's {provider}, which this "
                             f"onnxruntime build lacks (has: {', '.join(ort.get_available_providers())})")
        model = onnx.load(str(self.folder / "model.onnx"), load_external_data=False)
        _edit_graph(model)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=[provider])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32
        layer = lambda name: int(name.split(".")[1])  # noqa: E731  past_key_values.<layer>.<key|value>
        self.full = [i.name for i in past if not self.config.is_sliding(layer(i.name))]
        self.sliding = [i.name for i in past if self.config.is_sliding(layer(i.name))]
        self.share = provider == "CPUExecutionProvider" if share_buffers is None else share_buffers
        self.reset()

    # ---- cache -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.ids: list[int] = []
        self.buf: dict[str, np.ndarray] = {}  # name -> [1, kv heads, capacity, head dim]
        self.ort_values: dict = {}  # shared full layers: the OrtValue over each buffer (past and present at once)
        self.sw_start = 0  # absolute position of index 0 of the sliding buffers
        self._grow_full(1)
        cap = min(sliding_positions(self.config), self.max_context)
        for n in self.sliding:
            self.buf[n] = self._zeros(cap)

    def kv_bytes(self) -> int:
        return int(sum(b.nbytes for b in self.buf.values()))

    def _zeros(self, positions: int) -> np.ndarray:
        c = self.config
        return np.zeros((1, c.num_key_value_heads, positions, c.head_dim), dtype=self.dtype)

    def _grow_full(self, need: int) -> None:
        """Make the full layers' buffers hold `need` positions (growing by 1.5x, in FULL_CHUNK steps)."""
        have = self.buf[self.full[0]].shape[2] if self.full and self.full[0] in self.buf else 0
        cap = grown_capacity(need, have, self.max_context, FULL_CHUNK)
        if cap == have:
            return
        for n in self.full:
            new = self._zeros(cap)
            if n in self.buf:
                new[:, :, : self.length] = self.buf[n][:, :, : self.length]
            self.buf[n] = new
            if self.share:
                self.ort_values[n] = self.ort.OrtValue.ortvalue_from_numpy(new)

    def _slide(self, start: int, n: int) -> None:
        """Before writing n positions at `start`, move the sliding buffers so they keep the last window + margin."""
        if not self.sliding or start + n - self.sw_start <= self.buf[self.sliding[0]].shape[2]:
            return
        drop = start - (self.config.sliding_window + ROLLBACK_MARGIN) - self.sw_start
        for name in self.sliding:
            b = self.buf[name]
            b[:, :, : start - self.sw_start - drop] = b[:, :, drop : start - self.sw_start]
        self.sw_start += drop

    # ---- running -----------------------------------------------------------------------------------------
    def _run(self, chunk: np.ndarray, all_logits: bool) -> np.ndarray:
        start, n, w = self.length, chunk.size, self.config.sliding_window
        total = start + n
        self._grow_full(total)
        self._slide(start, n)
        past = min(start, w)  # sliding layers see the last `window` positions before this chunk
        a, b = start - past - self.sw_start, start - self.sw_start
        bind = self.session.io_binding()
        feeds = {"input_ids": chunk[None], "attention_mask": np.ones((1, total), dtype=np.int64),
                 SW_SEQLENS: np.array([past + n - 1], dtype=np.int32), SW_TOTAL: np.array(past + n, dtype=np.int32),
                 POSITIONS: np.arange(start, total, dtype=np.int64)[None],
                 LOGITS_FROM: np.array([0 if all_logits else n - 1], dtype=np.int64)}
        for k, v in feeds.items():
            bind.bind_cpu_input(k, v)
        bind.bind_output("logits")
        for name in self.full + self.sliding:  # get_outputs() follows this binding order
            present = name.replace("past_key_values.", "present.")
            if name in self.ort_values:
                bind.bind_ortvalue_input(name, self.ort_values[name])
                bind.bind_ortvalue_output(present, self.ort_values[name])
            else:
                fed = self.buf[name][:, :, a:b] if name in self.sliding else self.buf[name][:, :, :start]
                bind.bind_cpu_input(name, np.ascontiguousarray(fed))
                bind.bind_output(present)
        self.session.run_with_iobinding(bind)
        res = dict(zip(["logits", *self.full, *self.sliding], bind.get_outputs(), strict=True))
        for name in self.full + self.sliding:  # a copied present = what was fed + this chunk: keep the chunk
            if name not in self.ort_values:
                fed, at = (past, b) if name in self.sliding else (start, start)
                self.buf[name][:, :, at : at + n] = res[name].numpy()[:, :, fed:]
        self.ids.extend(int(t) for t in chunk)
        return res["logits"].numpy()[0]

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:  # noqa: ANN001
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise EdgecError("forward needs at least one token id")
        if self.length + ids.size > self.max_context:
            raise EdgecError(f"context full: {self.length} + {ids.size} tokens exceed max_context "
                             f"{self.max_context}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise EdgecError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        outs = [self._run(ids[s : s + CHUNK], all_logits) for s in range(0, ids.size, CHUNK)]
        return np.concatenate(outs if all_logits else outs[-1:]).astype(np.float32, copy=False)
