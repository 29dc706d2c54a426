"""Synthetic checkpoints: the published layout to the byte, deterministic, realistic values, bounded memory.

(That transformers loads and runs them is proven by tests/test_reference.py.)
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_ckpt

from edgec import mxfp4
from edgec.checkpoint import Checkpoint
from edgec.spec import hf_tensors, original_tensors, preset

# keys of the published HF config.json and original/config.json (facts file sections 1-2)
HF_KEYS = {"architectures", "model_type", "hidden_size", "intermediate_size", "head_dim", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
           "experts_per_token", "vocab_size", "max_position_embeddings", "initial_context_length", "sliding_window",
           "layer_types", "rope_theta", "rope_scaling", "swiglu_limit", "rms_norm_eps", "hidden_act",
           "attention_bias", "tie_word_embeddings", "eos_token_id", "pad_token_id", "router_aux_loss_coef",
           "quantization_config"}
ORIGINAL_KEYS = {"num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                 "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
                 "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
                 "rope_ntk_beta"}
SMALL = dict(num_hidden_layers=2, vocab_size=1024)


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_to_the_byte(tmp_path):
    from edgec.synth import synthesize

    cfg = preset("tiny", **SMALL)
    root = synthesize(cfg, tmp_path / "m", seed=3, shards=3, layout="both")
    names = [f"model-0000{i}-of-00002.safetensors" for i in range(3)]
    assert sorted(p.name for p in root.glob("*.safetensors")) == names
    index = json.loads((root / "model.safetensors.index.json").read_text())
    specs = hf_tensors(cfg)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in specs)
    assert list(index["weight_map"]) == sorted(t.name for t in specs)
    stored = 0
    order = [t.name for t in specs]
    for name in names:
        n, h = header(root / name)
        assert n % 8 == 0 and h.pop("__metadata__") == {"format": "pt"}
        assert set(h) == {t for t, f in index["weight_map"].items() if f == name}
        # tensors packed back to back in model order, each with the spec's dtype and shape
        by = {t.name: t for t in specs}
        ends = 0
        for t in sorted(h, key=order.index):
            assert h[t]["dtype"] == by[t].dtype and tuple(h[t]["shape"]) == by[t].shape, t
            assert h[t]["data_offsets"] == [ends, ends + by[t].nbytes], t
            ends += by[t].nbytes
        assert (root / name).stat().st_size == 8 + n + ends
        stored += ends
    assert stored == index["metadata"]["total_size"]

    hf_cfg = json.loads((root / "config.json").read_text())
    assert HF_KEYS <= set(hf_cfg) and hf_cfg["model_type"] == "gpt_oss"
    assert hf_cfg["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                      "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                      "truncate": False}
    assert json.loads((root / "generation_config.json").read_text()) | {"transformers_version": "x"} == {
        "bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999,
        "transformers_version": "x"}
    orig_cfg = json.loads((root / "original" / "config.json").read_text())
    assert set(orig_cfg) == ORIGINAL_KEYS
    _, oh = header(root / "original" / "model.safetensors")
    oh.pop("__metadata__")
    assert {k: (v["dtype"], tuple(v["shape"])) for k, v in oh.items()} == {
        t.name: (t.dtype, t.shape) for t in original_tensors(cfg)}
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in root.iterdir()}


def test_deterministic_by_seed(tmp_path):
    a = digest(make_ckpt(tmp_path / "a", seed=5, **SMALL))
    b = digest(make_ckpt(tmp_path / "b", seed=5, **SMALL))
    c = digest(make_ckpt(tmp_path / "c", seed=6, **SMALL))
    assert a == b
    shards = [k for k in a if k.endswith(".safetensors")]
    assert shards and all(a[k] != c[k] for k in shards)
    assert a["config.json"] == c["config.json"]


def test_values_are_realistic(tiny, ids300):
    ck = Checkpoint.open(tiny)
    c = ck.config
    for n in range(c.num_hidden_layers):
        for which, k in (("gate_up_proj", c.hidden_size), ("down_proj", c.intermediate_size)):
            blocks = ck.raw(f"model.layers.{n}.mlp.experts.{which}_blocks")
            assert len(np.unique(mxfp4.codes(blocks))) == 16  # the whole E2M1 table is used
            w = ck.experts(n, which, [0])[0]
            gain = np.sqrt((w.astype(np.float64) ** 2).mean() * k)  # output rms for unit-rms input
            assert 0.5 < gain < 2.0, (which, gain)
    for t in ck.specs():
        if t.dtype == "BF16":
            v = ck.f32(t.name)
            assert np.isfinite(v).all() and v.std() > 0, t.name
    from edgec.runtime.reference import Reference

    logits = Reference(ck).logits(ids300[:64])
    assert 0.5 < logits.std() < 20
    assert len(set(logits.argmax(-1).tolist())) > 32  # not collapsed onto a few tokens


def peak_rss_of(args: list[str]) -> int:
    """Peak RSS (bytes) of one `edgec` run, measured from a wrapper process that waits for it."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "edgec", *args], check=True,
                         capture_output=True, text=True, timeout=300)
    return int(out.stdout) * 1024


