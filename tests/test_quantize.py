"""16-bit experts in: the MXFP4 quantizer (convert/quantize.py), the round trip, and a transformers-saved fine-tune
layout through inspect, convert, the reference and parity. Oracles: brute force over the E2M1 table in float64
(rounding, scale choice), transformers' GptOssForCausalLM (logits), the `safetensors` library (reading back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hf_logits
from hf_written import write_transformers_ckpt
from tolerance import logits_bound

from edgec import mxfp4
from edgec.checkpoint import Checkpoint
from edgec.cli import main
from edgec.convert.quantize import quantize_mxfp4, relative_error
from edgec.errors import EdgecError
from edgec.runtime.reference import Reference
from edgec.spec import preset
from edgec.synth import synthesize

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def nearest_even(x: float) -> int:
    """Brute force: the E2M1 magnitude index nearest |x|, ties to the even index (even mantissa), saturating."""
    a = abs(x)
    d = [abs(a - m) for m in E2M1]
    best = min(d)
    cands = [i for i, v in enumerate(d) if v == best]
    return next((i for i in cands if i % 2 == 0), cands[0])


def brute_error(block: np.ndarray, e: int) -> float:
    return sum((abs(float(v)) - E2M1[nearest_even(float(v) / 2.0 ** e)] * 2.0 ** e) ** 2 for v in block)


def test_rounding_ties_to_even_and_saturates():
    grid = np.array(E2M1)
    mids = (grid[:-1] + grid[1:]) / 2
    vals = np.concatenate([grid, mids, mids + 1e-3, mids - 1e-3, [6.5, 7.99, 100.0]])
    vals = np.concatenate([vals, -vals])
    w = np.zeros((1, 32 * ((len(vals) + 31) // 32)), np.float32)
    w[0, : len(vals)] = vals
    w[0, -1] = 4.0  # every block's amax in [4, 8): the OCP scale is 2**0 ... unless the best scale is 2**1
    w[0, 31] = 6.0
    blocks, scales = quantize_mxfp4(w)
    codes = mxfp4.codes(blocks).reshape(-1)
    for j, v in enumerate(w[0]):
        e = int(scales.reshape(-1)[j // 32]) - 127
        want = nearest_even(float(v) / 2.0**e) | (8 if np.signbit(v) else 0)
        assert codes[j] == want, (j, float(v), e, int(codes[j]), want)


def test_scale_is_the_better_of_ocp_and_one_up():
    """Each block's error is the minimum over the OCP scale floor(log2 amax) - 2 and one binade up (brute force in
    float64), and never worse than the OCP rule alone; on Gaussian blocks the second candidate wins often."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(size=(24, 64)) * np.exp2(rng.integers(-20, 20, size=(24, 1)))).astype(np.float32)
    blocks, scales = quantize_mxfp4(w)
    deq = mxfp4.decode(blocks, scales).astype(np.float64)
    wins = 0
    for r in range(w.shape[0]):
        for g in range(2):
            blk = w[r, g * 32 : (g + 1) * 32]
            x0 = int(np.floor(np.log2(np.abs(blk).max()))) - 2
            ocp, up = brute_error(blk, x0), brute_error(blk, x0 + 1)
            ours = float(((deq[r, g * 32 : (g + 1) * 32] - blk) ** 2).sum())
            assert ours == pytest.approx(min(ocp, up), rel=1e-12, abs=0)
            wins += up < ocp
    assert 0 < wins < 48


def test_zero_blocks_keep_the_sign_of_zero():
    w = np.zeros((2, 32), np.float32)
    w[1, ::3] = -0.0
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[0], [0]]  # an all-zero block's scale is defined as byte 0
    c = mxfp4.codes(blocks)[:, 0]
    assert (c[0] == 0).all() and (c[1][::3] == 8).all() and (np.delete(c[1], np.s_[::3]) == 0).all()
    assert np.array_equal(np.signbit(mxfp4.decode(blocks, scales)), np.signbit(w))


