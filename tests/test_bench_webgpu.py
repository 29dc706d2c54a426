"""bench/bench_webgpu.py runs: the WebGPU row (headless Chromium, onnxruntime-web) beside onnx-cpu on the same weights,
with the adapter named. No timing is asserted (speed lives in the bench's output, not in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_webgpu_prints_both_rows(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_webgpu.py"), str(tiny), "--work", str(tmp_path),
                        "--prompt", "8", "--tokens", "2", "--json"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    web, cpu = res["rows"]
    assert web["runtime"].startswith("onnxruntime-web") and cpu["runtime"] == "edgec onnx-cpu"
    assert web["adapter"]["architecture"] and web["variant"] == "fp32"
    for row in (web, cpu):
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and len(row["tokens"]) == 2
    assert res["webgpu_over_cpu"]["decode_tok_s"] == web["decode_tok_s"] / cpu["decode_tok_s"]
