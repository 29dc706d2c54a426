"""edgec's own onnxruntime loop over an onnx-* output folder: past/present KV arrays it owns, exact rollback.

onnxruntime-genai runs the same folder (its generator manages a sliding-window cache it cannot roll back and
only exposes the logits of its last step); this loop instead keeps every layer's whole K/V history as numpy
arrays, so `truncate(n)` is a slice and `forward(..., all_logits=True)` returns every position. The graph is
the folder's model.onnx with GroupQueryAttention's `sliding_window_cache` switched off (the 128-key window is
still applied by `local_window_size`), loaded from memory with the weights memory-mapped from model.onnx.data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgecError, require
from ..spec import GptOssConfig, load_json
from .base import Backend

CHUNK = 256  # prompt tokens per session run: bounds the [chunk, vocab] logits buffer

PROVIDERS = {"onnx-cpu": "CPUExecutionProvider", "onnx-cuda": "CUDAExecutionProvider",
             "onnx-dml": "DmlExecutionProvider", "onnx-webgpu": "WebGpuExecutionProvider",
             "onnx-trt-rtx": "NvTensorRTRTXExecutionProvider"}


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, folder: str | Path, max_context: int | None = None, provider: str | None = None,
                 threads: int | None = None, **_: object):
        ort = require("onnxruntime", "onnx")
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
        for node in model.graph.node:
            if node.op_type == "GroupQueryAttention":
                for a in [a for a in node.attribute if a.name == "sliding_window_cache"]:
                    node.attribute.remove(a)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=[provider])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        nkv, hd = self.config.num_key_value_heads, self.config.head_dim
        self._empty = np.zeros((1, nkv, 0, hd), dtype=self.dtype)
        self.reset()

    @property
    def length(self) -> int:
        return self._len

    def reset(self) -> None:
        self.kv = {n: self._empty for n in self.past_names}
        self._len = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._len:
            raise EdgecError(f"cannot truncate a cache of {self._len} tokens to {n}")
        self.kv = {k: v[:, :, :n] for k, v in self.kv.items()}
        self._len = n

    def kv_bytes(self) -> int:
        return int(sum(v.nbytes for v in self.kv.values()))

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._len + ids.size > self.max_context:
            raise EdgecError(f"context full: {self._len} + {ids.size} tokens exceed max_context {self.max_context}")
        outs = []
        for s in range(0, ids.size, CHUNK):
            chunk = ids[s:s + CHUNK]
            total = self._len + chunk.size
            feeds = {"input_ids": chunk[None], "attention_mask": np.ones((1, total), dtype=np.int64), **self.kv}
            res = self.session.run(["logits", *self.present_names], feeds)
            self.kv = dict(zip(self.past_names, res[1:], strict=False))
            self._len = total
            lg = res[0][0]
            outs.append(lg if all_logits else lg[-1:])
        if not all_logits:
            outs = outs[-1:]
        return np.concatenate(outs).astype(np.float32, copy=False)