def exact_at(vals: np.ndarray, e: int) -> bool:
    """Whether every value is an E2M1 value times 2**e (an independent check, float64)."""
    x = np.abs(vals.astype(np.float64)) / 2.0**e
    return bool(np.isin(x, E2M1).all())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same synthetic model twice (same seed): MXFP4 experts, and dense bf16 experts (its values dequantized)."""
    root = tmp_path_factory.mktemp("pair")
    cfg = preset("tiny", intermediate_size=96, vocab_size=1024)
    return (synthesize(cfg, root / "mx", seed=5, shards=1),
            synthesize(cfg, root / "bf", seed=5, shards=1, experts_dtype="BF16"))


def test_round_trip_from_bf16_is_lossless(pair):
    """Dequantized MXFP4 -> bf16 -> edgec's quantizer: the same values bit for bit (signs of zero included) in every
    block, zero error, and the same blocks and scales byte for byte wherever the values have one encoding. A value set
    with two exact encodings (no ±0.5/±1.5 codes: also exact one binade up) cannot be told apart after dequantizing;
    there the rule takes the larger scale, and nowhere else may a byte differ."""
    mx, bf = Checkpoint.open(pair[0]), Checkpoint.open(pair[1])
    assert (mx.experts_layout, bf.experts_layout) == ("mxfp4", "BF16")
    total = ambiguous = 0
    for t in mx.specs():
        if t.kind != "expert_blocks":
            continue
        s_name = t.name.replace("_blocks", "_scales")
        b0, s0, b1, s1 = mx.raw(t.name), mx.raw(s_name), bf.raw(t.name), bf.raw(s_name)
        v0, v1 = mxfp4.decode(b0, s0), mxfp4.decode(b1, s1)
        assert np.array_equal(v0.view(np.uint32), v1.view(np.uint32)), t.name
        same = (b0 == b1).all(-1) & (s0 == s1)
        for idx in np.argwhere(~same):
            vals = v0[tuple(idx[:-1])][idx[-1] * 32 : (idx[-1] + 1) * 32]
            e0 = int(s0[tuple(idx)]) - 127
            assert exact_at(vals, e0 + 1) and int(s1[tuple(idx)]) == int(s0[tuple(idx)]) + 1, (t.name, idx)
        total += same.size
        ambiguous += int((~same).sum())
    assert ambiguous < total * 1e-2
    q = bf.quant_summary()
    assert set(q) == {"gate_up_proj", "down_proj"} and all(v["worst"] == 0.0 for v in q.values())
    assert q["gate_up_proj"]["matrices"] == mx.config.num_hidden_layers * mx.config.num_local_experts


def test_round_trip_bytes_for_ceil_rule_blocks():
    """Blocks as a ceil(log2(amax/6)) quantizer writes them (largest code 3 or 2, as well as 4 and 6) with a ±0.5 or
    ±1.5 code come back byte for byte, scale included."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(256, 32)).astype(np.uint8)
    top = rng.choice([3, 4, 5, 6, 7], size=256)  # magnitude index of the largest code: 1.5, 2, 3, 4, 6
    codes = np.where((codes & 7) > top[:, None], (codes & 8) | top[:, None], codes).astype(np.uint8)
    codes[:, 0] = top
    codes[:, 1] = 1 | (codes[:, 1] & 8)  # a ±0.5: exact at this scale only (not one binade up)
    blocks = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)[:, None, :]
    scales = rng.integers(100, 150, size=(256, 1)).astype(np.uint8)
    vals = mxfp4.decode(blocks, scales)
    b, s = quantize_mxfp4(vals)
    keep = top >= 5  # largest code 3, 4 or 6; 1.5 and 2 come back one binade down (largest code 3 or 4)
    assert np.array_equal(b[keep], blocks[keep]) and np.array_equal(s[keep], scales[keep])
    assert np.array_equal(mxfp4.decode(b, s).view(np.uint32), vals.view(np.uint32))


