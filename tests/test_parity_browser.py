"""`edgec parity SRC OUT --browser` (issue 21 part 2): OUT's onnx-webgpu graph in headless Chromium's WebGPU
(SwiftShader here) against the numpy reference on the source, with the profile's bounds.

Chromium + chromedriver come from .ci/run (apt), onnxruntime-web from `make setup` (npm ci --prefix edgec/web).
One short Harmony prompt and 4 greedy steps keep each run to a browser start plus ~40 positions; a second shape
(tests/independent_ckpt.py, `wide`) runs one shorter prompt.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgec.cli import main
from edgec.web import browser

EDGEC = [sys.executable, "-m", "edgec"]


@pytest.fixture(scope="module")
def w32(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pb") / "w32"
    subprocess.run([*EDGEC, "convert", str(tiny), "--target", "onnx-webgpu", "--dense", "fp32", "-o", str(out)],
                   check=True)
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("pb") / "prompts.json"
    text = "Say hi in three words, then count from one to twenty in French, Spanish and German, one number per line."
    path.write_text(json.dumps([text]))  # over 32 tokens: model.js feeds it in pieces of 16
    return path


def _parity(tiny, out, prompts, report):
    return CliRunner().invoke(main, ["parity", str(tiny), str(out), "--browser", "--prompts", str(prompts),
                                     "--tokens", "4", "--report", str(report)])


def _passes_with_placement(src, out, prompts, report):
    r = _parity(src, out, prompts, report)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["passed"] and not rep["failures"]
    assert rep["runtime"] == "onnxruntime-web" and rep["backend"] == "onnxruntime-web" and rep["variant"] == "fp32"
    assert rep["adapter"]["architecture"] == "swiftshader" and isinstance(rep["adapter"]["features"], list)
    assert 0 < rep["nodes_on_webgpu"] <= rep["nodes_total"]
    # the profile's bounds for the recipe (fp32 dense, int4 experts), as CPU parity takes them
    from edgec.parity import thresholds_for
    from edgec.targets import load_profile

    assert rep["thresholds"] == thresholds_for(load_profile("onnx-webgpu"), rep["recipe"])
    assert len(rep["prompts"][0]["greedy_target"]) == 4
    return rep


def test_browser_parity_passes_with_placement(tiny, w32, prompts, tmp_path):
    rep = _passes_with_placement(tiny, w32, prompts, tmp_path / "r.json")
    assert rep["prompts"][0]["positions"] > 20


def test_browser_parity_passes_on_another_shape(wide, tmp_path):
    """tests/independent_ckpt.py's checkpoint (not `edgec synth`): hidden 160, 5 q heads on 1 kv head, 6 experts
    top 3, MXFP4 scales over 10+ binades. One short prompt (~12 positions) keeps it to ~30 s."""
    out = tmp_path / "w32"
    subprocess.run([*EDGEC, "convert", str(wide), "--target", "onnx-webgpu", "--dense", "fp32", "-o", str(out)],
                   check=True)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hi in three words."]))
    rep = _passes_with_placement(wide, out, prompts, tmp_path / "r.json")
    assert rep["prompts"][0]["positions"] > 8


def test_tampered_experts_fail_browser_parity(tiny, w32, prompts, tmp_path):
    """Every int4 code of every expert matrix XOR 0x88 (each nibble moves by 8 of its 16 levels): the
    offsets come from the initializers' external-data info, so only expert bytes change."""
    bad = tmp_path / "bad"
    shutil.copytree(w32, bad)
    graph = onnx.load(str(bad / "model.edgec.onnx"), load_external_data=False).graph
    spans = [(int(d["offset"]), int(d["length"])) for t in graph.initializer
             if t.name.endswith(".qweight") and ".experts." in t.name
             for d in [{e.key: e.value for e in t.external_data}]]
    assert len(spans) == 2 * 3  # gate_up and down, 3 layers
    data = np.fromfile(bad / "model.onnx.data", dtype=np.uint8)
    for off, n in spans:
        data[off:off + n] ^= 0x88
    data.tofile(bad / "model.onnx.data")
    r = _parity(tiny, bad, prompts, tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert not rep["passed"] and rep["failures"] and rep["nodes_on_webgpu"] > 0


def test_placement_off_webgpu_fails():
    from edgec.web.runner import placement_failures

    on = {"WebGpuExecutionProvider": [["QMoE", "moe0"], ["MatMul", "lm_head"]],
          "CPUExecutionProvider": [["Shape", "s"]]}
    assert placement_failures(on) == []
    off = {**on, "CPUExecutionProvider": [["Shape", "s"], ["GroupQueryAttention", "attn0"]]}
    assert placement_failures(off) == ["GroupQueryAttention nodes run on CPUExecutionProvider, not WebGPU"]
    assert placement_failures({}) != []


def test_default_fp16_output_passes_widened(tiny, tmp_path, prompts):
    """`edgec convert SRC --target onnx-webgpu -o OUT && edgec parity SRC OUT --browser` (issue 21's "Done when"),
    on SwiftShader (no shader-f16): model.js runs model.f32.edgec.onnx, the fp16 weights widened in the page, with
    the profile's [parity."fp16+int4+fp32-widened"] bounds."""
    w16, report = tmp_path / "w16", tmp_path / "r.json"
    subprocess.run([*EDGEC, "convert", str(tiny), "--target", "onnx-webgpu", "-o", str(w16)], check=True)
    r = subprocess.run([*EDGEC, "parity", str(tiny), str(w16), "--browser", "--prompts", str(prompts), "--tokens", "4",
                        "--report", str(report)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["passed"] and rep["variant"] == "fp32-widened" and rep["recipe"]["dense"] == "fp16"
    assert rep["adapter"]["architecture"] == "swiftshader" and "shader-f16" not in rep["adapter"]["features"]
    assert 0 < rep["nodes_on_webgpu"] <= rep["nodes_total"]
    from edgec.parity import thresholds_for
    from edgec.targets import load_profile

    assert rep["thresholds"] == thresholds_for(load_profile("onnx-webgpu"), rep["recipe"], "fp32-widened")
    assert "fp16+int4+fp32-widened" in load_profile("onnx-webgpu")["parity"]


def test_fp16_output_without_f32_graph_is_one_line(tiny, tmp_path, prompts):
    """An fp16 output as older edgec wrote it (no model.f32.edgec.onnx) on an adapter without shader-f16."""
    w16 = tmp_path / "w16"
    subprocess.run([*EDGEC, "convert", str(tiny), "--target", "onnx-webgpu", "-o", str(w16)], check=True)
    (w16 / "model.f32.edgec.onnx").unlink()
    m = json.loads((w16 / "edgec.json").read_text())
    del m["files"]["model.f32.edgec.onnx"], m["recipe"]["variants"], m["recipe"]["widened"]
    (w16 / "edgec.json").write_text(json.dumps(m))
    r = _parity(tiny, w16, prompts, tmp_path / "r.json")
    assert r.exit_code == 2 and "--dense fp32" in r.output and "shader-f16" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_missing_js_or_other_target_is_one_line(tiny, tiny_onnx, w32, prompts, tmp_path, monkeypatch):
    r = _parity(tiny, tiny_onnx, prompts, tmp_path / "r.json")
    assert r.exit_code == 2 and "onnx-webgpu" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    monkeypatch.setattr(browser, "ORT_DIST", tmp_path / "absent")
    r = _parity(tiny, w32, prompts, tmp_path / "r.json")
    assert r.exit_code == 3 and "npm ci --prefix edgec/web" in r.output and len(r.output.strip().splitlines()) == 1
