"""bench/bench_webgpu.py on the tiny fixture: the WebGPU row (headless Chromium, onnxruntime-web) and the onnx-cpu
row from the same run, with the ratio and the adapter. No timing assertions (speed figures live in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_webgpu.py"


def test_bench_webgpu_prints_both_rows(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--src", str(tiny), "--work", str(tmp_path), "--prompt", "8",
                        "--tokens", "3", "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines if "prefill" in ln and "tok/s" in ln] == ["webgpu", "onnx-cpu"]
    assert any(ln.startswith("ratio webgpu/onnx-cpu: prefill ") for ln in lines)
    res = json.loads((tmp_path / "r.json").read_text())
    for row in ("webgpu", "onnx-cpu"):
        assert res[row]["prefill_tok_s"] > 0 and res[row]["decode_tok_s"] > 0
    w = res["webgpu"]
    assert w["variant"] == "fp32" and w["adapter"] and 0 < w["nodes_on_webgpu"] <= w["nodes_total"]
    assert f"adapter {w['adapter']} (fp32 variant): {w['nodes_on_webgpu']} of {w['nodes_total']} nodes" in r.stdout
    assert json.loads((tmp_path / "webgpu" / "edgec.json").read_text())["target"] == "onnx-webgpu"


def test_bench_webgpu_refuses_a_bad_request(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--tokens", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "bench_webgpu: --tokens must be >= 2 and --prompt >= 1"