def test_other_dense_dtypes_and_bad_shape(tmp_path, pair):
    cfg = preset("tiny", intermediate_size=96, vocab_size=1024)
    f32 = Checkpoint.open(synthesize(cfg, tmp_path / "f32", seed=5, shards=1, experts_dtype="F32"))
    bf = Checkpoint.open(pair[1])
    assert f32.experts_layout == "F32"
    for n in ("model.layers.1.mlp.experts.down_proj_blocks", "model.layers.0.mlp.experts.gate_up_proj_scales"):
        assert np.array_equal(f32.raw(n), bf.raw(n))
    assert np.array_equal(f32.experts(1, "down_proj", [2, 5]), bf.experts(1, "down_proj", [2, 5]))
    # a dense tensor of the wrong shape is named in one line
    from safetensors.torch import load_file, save_file

    t = load_file(str(pair[1] / "model.safetensors"))
    t["model.layers.0.mlp.experts.down_proj"] = t["model.layers.0.mlp.experts.down_proj"].transpose(1, 2).contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(t, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((pair[1] / "config.json").read_text())
    with pytest.raises(EdgecError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.experts\.down_proj: "
                                         r"shape \[8, 64, 96\], expected \[8, 96, 64\]"):
        Checkpoint.open(bad)


@pytest.fixture(scope="module")
def tf16(tmp_path_factory):
    return write_transformers_ckpt(tmp_path_factory.mktemp("tf") / "tf", seed=0)


@pytest.mark.float_sensitive
def test_transformers_checkpoint_reference_reads_16bit(tf16):
    """The reference on the 16-bit fine-tune layout agrees with transformers' own model (float32) to the reorder
    bound: it reads the dense experts, not a quantized copy (which would miss by ~1e-1, see the parity bounds)."""
    ck = Checkpoint.open(tf16)
    assert ck.experts_layout == "BF16"
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 199998, size=40)]
    ours, oracle = Reference(ck).logits(ids), hf_logits(tf16, ids)
    assert np.abs(ours - oracle).max() <= logits_bound(ck.config, oracle, len(ids))
    assert (ours.argmax(-1) == oracle.argmax(-1)).all()


def mlx_dequantized(out, cfg) -> dict[str, np.ndarray]:
    """Read the MLX output with the `safetensors` library and decode its experts with this file's own E2M1 table:
    {"gate_up_proj": [L, E, 2I, H] (gate/up rows re-interleaved), "down_proj": [L, E, H, I]}."""
    from safetensors import safe_open

    t = {}
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            t.update({k: f.get_tensor(k) for k in f.keys() if ".experts." in k and not k.endswith(".bias")})
    lut = np.array(E2M1 + [-v for v in E2M1], np.float64)

    def dec(p):
        words, sc = t[p + ".weight"], t[p + ".scales"]
        b = words.view(np.uint8)
        c = np.stack([b & 15, b >> 4], -1).reshape(*b.shape[:-1], -1)
        return lut[c] * np.repeat(np.exp2(sc.astype(np.float64) - 127), 32, axis=-1)

    res = {"gate_up_proj": [], "down_proj": []}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}.mlp.experts."
        g, u = dec(p + "gate_proj"), dec(p + "up_proj")
        gu = np.empty((g.shape[0], 2 * g.shape[1], g.shape[2]))
        gu[:, 0::2], gu[:, 1::2] = g, u
        res["gate_up_proj"].append(gu)
        res["down_proj"].append(dec(p + "down_proj"))
    return {k: np.stack(v) for k, v in res.items()}


