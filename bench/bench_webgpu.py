"""The WebGPU row: prefill and decode tok/s of an onnx-webgpu graph in headless Chromium (onnxruntime-web's WebGPU
EP, the page's own runner static/model.js, timed inside the page), beside edgec's onnx-cpu loop on the same weights
(`--experts int4 --dense fp32 --lm-head fp32`), same prompt, same run.

    PYTHONPATH=$PWD python bench/bench_webgpu.py SRC [--work DIR] [--prompt 64] [--tokens 16] [--json]

SRC is a checkpoint (default: `edgec synth --preset tiny` in WORK). Both outputs are converted from it into WORK.
On SwiftShader (a software GPU) the ratio only guards regressions; on a real adapter it is the figure."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EDGEC = [sys.executable, "-m", "edgec"]


def convert(src: Path, out: Path, *args: str) -> Path:
    if not (out / "edgec.json").is_file():
        subprocess.run([*EDGEC, "convert", str(src), *args, "-o", str(out), "--force"], check=True,
                       capture_output=True)
    return out


def browser_row(out: Path, ids: list[int], n: int) -> dict:
    from edgec.manifest import read as read_manifest
    from edgec.web.runner import open_browser

    with open_browser(out, read_manifest(out), len(ids) + n + 16) as b:
        b.call("bench", ids[:4], 2)  # warm-up: shader compilation
        r = b.call("bench", ids, n)
        return {"runtime": "onnxruntime-web (WebGPU)", "adapter": b.info["adapter"], "variant": b.info["variant"],
                "nodes_on_webgpu": f"{b.info['nodesOnWebgpu']} of {b.info['nodesTotal']}",
                "prefill_tok_s": len(ids) / r["prefill_s"], "decode_tok_s": n / r["decode_s"], "tokens": r["tokens"]}


def cpu_row(out: Path, ids: list[int], n: int) -> dict:
    from edgec.runtime.base import load_backend

    b = load_backend(out, max_context=len(ids) + n + 16)
    b.forward(ids[:4])  # warm-up
    b.reset()
    t0 = time.perf_counter()
    logits = b.forward(ids)
    prefill = time.perf_counter() - t0
    tokens, t0 = [], time.perf_counter()
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1] if logits.ndim > 1 else logits)))
        logits = b.forward([tokens[-1]])
    return {"runtime": "edgec onnx-cpu", "prefill_tok_s": len(ids) / prefill,
            "decode_tok_s": n / (time.perf_counter() - t0), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_webgpu-"))
    src = a.src
    if src is None:
        src = work / "tiny"
        if not (src / "config.json").is_file():
            subprocess.run([*EDGEC, "synth", str(src), "--preset", "tiny"], check=True, capture_output=True)
    web = convert(src, work / "webgpu", "--target", "onnx-webgpu", "--dense", "fp32")
    cpu = convert(src, work / "cpu", "--target", "onnx-cpu", "--experts", "int4", "--dense", "fp32",
                  "--lm-head", "fp32")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = [int(v) for v in np.random.default_rng(0).integers(0, min(vocab, 200000), a.prompt)]
    rows = [browser_row(web, ids, a.tokens), cpu_row(cpu, ids, a.tokens)]
    ratio = {k: rows[0][k] / rows[1][k] for k in ("prefill_tok_s", "decode_tok_s")}
    if a.json:
        print(json.dumps({"prompt": a.prompt, "tokens": a.tokens, "rows": rows, "webgpu_over_cpu": ratio}, indent=2))
        return
    ad = rows[0]["adapter"]
    print(f"prompt {a.prompt} tokens, {a.tokens} new, greedy; WebGPU adapter {ad.get('vendor')}/"
          f"{ad.get('architecture')} ({rows[0]['variant']}), {rows[0]['nodes_on_webgpu']} nodes on WebGPU")
    for r in rows:
        print(f"{r['runtime']:<26} prefill {r['prefill_tok_s']:9.1f} tok/s   decode {r['decode_tok_s']:8.2f} tok/s")
    print(f"WebGPU / onnx-cpu: prefill {ratio['prefill_tok_s']:.4f}x, decode {ratio['decode_tok_s']:.4f}x; "
          f"same greedy ids: {rows[0]['tokens'] == rows[1]['tokens']}")


if __name__ == "__main__":
    main()
