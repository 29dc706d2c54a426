"""An fp16 onnx-webgpu output's float32 variant (model.f32.edgec.onnx) as a folder edgec runs on onnxruntime's CPU
provider: the widened files materialised (as model.js builds them in the browser), the f32 graph as
model.edgec.onnx, the real data files hard-linked, edgec.json's recipe saying fp32 on CPUExecutionProvider."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from edgec.convert.onnx_graph import EDGEC_GRAPH, F32_GRAPH, materialize_wide
from edgec.fsutil import sha256_file
from edgec.manifest import NAME


def widened_folder(out: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    m = json.loads((out / NAME).read_text())
    table = m["recipe"]["widened"]
    for p in out.iterdir():
        if p.name not in (NAME, EDGEC_GRAPH, F32_GRAPH):
            try:
                os.link(p, dst / p.name)
            except OSError:  # another filesystem
                shutil.copyfile(p, dst / p.name)
    shutil.copyfile(out / F32_GRAPH, dst / EDGEC_GRAPH)
    made = materialize_wide(out, table, dst)
    for p in [dst / EDGEC_GRAPH, *made]:
        m["files"][p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    del m["files"][F32_GRAPH]
    m["recipe"] = {**m["recipe"], "io_dtype": "fp32", "execution_provider": "CPUExecutionProvider"}
    (dst / NAME).write_text(json.dumps(m, indent=2) + "\n")
    return dst