def test_transformers_checkpoint_converts_and_reports_error(tf16, tmp_path):
    """inspect names the layout; convert --json reports per kind the relative error that an independent
    recomputation finds between the source's dense weights (read by `safetensors`) and what the output holds."""
    import torch
    from safetensors import safe_open

    r = CliRunner().invoke(main, ["inspect", str(tf16), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["experts"].startswith("bf16 dense")
    out = tmp_path / "mlx"
    r = CliRunner().invoke(main, ["convert", str(tf16), "-t", "mlx", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    cfg = Checkpoint.open(tf16).config
    got = mlx_dequantized(out, cfg)
    with safe_open(str(tf16 / "model.safetensors"), "pt") as f:
        for kind in ("gate_up_proj", "down_proj"):
            dense = np.stack([f.get_tensor(f"model.layers.{n}.mlp.experts.{kind}").to(torch.float64).numpy()
                              for n in range(cfg.num_hidden_layers)]).transpose(0, 1, 3, 2)  # [L, E, out, in]
            rel = np.sqrt(((got[kind] - dense) ** 2).sum((-2, -1)) / (dense**2).sum((-2, -1))).reshape(-1)
            # both are float64 sums of the same exactly-computed squares, in other orders
            assert summary["quantization"][kind]["mean"] == pytest.approx(rel.mean(), rel=1e-9)
            assert summary["quantization"][kind]["worst"] == pytest.approx(rel.max(), rel=1e-9)
            assert 0.05 < rel.mean() < 0.2  # Gaussian weights on a 4-bit grid: about 11%
    manifest = json.loads((out / "edgec.json").read_text())
    assert manifest["quantization"]["relative_error"] == summary["quantization"]
    assert manifest["source"]["experts"] == "BF16" and manifest["recipe"]["experts_from"] == "bf16"


def test_relative_error_helper_matches_definition():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 8, 64)).astype(np.float32)
    b, s = quantize_mxfp4(w)
    d = mxfp4.decode(b, s).astype(np.float64)
    want = np.sqrt(((d - w) ** 2).sum((1, 2)) / (w.astype(np.float64) ** 2).sum((1, 2)))
    assert np.allclose(relative_error(w, b, s), want, rtol=1e-12, atol=0)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("target", ["onnx-cpu", "mlx"])
def test_parity_against_the_16bit_reference(tf16, tmp_path, target):
    """`edgec parity SRC OUT` on an output made from the 16-bit source compares with the 16-bit model and passes the
    profile's "mxfp4-from-16bit" bounds; the exact recipe's own bounds would refuse it."""
    out = tmp_path / target
    r = CliRunner().invoke(main, ["convert", str(tf16), "-t", target, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "experts quantized from bf16 to MXFP4" in r.output
    r = CliRunner().invoke(main, ["parity", str(tf16), str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["thresholds"]["max_abs"] == 2.5
    assert rep["worst"]["max_abs"] > 1e-3  # the 16-bit reference, not a quantized one: the quantizer's error shows


def test_keep_16bit_keeps_the_dense_values(tf16, tmp_path):
    """--keep-16bit on a target with dense expert MatMuls writes the source's own values (no quantization, no
    error line); the memory plan prices that recipe at the dense format's bytes, above MXFP4's; elsewhere one line."""
    import onnx
    from onnx import numpy_helper

    from edgec.memory import recipe_weights

    out = tmp_path / "dml"
    r = CliRunner().invoke(main, ["convert", str(tf16), "-t", "onnx-dml", "-o", str(out), "--keep-16bit", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["experts"] == "decomposed" and "quantization" not in summary
    model = onnx.load(str(next(out.glob("*.onnx"))), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    name = "model.layers.1.moe.experts.down_proj.weight"  # [E, out, in] in the io dtype (fp16)
    onnx.external_data_helper.load_external_data_for_tensor(inits[name], str(out))
    got = numpy_helper.to_array(inits[name]).astype(np.float32)
    want = Checkpoint.open(tf16).experts(1, "down_proj", range(8)).astype(np.float16).astype(np.float32)
    assert np.array_equal(got, want)  # the 16-bit values rounded once to fp16, not an MXFP4 copy
    cfg = Checkpoint.open(tf16).config
    dense16, mx = recipe_weights(cfg, "fp16", "decomposed"), recipe_weights(cfg, "fp16", "mxfp4")
    assert dense16.experts > 3.5 * mx.experts  # 16 bits vs 4.25 per expert weight
    r = CliRunner().invoke(main, ["convert", str(tf16), "-t", "mlx", "-o", str(tmp_path / "m"), "--keep-16bit"])
    assert r.exit_code == 2 and "cannot keep 16-bit experts" in r.output


def test_synth_cli_writes_the_dense_layout(tmp_path):
    out = tmp_path / "s"
    r = CliRunner().invoke(main, ["synth", str(out), "--preset", "tiny", "--vocab", "1024", "--experts-dtype", "fp16"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert json.loads(r.stdout)["experts"].startswith("fp16 dense")
    ck = Checkpoint.open(out)
    assert ck.stored("model.layers.0.mlp.experts.gate_up_proj").dtype == np.float16
    assert ck.stored("model.layers.0.mlp.experts.gate_up_proj").shape == (8, 64, 128)  # [E, hidden, 2*inter]
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "o"), "--experts-dtype", "bf16", "--layout", "original"])
    assert r.exit_code == 2 and "Hugging Face layout only" in r.output
