"""The foundation's CLI as a user runs it: synth, inspect (tables, --json, memory plan), logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tolerance import assert_reordered

from edgec.checkpoint import Checkpoint
from edgec.cli import main
from edgec.memory import BITS_PER_WEIGHT, facts_kv_bytes, weight_bytes
from edgec.report import inspect_report, memory_plan
from edgec.runtime.reference import Reference
from edgec.spec import hf_tensors, preset

IDS = "200006,17360,200008"


def edgec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "edgec"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgec"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.float_sensitive
def test_done_when_sequence(tmp_path):
    """`edgec synth /tmp/m --preset tiny && edgec inspect /tmp/m && edgec logits /tmp/m --ids ... --out l.npy`"""
    m = tmp_path / "m"
    r = edgec("synth", str(m), "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    r = edgec("inspect", str(m))
    assert r.returncode == 0 and "memory plan at 131072 tokens" in r.stdout and "ok" in r.stdout, r.stdout + r.stderr
    r = edgec("logits", str(m), "--ids", IDS, "--out", str(tmp_path / "l.npy"))
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "l.npy")
    assert got.dtype == np.float32 and got.shape == (3, 201088)
    want = Reference(ck := Checkpoint.open(m)).logits([200006, 17360, 200008])
    assert_reordered(got, want, ck.config, 3)  # another process, maybe other BLAS threads: tests/tolerance.py

    r = cli("logits", str(m), "--ids", IDS, "--last", "1", "--out", str(tmp_path / "l1.npy"))
    assert r.exit_code == 0, r.output
    assert_reordered(np.load(tmp_path / "l1.npy"), want[-1:], ck.config, 3)
    (tmp_path / "ids.json").write_text("[200006, 17360, 200008]")
    r = cli("logits", str(m), "--ids-file", str(tmp_path / "ids.json"), "--out", str(tmp_path / "l2.npy"))
    assert r.exit_code == 0
    assert_reordered(np.load(tmp_path / "l2.npy"), want, ck.config, 3)


def test_inspect_json(tiny):
    r = cli("inspect", str(tiny), "--json", "--context", "4096")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    cfg = Checkpoint.open(tiny).config
    assert rep["layout"] == "hf" and rep["has_original"] and rep["problems"] == []
    a = rep["architecture"]
    assert (a["layers"], a["sliding_layers"], a["full_layers"], a["kv_heads"], a["experts"],
            a["experts_per_token"], a["vocab_size"]) == (3, 2, 1, 2, 8, 4, 201088)
    assert a["yarn"]["truncate"] is False and a["yarn"]["factor"] == 32.0
    assert rep["params"]["total"] == cfg.params()["total"] and rep["params"]["active"] < rep["params"]["total"]
    assert rep["tensors"] == {"expected": len(hf_tensors(cfg)), "found": len(hf_tensors(cfg)), "problems": 0}
    assert rep["source_bytes"] == sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
    src = rep["memory_plan"]["targets"][0]
    assert src["target"] == "source" and src["kv_bytes"] == facts_kv_bytes(cfg, 4096)
    assert rep["memory_plan"]["context"] == 4096


def test_memory_plan_arithmetic_20b():
    cfg = preset("20b")
    stored = sum(t.nbytes for t in hf_tensors(cfg))
    # 4.25 bits for MXFP4 is exactly the blocks + scales bytes; bf16 elsewhere: the plan prices the source exactly
    assert weight_bytes(cfg, "bf16", "mxfp4") == stored
    expert_weights = sum(t.params for t in hf_tensors(cfg) if t.kind == "expert_blocks")
    assert weight_bytes(cfg, "bf16", "int4") - weight_bytes(cfg, "bf16", "mxfp4") == expert_weights * (4.5 - 4.25) / 8
    assert weight_bytes(cfg, "bf16", "nope") is None
    plan = memory_plan(cfg, 131072)
    src = plan["targets"][0]
    assert src["weights_bytes"] == stored and src["kv_bytes"] == 3 * 2**30 + 12 * 128 * 2048
    assert plan["kv_all_full_bytes"] == 6 * 2**30
    assert set(BITS_PER_WEIGHT) >= {"mxfp4", "int8", "int4", "bf16", "fp16", "fp32", "q8"}


def test_memory_plan_prices_every_profile(monkeypatch, tmp_path):
    """Each profile is priced by its runtime's own plan; unknown formats and unreadable profiles say so."""
    import edgec.targets as targets
    from edgec.memory import plan_recipe

    monkeypatch.setattr(targets, "TARGETS_DIR", tmp_path)
    cfg = preset("20b")
    plan = memory_plan(cfg, 8192)
    assert [r["target"] for r in plan["targets"]] == ["source"] and "no target profiles" in plan["note"]
    (tmp_path / "a.toml").write_text('runtime = "mlx"\n[dense]\ndefault = "q8"\n[experts]\ndefault = "mxfp4"\n'
                                     '[runtime_defaults.gpu]\ncompute = "float16"\nkv_dtype = "bfloat16"\n')
    (tmp_path / "b.toml").write_text('runtime = "mlx"\n[dense]\ndefault = "fp32"\n[experts]\ndefault = "weird"\n')
    (tmp_path / "c.toml").write_text('runtime = "onnxruntime-genai"\nexecution_provider = "DmlExecutionProvider"\n'
                                     '[dense]\ndefault = "fp16"\n[experts]\ndefault = "decomposed"\n')
    (tmp_path / "d.toml").write_text("not toml [")
    (tmp_path / "e.toml").write_text('runtime = "nope"\n')
    rows = {r["target"]: r for r in memory_plan(cfg, 8192)["targets"]}
    a = rows["a"]
    # mlx: full layers every position, sliding layers window + rollback margin + prefill chunk, bf16 here
    assert a["kv_bytes"] == (12 * 8192 + 12 * (128 + 1024 + 512)) * 2 * 512 * 2 and a["kv_dtype"] == "bfloat16"
    assert a["weights_bytes"] == weight_bytes(cfg, "q8", "mxfp4")
    assert a["total_bytes"] == plan_recipe(targets.load_profile("a"), cfg, 8192).total
    assert rows["b"]["weights_bytes"] is None and "weird" in rows["b"]["note"]
    assert rows["c"]["weights_bytes"] == weight_bytes(cfg, "fp16", "fp16")  # a GPU provider holds the embedding too
    assert rows["c"]["kv_dtype"] == "float16"
    assert "unreadable profile" in rows["d"]["note"] and "unknown runtime 'nope'" in rows["e"]["note"]


