"""bench/gpu_check.py, the prepared GPU check: its wheel parts survive the trip, and its CPU dry run keeps working
between GPU lends (every step it can run on CPU runs, the fp4 graph is an expected skip, the report is complete)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wheel_parts_roundtrip(gc, tmp_path):
    """Wheels cut into parts, carried one part per call in any order, come back byte for byte; a part not yet carried
    is named; a damaged chunk is caught by the sha256 and its wheel is not joined."""
    rng = np.random.default_rng(0)
    wheels = []
    for group, name, size in (("onnx", "a-1.0-py3-none-any.whl", 3_500_000), ("onnx", "b-2.0-py3-none-any.whl", 100),
                              ("mlx", "c-3.0-py3-none-any.whl", 2_600_000)):
        p = tmp_path / "w" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(rng.bytes(size))
        wheels.append((group, p))
    manifest = gc.split_parts(wheels, tmp_path / "parts", (1 << 20) + 2_000_000)  # 2 MB of chunks per part
    parts = sorted((tmp_path / "parts").glob("part-*.tar"))
    assert [p.name for p in parts] == manifest["parts"] and len(parts) == 4
    assert all(p.stat().st_size < (1 << 20) + 2_000_000 for p in parts)

    stash = tmp_path / "stash"
    st = gc.stash_parts([parts[2]], stash)
    assert st["groups"] == {"onnx": False, "mlx": False} and st["complete"] == []
    assert st["missing_parts"] == ["part-01.tar", "part-02.tar", "part-04.tar"]
    st = gc.stash_parts(parts[:2], stash)  # a and b whole; c still lacks part 4
    assert st["groups"] == {"onnx": True, "mlx": False} and st["missing_parts"] == ["part-04.tar"]
    st = gc.stash_parts(parts[:2] + parts[3:], stash)  # carrying a part twice is harmless
    assert st["groups"] == {"onnx": True, "mlx": True} and st["errors"] == [] and st["missing_parts"] == []
    for _, w in wheels:
        assert (stash / "wheels" / w.name).read_bytes() == w.read_bytes()
    assert list((stash / "chunks").iterdir()) == []

    bad = tmp_path / "stash-bad"
    gc.stash_parts(parts[:3], bad)
    chunk = next((bad / "chunks").glob("c-3.0*"))
    chunk.write_bytes(b"x" + chunk.read_bytes()[1:])
    st = gc.stash_parts(parts[3:], bad)
    assert st["groups"]["mlx"] is False and "sha256" in st["errors"][0]
    assert not (bad / "wheels" / "c-3.0-py3-none-any.whl").exists()


def test_pins_name_wheels_for_the_gpu_image(gc):
    """One version of each, CUDA 13 builds (the lent machine's image is CUDA 13), the ONNX group first."""
    pins = [p for group in gc.PINS.values() for p in group]
    names = [p.split("==")[0] for p in pins]
    assert len(set(names)) == len(names) and all("==" in p for p in pins)
    assert {"onnxruntime-gpu", "onnxruntime-genai-cuda", "mlx", "mlx-cuda-13", "mlx-lm"} == set(names)
    assert list(gc.PINS) == ["onnx", "mlx"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run([sys.executable, str(SCRIPT), "run", "--dry-run", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert (out / "gpu-check.json").is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text(), out


@pytest.mark.float_sensitive
def test_dry_run_runs_every_cpu_step(dry):
    r, doc, _, _ = dry
    steps = {s["name"]: s for s in doc["steps"]}
    assert doc["mode"] == "dry-run" and doc["counts"]["error"] == 0 and doc["counts"]["timeout"] == 0, \
        [(s["name"], s.get("error")) for s in doc["steps"] if s["status"] in ("error", "timeout")]
    assert r.returncode == 0, r.stdout[-2000:]  # every CPU-runnable step passes, parity bounds included
    expected = {"install", "runtimes", "synth/tiny", "builder/cuda-int4",
                *(f"convert/tiny/{n}" for n in ("onnx-cuda-mxfp4", "onnx-cuda-exact", "onnx-trt-rtx", "mlx")),
                *(f"parity/tiny/{n}/{rt}" for n in ("onnx-cuda-mxfp4", "onnx-cuda-exact", "onnx-trt-rtx")
                  for rt in ("edgec-loop", "genai")), "parity/tiny/mlx/edgec-mlx",
                *(f"bench/tiny-onnx-cuda-exact/{rt}" for rt in ("edgec-loop", "genai")),
                "bench/tiny-mlx/edgec-mlx", "bench/tiny-mlx/mlx-lm", "bench/tiny-builder-cuda-int4/genai",
                "bench/tiny-onnx-webgpu/onnxruntime-web"}  # the browser row: SwiftShader in the dry run
    assert set(steps) == expected
    skipped = {n for n, s in steps.items() if s["status"] == "skip"}
    assert skipped == {"install", "parity/tiny/onnx-cuda-mxfp4/edgec-loop", "parity/tiny/onnx-cuda-mxfp4/genai"}
    assert all("fp4" in steps[n]["reason"] for n in skipped - {"install"})
    assert all(s["status"] == "ok" for n, s in steps.items() if not n.startswith("parity/") and n not in skipped)
    assert all(s["status"] == "ok" for n, s in steps.items() if n.startswith("parity/") and n not in skipped)
    assert doc["info"]["runtimes"]["onnxruntime"]["providers"]
    assert doc["info"]["runtimes"]["mlx"]["sum"] == 256.0 * 256 * 256  # mlx ran a kernel


@pytest.mark.float_sensitive
def test_dry_run_figures_agree(dry):
    """Two runtimes on one graph agree: edgec's loop and onnxruntime-genai's generator score the same against the
    reference and decode the same greedy tokens; the MLX folder passes its near-exact bounds."""
    _, doc, _, _ = dry
    res = {s["name"]: s.get("result") or {} for s in doc["steps"]}
    for folder in ("onnx-cuda-exact", "onnx-trt-rtx"):
        loop, genai = res[f"parity/tiny/{folder}/edgec-loop"], res[f"parity/tiny/{folder}/genai"]
        assert loop["backend"] == "onnx" and genai["backend"] == "onnxruntime-genai"
        assert abs(loop["worst"]["max_abs"] - genai["worst"]["max_abs"]) < 1e-3, (loop["worst"], genai["worst"])
        assert loop["worst"]["top1"] == genai["worst"]["top1"]
    assert res["parity/tiny/mlx/edgec-mlx"]["passed"] is True
    loop, genai = res["bench/tiny-onnx-cuda-exact/edgec-loop"], res["bench/tiny-onnx-cuda-exact/genai"]
    assert loop["out_tokens"] == genai["out_tokens"] and len(loop["out_tokens"]) == loop["tokens"]
    for name, r in res.items():
        if name.startswith("bench/"):
            assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mib"] > 0, (name, r)
    assert res["bench/tiny-mlx/edgec-mlx"]["mlx_peak_bytes"] > 0


def test_dry_run_report(dry):
    _, doc, md, out = dry
    assert md.startswith("# edgec GPU check (dry-run)")
    for heading in ("## Parity", "## Benchmarks", "## Steps"):
        assert heading in md
    for s in doc["steps"]:
        assert f"| {s['name']} | {s['status']} |" in md
    assert (out / "gpu-check-logs.tar.gz").stat().st_size > 0


def test_gpu_poll_reads_nvml(gc, monkeypatch):
    """Peak GPU memory (a GPU-only path, run here against a stand-in NVML): the device's peak over its baseline and
    the child's own peak from the process list."""
    import time
    import types

    used = iter([1000, 5000, 3000] + [3000] * 1000)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=next(used) << 20),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=42, usedGpuMemory=3500 << 20),
                                                        types.SimpleNamespace(pid=7, usedGpuMemory=9 << 30)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gc, "_NVML", None)
    baseline = gc.gpu_memory()[0]
    assert baseline == 1000 << 20
    poll = gc.GpuPoll(42, baseline)
    time.sleep(0.5)
    assert poll.result() == {"gpu_peak_device_mib": 4000.0, "gpu_peak_process_mib": 3500.0}
