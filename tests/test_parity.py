"""`edgec parity`: passes a faithful conversion and catches real damage (each mutation is one test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.convert import run_convert
from edgec.parity import compare, run_parity
from edgec.safetensors_io import NP_DTYPE, SafetensorsFile, f32_to_bf16

EDGEC = [sys.executable, "-m", "edgec"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """One Harmony-text prompt and one 200-token sequence (past the 128-token sliding window)."""
    rng = np.random.default_rng(5)
    p = tmp_path_factory.mktemp("prompts") / "prompts.json"
    p.write_text(json.dumps(["What is the capital of France?",
                             {"name": "long", "ids": [int(t) for t in rng.integers(0, 199998, size=200)]}]))
    return p


def damaged(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "damaged"
    shutil.copytree(src, out)
    return out


def poke(folder: Path, name: str, fn) -> None:
    """Rewrite tensor `name` in place inside the folder's safetensors files: data = fn(data)."""
    for f in sorted(folder.glob("*.safetensors")):
        st = SafetensorsFile(f)
        if name in st.entries:
            e = st.entries[name]
            st.close()
            mm = np.memmap(f, dtype=NP_DTYPE[e["dtype"]], mode="r+", offset=st.data_start + e["offsets"][0],
                           shape=e["shape"])
            mm[...] = fn(np.array(mm))
            mm.flush()
            del mm
            return
    raise KeyError(name)


def edit_config(folder: Path, **kw) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_compare_metrics_on_known_values():
    ref = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = np.array([[0.0, 1.0, 2.5], [0.0, 3.0, 0.0]])
    m = compare(ref, out)
    assert m["max_abs"] == 3.0
    assert m["top1"] == 0.5
    assert m["max_kl"] > 0.5
    assert compare(ref, ref)["max_kl"] == 0.0 and compare(ref, ref)["min_cosine"] == pytest.approx(1.0)


def test_faithful_conversion_passes_with_junit_and_json(tiny, tiny_mlx, prompts, tmp_path):
    junit, js = tmp_path / "p.xml", tmp_path / "p.json"
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(tiny_mlx), "--prompts", str(prompts), "--tokens", "4",
                                "--junit", str(junit), "--json", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(js.read_text())
    assert report["passed"] and report["worst"]["top1"] == 1.0 and report["worst"]["greedy"] == 1.0
    assert [p["positions"] for p in report["prompts"]][1] == 200
    assert 'failures="0"' in junit.read_text() and junit.read_text().count("<testcase") == 2


def test_builtin_prompts_pass(tiny, tiny_mlx):
    report = run_parity(tiny, tiny_mlx, tokens=2)
    assert report["passed"], report["failures"]
    assert any(p["positions"] > 128 for p in report["prompts"])
    assert len(report["prompts"]) >= 3


MUTATIONS = {
    "corrupted expert weights": lambda out: poke(out, "model.layers.1.mlp.experts.down_proj.weight",
                                                 lambda a: a ^ np.uint32(0x11111111)),
    "swapped gate/up": lambda out: _swap(out, "model.layers.0.mlp.experts.gate_proj",
                                         "model.layers.0.mlp.experts.up_proj"),
    "missing sink": lambda out: poke(out, "model.layers.1.self_attn.sinks",
                                     lambda a: f32_to_bf16(np.full(a.shape, -1e4, np.float32))),
    "wrong rope": lambda out: edit_config(out, rope_theta=10000.0),
    "wrong sliding window": lambda out: edit_config(out, sliding_window=64),
}


def _swap(out: Path, a: str, b: str) -> None:
    for suffix in (".weight", ".scales", ".bias"):
        st = [SafetensorsFile(f) for f in sorted(out.glob("*.safetensors"))]
        va = next(s.raw(a + suffix).copy() for s in st if a + suffix in s.entries)
        vb = next(s.raw(b + suffix).copy() for s in st if b + suffix in s.entries)
        for s in st:
            s.close()
        poke(out, a + suffix, lambda _, v=vb: v)
        poke(out, b + suffix, lambda _, v=va: v)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_damage_is_caught(tiny, tiny_mlx, prompts, tmp_path, mutation):
    out = damaged(tiny_mlx, tmp_path)
    MUTATIONS[mutation](out)
    report = run_parity(tiny, out, prompts, tokens=2)
    assert not report["passed"] and report["failures"], mutation


def test_damage_fails_the_cli_with_exit_1(tiny, tiny_mlx, prompts, tmp_path):
    out = damaged(tiny_mlx, tmp_path)
    MUTATIONS["corrupted expert weights"](out)
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(out), "--prompts", str(prompts), "--tokens", "2",
                                "--json", "-"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert not json.loads(r.stdout)["passed"]
    assert "parity failed" in r.stderr and "Traceback" not in r.stderr


def test_bad_input_exits_2(tiny, tiny_mlx, tmp_path):
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(tiny)], capture_output=True, text=True)
    assert r.returncode == 2 and "not an edgec output" in r.stderr
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(tiny_mlx), "--prompts", str(bad)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_threshold_override_makes_it_fail(tiny, tiny_mlx, prompts):
    report = run_parity(tiny, tiny_mlx, prompts, tokens=1, overrides={"max_abs": 0.0})
    assert not report["passed"] and report["failures"][0].startswith("max_abs")


def test_lossy_recipe_is_judged_by_its_profile_bounds(tiny, prompts, tmp_path):
    """onnx-cpu --experts int4 is lossy: it passes its own measured bounds and fails the exact recipe's."""
    out = tmp_path / "int4"
    run_convert(tiny, "onnx-cpu", out, experts="int4", progress=False)
    report = run_parity(tiny, out, prompts, tokens=2)
    assert report["passed"], report["failures"]
    assert report["thresholds"]["top1"] < 1.0 and report["worst"]["top1"] < 1.0
    exact = run_parity(tiny, out, prompts, tokens=2, overrides={"top1": 1.0, "max_abs": 1e-3})
    assert not exact["passed"]


def test_exact_onnx_cpu_passes(tiny, prompts, tmp_path):
    out = tmp_path / "exact"
    run_convert(tiny, "onnx-cpu", out, progress=False)
    report = run_parity(tiny, out, prompts, tokens=4)
    assert report["passed"], report["failures"]
    assert report["worst"]["max_abs"] < 1e-3 and report["worst"]["greedy"] == 1.0