def test_synth_20b_shape_streams_with_bounded_memory(tmp_path):
    """One 20b layer (2880 hidden, 5760-row expert matrices) with 8 and with 32 experts: the file grows by
    ~320 MB, peak RSS does not (it is bounded by the chunk size, not the tensor or model size)."""
    small, big = tmp_path / "e8", tmp_path / "e32"
    common = ["--preset", "20b", "--layers", "1", "--vocab", "1024"]
    rss_small = peak_rss_of(["synth", str(small), *common, "--experts", "8"])
    rss_big = peak_rss_of(["synth", str(big), *common])
    size_big = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    size_small = sum(p.stat().st_size for p in small.glob("*.safetensors"))
    assert size_big - size_small > 300e6
    assert rss_big < 0.6 * size_big and rss_big - rss_small < 40 * 2**20, (rss_small, rss_big, size_big)
    # full-size expert scales: rows spanning the default 8 binades around 2**-10 (E8M0 117 for K = 2880), outliers
    # above, and unit output scale (the spread's large blocks dominate the power, so the centre sits below the
    # 2**-7 of a single scale)
    ck = Checkpoint.open(big)
    for which in ("gate_up_proj", "down_proj"):
        s = ck.raw(f"model.layers.0.mlp.experts.{which}_scales")[:4].astype(int)
        assert int(np.median(s)) == 117 and np.median(s.max(-1) - s.min(-1)) == 8 and (s > 121).any()
        w = ck.experts(0, which, [0])[0]
        assert 0.6 < np.sqrt((w.astype(np.float64) ** 2).mean() * 2880) < 1.6


@pytest.mark.parametrize("spread", [0, 2, 4, 8, 12, 16])
def test_scale_spread(spread):
    """--scale-spread S: the block scales of a 90-block row span S binades (0: one scale), a few outlier blocks sit
    1-3 binades above, and the expert matmul keeps unit output scale whatever the spread."""
    from edgec.spec import TensorSpec
    from edgec.synth import tensor_chunks

    cfg = preset("20b", num_hidden_layers=1)
    spec = TensorSpec("model.layers.0.mlp.experts.down_proj_scales", "U8", (8, 2880, 90), "expert_scales", 0)
    s = np.concatenate(list(tensor_chunks(cfg, spec, seed=0, spread=spread))).astype(int)
    span = s.max(-1) - s.min(-1)
    if spread == 0:
        assert span.max() == 0
        return
    normal = np.where(s <= np.median(s) + spread // 2, s, np.median(s))  # without the outliers
    assert np.median(normal.max(-1) - normal.min(-1)) == spread
    assert 0.5e-3 < (s > np.median(s) + spread // 2).mean() < 2e-3  # outliers: about 1 block in 1024
    blocks = np.random.default_rng(0).integers(0, 256, size=(*s.shape, 16), dtype=np.uint8)
    w = mxfp4.decode(blocks[:1, :512], s[:1, :512].astype(np.uint8)).astype(np.float64)
    gain = np.sqrt((w ** 2).mean() * 2880)
    assert 0.6 < gain < 1.6, gain


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_single_layout_folders(tmp_path, layout):
    root = make_ckpt(tmp_path / layout, layout=layout, **SMALL)
    ck = Checkpoint.open(root)
    assert ck.layout == layout and ck.problems() == []
    assert not (root / "original").exists()
