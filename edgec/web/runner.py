"""`edgec parity OUT --browser`: OUT's onnx-webgpu graph in headless Chromium on onnxruntime-web's WebGPU EP.

`BrowserBackend` has the two calls edgec/parity.py makes of a runtime backend (`reset()`, `forward(ids,
all_logits)`), each a round trip to static/parity.js, which runs static/model.js (the one in-browser runner).
`placement_failures` names the compute nodes ORT did not place on WebGPU.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgecError
from . import browser

COMPUTE_OPS = ("MatMul", "MatMulNBits", "QMoE", "GroupQueryAttention", "MultiHeadAttention", "Attention")
WIDENED = "fp32-widened"  # the variant of an fp16 output run as its f32 graph (reported, and its bounds' key)
ROWS = 16  # logits rows per round trip (16 x 201k float32 = 13 MB of base64)

CALL_JS = """const done = arguments[arguments.length - 1], [fn, args] = [arguments[0], arguments[1]];
(async () => window.parity[fn](...args))().then(v => done({value: v}), e => done({error: String(e)}));"""


class BrowserBackend:
    name = "onnxruntime-web"
    precision = None

    def __init__(self, driver: Any, vocab: int, info: dict[str, Any]):
        self.driver, self.vocab, self.info = driver, vocab, info

    def call(self, fn: str, *args: Any) -> Any:
        got = self.driver.execute_async_script(CALL_JS, fn, list(args))
        if "error" in got:
            raise EdgecError(f"onnxruntime-web: {fn}: {got['error']}")
        return got["value"]

    def reset(self) -> None:
        self.call("reset")

    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        n = self.call("forward", [int(t) for t in ids], all_logits)
        parts = [np.frombuffer(base64.b64decode(self.call("rows", s, min(s + ROWS, n))), dtype="<f4")
                 for s in range(0, n, ROWS)]
        return np.concatenate(parts).reshape(n, self.vocab)


def placement_failures(placement: dict[str, list[list[str]]]) -> list[str]:
    """One line per compute op type (MatMul*, QMoE, attention) with nodes off WebGPU; one if there is no placement."""
    if not placement:
        return ["no node placement in onnxruntime-web's log (model.js reads VerifyEachNodeIsAssignedToAnEp)"]
    off: dict[str, set[str]] = {}
    for ep, nodes in placement.items():
        if ep != "WebGpuExecutionProvider":
            for op, _ in nodes:
                if op in COMPUTE_OPS:
                    off.setdefault(op, set()).add(ep)
    return [f"{op} nodes run on {', '.join(sorted(eps))}, not WebGPU" for op, eps in sorted(off.items())]


@contextlib.contextmanager
def open_browser(out: Path, manifest: Any, max_context: int) -> Iterator[BrowserBackend]:
    """Chromium on OUT (an onnx-webgpu output): one line, exit 2, for another target or an fp16 output without
    model.f32.edgec.onnx on an adapter without shader-f16; exit 3 for a missing chromium/chromedriver/selenium/
    onnxruntime-web."""
    if manifest.target != "onnx-webgpu":
        raise EdgecError(f"{out}: target is {manifest.target}; --browser runs onnx-webgpu outputs "
                         f"(`edgec convert SRC --target onnx-webgpu --dense fp32 -o OUT`)")
    routes = {"/": browser.STATIC, "/static/": browser.STATIC, "/ort/": browser.require_js(), "/model/": Path(out)}
    with browser.serve(routes) as base, browser.chrome() as driver:
        driver.get(base + "/parity.html")
        gpu = browser.adapter(driver)
        io = manifest.recipe.get("io_dtype", "fp16")
        f32 = manifest.recipe.get("variants", {}).get("fp32")  # an fp16 output's widened graph (model.js)
        if io != "fp32" and not f32 and "shader-f16" not in gpu["features"]:
            raise EdgecError(f"{out}: fp16 activations without model.f32.edgec.onnx, and this WebGPU adapter "
                             f"({gpu.get('architecture')}) has no shader-f16: convert again with this edgec, or "
                             f"with `edgec convert SRC --target onnx-webgpu --dense fp32`")
        info = BrowserBackend(driver, manifest.config.vocab_size, {}).call("load", max_context)
        backend = BrowserBackend(driver, manifest.config.vocab_size, info)
        if info.get("widened"):  # bounds: the profile's [parity."<dense>+<experts>+fp32-widened"] (parity.py)
            backend.precision = WIDENED
        yield backend
