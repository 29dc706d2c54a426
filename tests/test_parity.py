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
from edgec.fsutil import sha256_file
from edgec.manifest import config_sha256
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
                                "--junit", str(junit), "--report", str(js)], capture_output=True, text=True)
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


def resign(out: Path) -> None:
    """Record the damaged files in edgec.json, as a converter bug would write them: then only numerics can tell."""
    m = json.loads((out / "edgec.json").read_text())
    for name, info in m["files"].items():
        info.update(sha256=sha256_file(out / name), bytes=(out / name).stat().st_size)
    (out / "edgec.json").write_text(json.dumps(m))


MUTATIONS = {
    "corrupted expert weights": lambda out: poke(out, "model.layers.1.mlp.experts.down_proj.weight",
                                                 lambda a: a ^ np.uint32(0x11111111)),
    "swapped gate/up": lambda out: _swap(out, "model.layers.0.mlp.experts.gate_proj",
                                         "model.layers.0.mlp.experts.up_proj"),
    "missing sink": lambda out: poke(out, "model.layers.1.self_attn.sinks",
                                     lambda a: f32_to_bf16(np.full(a.shape, -1e4, np.float32))),
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
    resign(out)
    report = run_parity(tiny, out, prompts, tokens=2)
    assert not report["passed"] and report["failures"], mutation


def test_damage_fails_the_cli_with_exit_1(tiny, tiny_mlx, prompts, tmp_path):
    out = damaged(tiny_mlx, tmp_path)
    MUTATIONS["corrupted expert weights"](out)
    resign(out)
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(out), "--prompts", str(prompts), "--tokens", "2",
                                "--json"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert not json.loads(r.stdout)["passed"]
    assert "parity failed" in r.stderr and "Traceback" not in r.stderr


def edit_manifest(out: Path, fn, digest: bool = False) -> None:
    m = json.loads((out / "edgec.json").read_text())
    fn(m)
    if digest:  # as someone who knows the format would: the config's own sha256 recomputed
        m["config_sha256"] = config_sha256(m["config"])
    (out / "edgec.json").write_text(json.dumps(m))


def zero_hashes(m):
    for info in m["files"].values():
        info["sha256"] = "0" * 64


# edits the manifest sees: (folder fixture, edit, re-sign the files, what the one line says)
EDITS = {
    "zeroed sha256": ("tiny_mlx", lambda out: edit_manifest(out, zero_hashes), False, "sha256 differs"),
    "unrecorded weight damage": ("tiny_mlx", MUTATIONS["corrupted expert weights"], False, "sha256 differs"),
    "wrong rope in config.json": ("tiny_mlx", lambda out: edit_config(out, rope_theta=10000.0), True,
                                  "config.json: describes another model"),
    "wrong window in config.json": ("tiny_mlx", lambda out: edit_config(out, sliding_window=64), True,
                                    "config.json: describes another model"),
    "manifest config edited": ("tiny_mlx", lambda out: edit_manifest(
        out, lambda m: m["config"].update(rope_theta=10000.0)), False, "its config was edited after conversion"),
    "mlx manifest and config.json edited alike": ("tiny_mlx", lambda out: (
        edit_config(out, rope_theta=10000.0),
        edit_manifest(out, lambda m: m["config"].update(rope_theta=10000.0), digest=True)), True,
        "was converted from another model"),
    "string recipe": ("tiny_mlx", lambda out: edit_manifest(out, lambda m: m.update(recipe="exact")), False,
                      "'recipe' must be a JSON object"),
    "list runtime": ("tiny_mlx", lambda out: edit_manifest(out, lambda m: m.update(runtime=[1])), False,
                     "'runtime' must be a string"),
    "shard dropped from files": ("tiny_mlx", lambda out: edit_manifest(out, lambda m: m["files"].pop(
        next(n for n in m["files"] if n.endswith(".safetensors")))), False, "not recorded in edgec.json"),
    "no files at all": ("tiny_onnx", lambda out: edit_manifest(out, lambda m: m.update(files={})), False,
                        "not recorded in edgec.json"),
    "onnx layers=1": ("tiny_onnx", lambda out: edit_manifest(
        out, lambda m: m["config"].update(num_hidden_layers=1, layer_types=["sliding_attention"]), digest=True),
        False, "genai_config.json: describes another model"),
    "onnx sliding_window -1": ("tiny_onnx", lambda out: edit_manifest(
        out, lambda m: m["config"].update(sliding_window=-1), digest=True), False, "sliding_window must be at least 1"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_the_manifest_is_verified(request, tiny, prompts, tmp_path, edit):
    """parity and every runtime load check the folder against edgec.json: one line, exit 2."""
    fixture, change, sign, fragment = EDITS[edit]
    out = damaged(request.getfixturevalue(fixture), tmp_path)
    change(out)
    if sign:
        resign(out)
    for args in (["parity", str(tiny), str(out), "--prompts", str(prompts), "--tokens", "1"],
                 ["logits", str(out), "--ids", "1,2", "--out", str(tmp_path / "l.npy")]):
        r = subprocess.run(EDGEC + args, capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], (args[0], r.stderr[-3000:])
        if "was converted from" in fragment:
            break  # the mlx runtime runs such a folder; only parity knows the source
    assert not (tmp_path / "l.npy").exists()


def test_full_hashes_on_request(tiny, tiny_onnx, prompts, tmp_path):
    """model.onnx.data is over the cheap check's size: only --verify-hashes reads it."""
    from edgec import manifest

    out = damaged(tiny_onnx, tmp_path)
    edit_manifest(out, lambda m: m["files"]["model.onnx.data"].update(sha256="0" * 64))
    assert (out / "model.onnx.data").stat().st_size > manifest.SMALL_FILE
    assert manifest.problems(manifest.read(out)) == []
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(out), "--prompts", str(prompts), "--tokens", "1",
                                "--verify-hashes"], capture_output=True, text=True)
    assert r.returncode == 2 and "model.onnx.data: sha256 differs" in r.stderr


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


@pytest.mark.float_sensitive
def test_exact_onnx_cpu_passes(tiny, prompts, tmp_path):
    out = tmp_path / "exact"
    run_convert(tiny, "onnx-cpu", out, progress=False)
    report = run_parity(tiny, out, prompts, tokens=4)
    assert report["passed"], report["failures"]
    assert report["worst"]["max_abs"] < 1e-3 and report["worst"]["greedy"] == 1.0


# ---- non-finite logits -----------------------------------------------------------------------------------------
def nan_row(folder: Path, row: int = 5) -> None:
    """lm_head row `row` becomes NaN: exactly one non-finite logit per position."""
    def fn(a):
        a = a.copy()
        a[row] = 0x7FC0
        return a
    poke(folder, "lm_head.weight", fn)


def test_a_nan_output_fails_and_is_named(tiny, tiny_mlx, prompts, tmp_path):
    out = damaged(tiny_mlx, tmp_path)
    nan_row(out)
    resign(out)
    r = subprocess.run(EDGEC + ["parity", str(tiny), str(out), "--prompts", str(prompts), "--tokens", "2",
                                "--json", "--top1", "0", "--greedy", "0"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert any("non-finite logits from the target" in f for f in report["failures"])
    assert all(p["nonfinite"]["target"][0] == p["positions"] for p in report["prompts"])  # one per position
    assert report["worst"]["max_abs"] is None and report["worst"]["min_cosine"] is None  # NaN, never 0 / 1.0
    assert "max|diff| 0" not in r.stderr and "1.000000" not in r.stderr and "nan" in r.stderr


def test_a_nan_source_and_its_nan_output_fail(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src, ignore=shutil.ignore_patterns("original"))
    nan_row(src, 7)
    out = tmp_path / "out"
    r = subprocess.run(EDGEC + ["convert", str(src), "-t", "mlx", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "lm_head.weight: 64 non-finite values" in r.stderr, r.stderr
    report = run_parity(src, out, tokens=1, positions=8)
    assert not report["passed"]
    assert any("from the source" in f for f in report["failures"])
    assert any("from the target" in f for f in report["failures"])


# ---- either source layout ----------------------------------------------------------------------------------------
@pytest.mark.float_sensitive
def test_a_conversion_from_original_checks_against_either_layout(tiny, prompts, tmp_path):
    out = tmp_path / "from-original"
    run_convert(tiny / "original", "mlx", out, progress=False)
    for src in (tiny, tiny / "original"):
        report = run_parity(src, out, prompts, tokens=2, options={"kv_dtype": "float32"})  # float32 math and KV
        assert report["passed"] and report["worst"]["max_abs"] < 1e-4, (src, report["failures"])
    builtin = run_parity(tiny / "original", out, tokens=1, positions=8)  # the tokenizer above original/
    assert builtin["passed"], builtin["failures"]


def test_another_model_is_named(tiny, tiny_mlx, tmp_path):
    from edgec.errors import EdgecError
    from edgec.spec import preset
    from edgec.synth import synthesize

    other = synthesize(preset("tiny"), tmp_path / "two-layers")
    with pytest.raises(EdgecError, match="converted from another model .*num_hidden_layers 2 vs 3"):
        run_parity(other, tiny_mlx, tokens=1, positions=4)


def test_progress_per_prompt_on_a_terminal(tiny, tiny_mlx, prompts, monkeypatch):
    """parity shows each prompt as it goes (rich, stderr): nothing on stdout."""
    from rich.console import Console

    import edgec.progress

    console = Console(stderr=True, force_terminal=True, width=120, record=True)
    monkeypatch.setattr(edgec.progress, "stderr", console)
    report = run_parity(tiny, tiny_mlx, prompts, tokens=1, progress=True)
    seen = console.export_text()
    assert report["passed"] and "prompt-0 (" in seen and "long (200 positions)" in seen and "2/2" in seen