def test_inspect_an_edgec_output_folder(tiny, tmp_path):
    from edgec.convert.common import write_manifest
    from edgec.safetensors_io import SafetensorsWriter

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny / "config.json", out / "config.json")
    shutil.copy(tiny / "tokenizer.json", out / "tokenizer.json")
    with SafetensorsWriter(out / "model.safetensors", [("x", "F32", (250,))]) as w:
        w.write("x", np.zeros(250, np.float32))
    write_manifest(out, Checkpoint.open(tiny), {"name": "mlx", "runtime": "mlx"}, {"dense": "bf16",
                                                                                     "experts": "mxfp4"})
    rep = inspect_report(out, 1024)
    assert rep["kind"] == "edgec output" and rep["target"] == "mlx" and rep["problems"] == []
    on_disk = sum((out / n).stat().st_size for n in ("model.safetensors", "config.json", "tokenizer.json"))
    assert rep["architecture"]["layers"] == 3 and rep["bytes_on_disk"] == on_disk
    r = cli("inspect", str(out))
    assert r.exit_code == 0 and "mlx" in r.stdout
    size = (out / "model.safetensors").stat().st_size
    (out / "model.safetensors").write_bytes(b"x" * 10)
    r = cli("inspect", str(out))
    assert r.exit_code == 2 and f"10 bytes, edgec.json records {size}" in r.stderr
    (out / "tokenizer.json").unlink()
    assert "no tokenizer.json" in inspect_report(out)["problems"][-1]


@pytest.mark.parametrize("args,fragment", [
    (["logits", "{m}", "--ids", "1,2", "--ids-file", "{m}/config.json", "--out", "{t}/x.npy"], "exactly one of"),
    (["logits", "{m}", "--out", "{t}/x.npy"], "exactly one of"),
    (["logits", "{m}", "--ids", "1,999999", "--out", "{t}/x.npy"], "token id 999999 is outside the vocabulary"),
    (["logits", "{m}", "--ids", "1,a", "--out", "{t}/x.npy"], "could not read token ids"),
    (["logits", "{m}", "--ids-file", "{m}/config.json", "--out", "{t}/x.npy"], "non-empty list of integers"),
    (["logits", "{m}", "--ids-file", "{m}/original", "--out", "{t}/x.npy"], "original: is a folder, not a regular"),
    (["logits", "{m}", "--ids-file", "{t}/deep.json", "--out", "{t}/x.npy"], "deep.json: JSON nested too deeply"),
    (["logits", "{m}", "--ids", "1", "--out", "{t}/no/such/dir/x.npy"], "cannot write"),
    (["synth", "{t}/new", "--hidden", "100"], "multiples of 32"),
    (["synth", "{t}/new", "--layers", "0"], "num_hidden_layers must be at least 1"),
    (["synth", "{m}"], "output folder exists"),
    (["inspect", "{m}", "--context", "0"], "--context must be a positive"),
    (["convert", "{m}", "-t", "../targets/mlx", "-o", "{t}/new"], "unknown target '../targets/mlx'"),
    (["generate", "{m}", "--prompt", "hi", "--max-context", "0"], "--max-context must be between 2 and"),
    (["generate", "{m}", "--conversation", "{t}/deep.json"], "deep.json: JSON nested too deeply"),
    (["generate", "{m}", "--conversation", "{t}/c42.json"],
     "c42.json: messages[0].content must be a string or a list of text parts"),
])
def test_bad_requests_are_one_line_errors(tiny, tmp_path, args, fragment):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "c42.json").write_text('[{"role": "user", "content": 42}]')
    r = cli(*[a.format(m=tiny, t=tmp_path) for a in args])
    # chat/generate first say what they run (a source checkpoint's warning, the memory plan): one error line after
    lines = [e for e in r.stderr.strip().splitlines() if e.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and fragment in lines[0], (r.exit_code, r.stderr, r.exception)
    assert r.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "new").exists()


def test_a_prompt_past_the_model_maximum_does_not_say_raise_max_context(tiny):
    prompt = "a " * 150_000  # 300,000 characters, ~150,000 tokens: more than the model's 131,072
    r = cli("generate", str(tiny), "--prompt", prompt, "--max-tokens", "1")
    assert r.exit_code == 2 and "context holds 131072 (the model's maximum: shorten the conversation)" in r.stderr
    assert "raise --max-context" not in r.stderr
    r = cli("generate", str(tiny), "--prompt", prompt[:4000], "--max-tokens", "1", "--max-context", "1000")
    assert r.exit_code == 2 and "context holds 1000 (raise --max-context)" in r.stderr
