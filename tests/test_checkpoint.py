"""Checkpoint reader: both layouts read the same bytes, and a corpus of malformed checkpoints fails cleanly.

Every malformed case goes through the real CLI (`edgec inspect` and `edgec logits`; in process with click's runner,
and a few as real subprocesses of `python -m edgec`): exit code 2, exactly one line on stderr, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_ckpt

from edgec import mxfp4
from edgec.checkpoint import Checkpoint
from edgec.spec import hf_tensors

EDGEC = [sys.executable, "-m", "edgec"]


# ---- reading -------------------------------------------------------------------------------------------------
def test_both_layouts_hold_the_same_tensors(tiny):
    hf, orig = Checkpoint.open(tiny), Checkpoint.open(tiny / "original")
    assert (hf.layout, orig.layout) == ("hf", "original") and hf.config == orig.config
    assert [t.name for t in hf.specs()] == [t.name for t in orig.specs()] == [t.name for t in hf_tensors(hf.config)]
    for t in hf.specs():
        a, b = hf.raw(t.name), orig.raw(t.name)
        assert a.shape == b.shape == t.shape and np.array_equal(a, b), t.name
        assert not a.flags.owndata and not a.flags.writeable  # zero-copy views on the read-only memory map
        assert not b.flags.owndata
    assert hf.problems() == [] and orig.problems() == []
    assert [p.name for p in orig.tokenizer_files()] == [p.name for p in hf.tokenizer_files()]
    assert hf.config_hash() == hashlib.sha256((tiny / "config.json").read_bytes()).hexdigest()


def test_experts_decode_only_the_requested_experts(tiny):
    ck = Checkpoint.open(tiny)
    c = ck.config
    p = "model.layers.2.mlp.experts."
    w1 = ck.experts(2, "gate_up_proj", [5, 1])
    w2 = ck.experts(2, "down_proj", np.array([3]))
    assert w1.shape == (2, 2 * c.intermediate_size, c.hidden_size) and w1.dtype == np.float32
    assert w2.shape == (1, c.hidden_size, c.intermediate_size)
    raw = lambda name, e: ck.raw(p + name)[e]
    assert np.array_equal(w1[0], mxfp4.decode(raw("gate_up_proj_blocks", 5), raw("gate_up_proj_scales", 5)))
    assert np.array_equal(w2[0], mxfp4.decode(raw("down_proj_blocks", 3), raw("down_proj_scales", 3)))


# ---- malformed corpus ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    """A 2-layer checkpoint with a 1,024-row vocabulary (both layouts, 2 shards): cheap to copy per case."""
    return make_ckpt(tmp_path_factory.mktemp("corpus") / "base", num_hidden_layers=2, vocab_size=1024)


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def shard_of(root: Path, tensor: str) -> Path:
    return root / json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def edit_index(root: Path, fn) -> None:
    p = root / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


Q = "model.layers.0.self_attn.q_proj.weight"
SCALES = "model.layers.1.mlp.experts.gate_up_proj_scales"


def truncated(root):
    p = shard_of(root, "lm_head.weight")
    os.truncate(p, p.stat().st_size - 100)


def header_too_big(root):
    p = shard_of(root, Q)
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", p.stat().st_size * 2))


def retype(root, tensor, dtype=None, shape=None):
    p = shard_of(root, tensor)
    h, data = read_header(p)
    h[tensor]["dtype"] = dtype or h[tensor]["dtype"]
    h[tensor]["shape"] = shape or h[tensor]["shape"]
    write_header(p, h, data)


def missing_tensor(root):
    """The tensor and its bytes are gone (the other tensors still tile the data area exactly)."""
    t = "model.layers.1.self_attn.sinks"
    p = shard_of(root, t)
    h, data = read_header(p)
    b, end = h.pop(t)["data_offsets"]
    for e in h.values():
        if isinstance(e, dict) and "data_offsets" in e and e["data_offsets"][0] >= end:
            e["data_offsets"] = [o - (end - b) for o in e["data_offsets"]]
    write_header(p, h, data[:b] + data[end:])
    edit_index(root, lambda wm: wm.pop(t))


def extra_tensor(root):
    p = shard_of(root, Q)
    h, data = read_header(p)
    h["model.layers.0.mlp.experts.gate_up_proj_zeros"] = {"dtype": "U8", "shape": [8], "data_offsets":
                                                           [len(data), len(data) + 8]}
    write_header(p, h, data + bytes(8))
    edit_index(root, lambda wm: wm.update({"model.layers.0.mlp.experts.gate_up_proj_zeros": p.name}))


def index_path(root, name):
    edit_index(root, lambda wm: wm.update({Q: name}))


def scale_255(root):
    p = shard_of(root, SCALES)
    h, _ = read_header(p)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    with open(p, "r+b") as f:
        f.seek(8 + n + h[SCALES]["data_offsets"][0] + 7)
        f.write(b"\xff")


def config(root, text):
    (root / "config.json").write_text(text)


def original_wrong_shape(root):
    o = root / "original" / "model.safetensors"
    h, data = read_header(o)
    h["block.1.attn.qkv.weight"]["shape"] = h["block.1.attn.qkv.weight"]["shape"][::-1]
    write_header(o, h, data)


def overlapping(root):
    """q_proj's bytes alias k_proj's (same length, same offsets)."""
    p = shard_of(root, Q)
    h, data = read_header(p)
    k = Q.replace("q_proj", "k_proj")
    h[k]["shape"] = h[Q]["shape"]
    h[k]["data_offsets"] = h[Q]["data_offsets"]
    write_header(p, h, data)


def trailing_bytes(root):
    p = shard_of(root, Q)
    with open(p, "ab") as f:
        f.write(b"\0" * 24)


def edit_config(root, **kw):
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(kw)
    config(root, json.dumps(cfg))


def edit_rope(root, **kw):
    cfg = json.loads((root / "config.json").read_text())
    (cfg.get("rope_scaling") or cfg["rope_parameters"]).update(kw)
    config(root, json.dumps(cfg))


def deep(n: int) -> str:
    return "[" * n + "]" * n


def deep_header(root):
    p = shard_of(root, Q)
    h, data = read_header(p)
    write_header(p, {**h, "__metadata__": {"x": "y"}, "nest": "PLACEHOLDER"}, data)
    raw = p.read_bytes().replace(b'"PLACEHOLDER"', deep(200_000).encode())
    p.write_bytes(struct.pack("<Q", struct.unpack("<Q", raw[:8])[0] + 400_000 - 13) + raw[8:])


def big_header(root):
    """A header length of 200 MB in a file bigger than that (sparse): edgec's cap, not 'larger than the file'."""
    p = shard_of(root, Q)
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", 200_000_000))
    os.truncate(p, 300_000_000)


