"""WebGPU row: prefill and decode tok/s of an onnx-webgpu output in headless Chromium (onnxruntime-web's WebGPU EP,
static/model.js, driven by edgec/web/runner.py), beside onnx-cpu (edgec's own onnx loop) on the same weights, same
prompt, same run.

    .venv/bin/python bench/bench_webgpu.py [--src SRC] [--work /tmp/bench_webgpu] [--prompt 64] [--tokens 16]

SRC defaults to the tiny synth (`edgec synth WORK/src --preset tiny`). Both outputs hold the same weights: int4
experts, fp32 dense and lm_head (`--target onnx-webgpu --dense fp32` runs on adapters without shader-f16, SwiftShader
here; `--target onnx-cpu --experts int4 --dense fp32 --lm-head fp32`). The prompt is `edgec bench`'s (random ids,
seed 0); greedy decode. The browser's figures are timed inside the page (performance.now), so no logits cross to
Python; model.js feeds a prompt in pieces of 16 tokens. On SwiftShader (a software GPU) the ratio only guards
regressions. Numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgec import manifest as mf
from edgec.bench import measure
from edgec.web.runner import open_browser

PY = sys.executable


def convert(src: Path, out: Path, *options: str) -> Path:
    subprocess.run([PY, "-m", "edgec", "convert", str(src), *options, "--force", "-o", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def webgpu(out: Path, prompt: int, tokens: int) -> dict:
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=prompt)]  # edgec bench's prompt
    with open_browser(out, mf.verify(out), prompt + tokens) as backend:
        got = backend.call("bench", ids, tokens)
        a = backend.info["adapter"]
    return {"prefill_tok_s": prompt / got["prefill_s"], "decode_tok_s": (tokens - 1) / got["decode_s"],
            "adapter": a["description"] or " ".join(x for x in (a["vendor"], a["architecture"]) if x),
            "variant": backend.info["variant"], "nodes_total": backend.info["nodesTotal"],
            "nodes_on_webgpu": backend.info["nodesOnWebgpu"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=None, help="checkpoint (default: the tiny synth in WORK/src)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_webgpu"))
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens (the first comes from the prefill)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    if a.tokens < 2 or a.prompt < 1:
        sys.exit("bench_webgpu: --tokens must be >= 2 and --prompt >= 1")
    src = a.src or a.work / "src"
    if not (src / "config.json").is_file():
        subprocess.run([PY, "-m", "edgec", "synth", str(src), "--preset", "tiny"], check=True,
                       stdout=subprocess.DEVNULL)
    web = convert(src, a.work / "webgpu", "--target", "onnx-webgpu", "--dense", "fp32")
    cpu = convert(src, a.work / "cpu", "--target", "onnx-cpu", "--experts", "int4", "--dense", "fp32",
                  "--lm-head", "fp32")
    rows = {"webgpu": webgpu(web, a.prompt, a.tokens), "onnx-cpu": measure("edgec", cpu, a.prompt, a.tokens)}
    if "error" in rows["onnx-cpu"]:
        sys.exit(f"bench_webgpu: onnx-cpu: {rows['onnx-cpu']['error']}")
    print(f"prompt {a.prompt} tokens, {a.tokens} greedy tokens, source {src}")
    for name, r in rows.items():
        print(f"{name:9s} prefill {r['prefill_tok_s']:9.1f} tok/s  decode {r['decode_tok_s']:8.1f} tok/s")
    w, c = rows["webgpu"], rows["onnx-cpu"]
    print(f"ratio webgpu/onnx-cpu: prefill {w['prefill_tok_s'] / c['prefill_tok_s']:.3f}  "
          f"decode {w['decode_tok_s'] / c['decode_tok_s']:.3f}")
    print(f"adapter {w['adapter']} ({w['variant']} variant): {w['nodes_on_webgpu']} of {w['nodes_total']} nodes "
          f"on WebGPU")
    if a.json:
        a.json.write_text(json.dumps({"prompt": a.prompt, "tokens": a.tokens, **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