def fifo_shard(root):
    p = shard_of(root, Q)
    p.unlink()
    os.mkfifo(p)


def dev_zero_config(root):
    (root / "config.json").unlink()
    (root / "config.json").symlink_to("/dev/zero")


def huge_config(root):
    with open(root / "config.json", "r+b") as f:
        f.truncate(100 << 20)  # sparse


CORPUS = {
    # name: (corruption, what the one line must say, run on original/ instead of the root)
    "truncated_shard": (truncated, "tensor lm_head.weight: truncated file", False),
    "header_larger_than_file": (header_too_big, "is larger than the file", False),
    "wrong_dtype": (lambda r: retype(r, Q, dtype="F16"), f"tensor {Q}: dtype F16, expected BF16", False),
    "wrong_shape": (lambda r: retype(r, Q, shape=[64, 128]), f"tensor {Q}: shape [64, 128], expected [128, 64]",
                    False),
    "missing_tensor": (missing_tensor, "tensor model.layers.1.self_attn.sinks: missing", False),
    "extra_tensor": (extra_tensor, "gate_up_proj_zeros: unexpected tensor", False),
    "dotdot_in_index": (lambda r: index_path(r, "../model-00000-of-00001.safetensors"), "escapes the checkpoint",
                        False),
    "absolute_path_in_index": (lambda r: index_path(r, "/etc/passwd"), "escapes the checkpoint", False),
    "index_names_wrong_shard": (lambda r: index_path(r, "model-00001-of-00001.safetensors"),
                                "named in model.safetensors.index.json but not in this shard", False),
    "index_not_strings": (lambda r: index_path(r, ["a"]), "weight_map values must be file names", False),
    "not_gpt_oss": (lambda r: config(r, json.dumps({**json.loads((r / "config.json").read_text()),
                                                    "model_type": "llama"})), "not a gpt-oss checkpoint", False),
    # byte 7 of scales [E, 2I, 2] is index [0, 3, 1]
    "mxfp4_scale_255": (scale_255, f"tensor {SCALES}: MXFP4 scale byte 255 (NaN) at index [0, 3, 1]", False),
    "missing_shard_file": (lambda r: shard_of(r, "lm_head.weight").unlink(), "shard file not found", False),
    "invalid_json_config": (lambda r: config(r, '{"model_type": "gpt_oss",'), "config.json: invalid JSON", False),
    "binary_config": (lambda r: (r / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "config.json: cannot read",
                      False),
    "original_wrong_shape": (original_wrong_shape, "tensor block.1.attn.qkv.weight: shape [64, 192]", True),
    # the safetensors library's own rules
    "overlapping_data_offsets": (overlapping, "data_offsets [", False),
    "bytes_after_last_tensor": (trailing_bytes, "24 bytes after the last tensor", False),
    # configs that raised IndexError / ZeroDivisionError / RecursionError
    "eos_token_id_empty_list": (lambda r: edit_config(r, eos_token_id=[]), "eos_token_id is an empty list", False),
    "head_dim_null_no_heads": (lambda r: edit_config(r, head_dim=None, num_attention_heads=0),
                               "num_attention_heads must be at least 1", False),
    "no_attention_heads": (lambda r: edit_config(r, num_attention_heads=0), "num_attention_heads must be at least 1",
                           False),
    "sliding_window_negative": (lambda r: edit_config(r, sliding_window=-1), "sliding_window must be at least 1",
                                False),
    "nan_rope_theta": (lambda r: config(r, (r / "config.json").read_text().replace('"rope_theta": 150000.0',
                                                                                     '"rope_theta": NaN')),
                       "rope_theta must be a finite positive number", False),
    # configs inspect and convert accepted, that then divided by zero or overflowed in RoPE (edgec/rope.py)
    "rope_theta_one": (lambda r: edit_config(r, rope_theta=1), "rope_theta must be greater than 1", False),
    "rope_theta_true": (lambda r: edit_config(r, rope_theta=True), "rope_theta must be greater than 1", False),
    "yarn_beta_fast_zero": (lambda r: edit_rope(r, beta_fast=0), "beta_fast must be a finite positive number", False),
    "yarn_beta_slow_negative": (lambda r: edit_rope(r, beta_slow=-1), "beta_slow must be a finite positive number",
                                False),
    "fractional_context": (lambda r: edit_config(r, max_position_embeddings=1.5),
                           "max_position_embeddings must be an integer, got 1.5", False),
    "null_sliding_window": (lambda r: edit_config(r, sliding_window=None),
                            "sliding_window must be an integer, got None", False),
    "yarn_original_context_huge": (lambda r: edit_rope(r, original_max_position_embeddings=10**400),
                                   "original_max_position_embeddings must be an integer from 1 to", False),
    "deep_config": (lambda r: config(r, '{"model_type": "gpt_oss", "x": ' + deep(200_000) + "}"),
                    "config.json: JSON nested too deeply", False),
    "deep_config_under_recursion_limit": (lambda r: config(r, '{"model_type": "gpt_oss", "x": ' + deep(500) + "}"),
                                          "config.json: JSON nested too deeply", False),
    "deep_shard_header": (deep_header, "corrupt safetensors header: JSON nested too deeply", False),
    # resource abuse
    "config_is_dev_zero": (dev_zero_config, "config.json: is a device, FIFO or socket, not a regular file", False),
    "config_over_the_cap": (huge_config, "more than the 64 MiB edgec reads as JSON", False),
    "header_over_the_cap": (big_header, "header of 200000000 bytes is over edgec's 100 MiB limit", False),
    "fifo_shard": (fifo_shard, "is a device, FIFO or socket, not a regular shard file", False),
    "twenty_million_layers": (lambda r: edit_config(r, num_hidden_layers=20_000_000, layer_types=None),
                              "num_hidden_layers must be at least 1 and at most", False),
    "five_thousand_layers": (lambda r: edit_config(r, num_hidden_layers=5000, layer_types=None),
                             "num_hidden_layers 5000 is more than edgec supports", False),
    "more_layers_than_the_shards": (lambda r: edit_config(r, num_hidden_layers=40, layer_types=None),
                                    "num_hidden_layers is 40, but the shards hold tensors of 2 layer(s)", False),
}


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args: str) -> Result:
    """The real `edgec` command group, in process (click's CliRunner); a stray exception is reported as exit 1
    with its traceback, exactly what a user would see."""
    import traceback

    from click.testing import CliRunner

    from edgec.cli import main

    r = CliRunner().invoke(main, list(args))
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return Result(r.exit_code, r.stdout, err)


def run_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEC, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_checkpoint(case, small_base, tmp_path):
    corrupt, fragment, original = CORPUS[case]
    root = tmp_path / case
    shutil.copytree(small_base, root)
    corrupt(root)
    target = root / "original" if original else root
    assert_one_line_error(run("inspect", str(target)), fragment)
    assert_one_line_error(run("logits", str(target), "--ids", "1,2", "--out", str(tmp_path / "l.npy")), fragment)
    assert not (tmp_path / "l.npy").exists()
    if case in ("truncated_shard", "mxfp4_scale_255", "dotdot_in_index"):  # the installed entry point, as users run it
        assert_one_line_error(run_process("inspect", str(target)), fragment)


@pytest.mark.parametrize("make,fragment", [
    (lambda p: p.mkdir(), "config.json: file not found"),
    (lambda p: p.write_text("hello"), "expected a checkpoint folder"),
    (lambda p: None, "no such checkpoint folder"),
])
def test_not_a_checkpoint(tmp_path, make, fragment):
    p = tmp_path / "thing"
    make(p)
    assert_one_line_error(run("inspect", str(p)), fragment)
    assert_one_line_error(run("logits", str(p), "--ids", "1", "--out", str(tmp_path / "l.npy")), fragment.replace(
        "expected a checkpoint folder", "not a gpt-oss checkpoint nor an edgec output").replace(
        "config.json: file not found", "not a gpt-oss checkpoint nor an edgec output").replace(
        "no such checkpoint folder", "not a gpt-oss checkpoint nor an edgec output"))


def test_inspect_lists_every_problem(small_base, tmp_path):
    root = tmp_path / "two"
    shutil.copytree(small_base, root)
    retype(root, Q, dtype="F16")
    missing_tensor(root)
    scale_255(root)
    proc = run_process("inspect", str(root), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert len(report["problems"]) == 3 and "and 2 more" in proc.stderr
    assert any("dtype F16" in p for p in report["problems"])
    assert any("sinks: missing" in p for p in report["problems"])
    assert any("scale byte 255" in p for p in report["problems"])


# ---- non-finite weights ----------------------------------------------------------------------------------------
NORM = "model.layers.0.input_layernorm.weight"
BLOCKS = SCALES.replace("_scales", "_blocks")


def put_bytes(root, tensor, offset, data: bytes):
    p = shard_of(root, tensor)
    h, _ = read_header(p)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    with open(p, "r+b") as f:
        f.seek(8 + n + h[tensor]["data_offsets"][0] + offset)
        f.write(data)


def nonfinite_weights(root):
    put_bytes(root, Q, 2 * 3, struct.pack("<H", 0x7FC0))  # a NaN in a dense weight
    put_bytes(root, NORM, 0, struct.pack("<H", 0xFF80))  # -Inf in a norm
    put_bytes(root, SCALES, 7, b"\xfe")  # scale byte 254 ...
    put_bytes(root, BLOCKS, 7 * 16, b"\x77" * 16)  # ... on a block of 6.0s: 6 * 2**127 overflows float32


def test_nonfinite_weights_are_counted_per_tensor(small_base, tmp_path):
    root = tmp_path / "nan"
    shutil.copytree(small_base, root)
    nonfinite_weights(root)
    counts = {Q: 1, NORM: 1, BLOCKS: 32}
    assert Checkpoint.open(root).nonfinite() == counts
    r = run("inspect", str(root), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["nonfinite"] == counts, r.stderr
    for name, n in counts.items():
        assert f"tensor {name}: {n} non-finite values (NaN/Inf)" in r.stderr
    assert_one_line_error(run("inspect", str(root), "--strict"), f"tensor {NORM}: 1 non-finite values")
    out = tmp_path / "out"
    assert_one_line_error(run("convert", str(root), "-t", "mlx", "-o", str(out), "--strict"),
                          f"tensor {NORM}: 1 non-finite values (NaN/Inf) (and 2 more tensors); --strict")
    assert not out.exists()
    r = run("convert", str(root), "-t", "mlx", "-o", str(out), "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["warnings"]) == 3
    assert r.stderr.count("warning:") == 3 and f"tensor {BLOCKS}: 32 non-finite" in r.stderr
    r = run("logits", str(root), "--ids", "1,2", "--out", str(tmp_path / "l.npy"))
    assert r.returncode == 0 and "logits are not finite (NaN/Inf), first at position 0" in r.stderr, r.stderr
    assert not np.isfinite(np.load(tmp_path / "l.npy")).any()


@pytest.mark.parametrize("scale", [250, 252, 253, 254, 255])
def test_mxfp4_overflow_count_matches_the_codec(scale):
    from edgec.checkpoint import _overflowing

    rng = np.random.default_rng(scale)
    blocks = rng.integers(0, 256, size=(2, 4, 3, 16), dtype=np.uint8)
    scales = np.full((2, 4, 3), 120, np.uint8)
    scales[1, 2] = scale
    with np.errstate(all="ignore"):
        want = int((~np.isfinite(mxfp4.decode(blocks, scales))).sum())
    assert _overflowing(blocks, scales) == want and (want > 0) == (scale >= 253)


def test_a_missing_tokenizer_is_a_problem_and_a_warning(small_base, tmp_path):
    root = tmp_path / "notok"
    shutil.copytree(small_base, root)
    (root / "tokenizer.json").unlink()
    for target in (root, root / "original"):
        assert_one_line_error(run("inspect", str(target)), "no tokenizer.json (nor in the parent folder")
    r = run("convert", str(root / "original"), "-t", "mlx", "-o", str(tmp_path / "out"))
    assert r.returncode == 0 and "warning:" in r.stderr and "no tokenizer.json" in r.stderr
