"""MXFP4 codec properties, checked against the format's definition (facts file section 3) and against MLX."""

from __future__ import annotations

import numpy as np
import pytest

from edgec import mxfp4
from edgec.errors import EdgecError


def e2m1(code: int) -> float:
    """One E2M1 code from the format's definition: sign bit 3, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else (1.0 + man / 2) * 2.0 ** (exp - 1)
    return sign * mag


def decode_slow(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per element, in plain Python: low nibble of byte j is element 2j, high nibble element 2j+1."""
    *lead, g, _ = blocks.shape
    out = np.empty((*lead, g * 32), dtype=np.float64)
    for idx in np.ndindex(*lead, g):
        scale = 2.0 ** (int(scales[idx]) - 127)
        for i in range(32):
            byte = int(blocks[idx][i // 2])
            code = byte & 0x0F if i % 2 == 0 else byte >> 4
            out[(*idx[:-1], idx[-1] * 32 + i)] = e2m1(code) * scale
    return out


def random_blocks(rng, shape, scale_lo=100, scale_hi=140):
    blocks = rng.integers(0, 256, size=(*shape, 16), dtype=np.uint8)
    scales = rng.integers(scale_lo, scale_hi, size=shape, dtype=np.uint8)
    return blocks, scales


def test_lut_is_the_e2m1_table():
    assert [e2m1(c) for c in range(16)] == mxfp4.LUT.tolist()
    assert np.signbit(mxfp4.LUT[8])  # -0


def test_decode_matches_per_element_definition():
    rng = np.random.default_rng(0)
    blocks, scales = random_blocks(rng, (3, 5, 4))
    # every byte value and the extreme scales (subnormal 2**-127 and large) appear at least once
    blocks[0, 0, :, :] = np.arange(64, dtype=np.uint8).reshape(4, 16)
    blocks[0, 1, :, :] = np.arange(64, 128, dtype=np.uint8).reshape(4, 16)
    blocks[0, 2, :, :] = np.arange(128, 192, dtype=np.uint8).reshape(4, 16)
    blocks[0, 3, :, :] = np.arange(192, 256, dtype=np.uint8).reshape(4, 16)
    scales[1, 0] = [0, 1, 2, 127]
    scales[1, 1] = [200, 225, 250, 254 - 3]
    got = mxfp4.decode(blocks, scales)
    assert got.dtype == np.float32 and got.shape == (3, 5, 128)
    want = decode_slow(blocks, scales)
    assert np.array_equal(got.astype(np.float64), want)  # exact, including 2**-128 subnormals
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_to_int8_times_scale_is_decode_bit_exact():
    rng = np.random.default_rng(1)
    blocks, scales = random_blocks(rng, (4, 6, 3), 0, 250)
    q, s = mxfp4.to_int8(blocks, scales)
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.shape == (4, 6, 96) and s.shape == (4, 6, 3)
    assert set(np.unique(q).tolist()) <= {0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12}
    product = (q.reshape(4, 6, 3, 32).astype(np.float32) * s[..., None]).reshape(4, 6, 96)
    assert np.array_equal(product, mxfp4.decode(blocks, scales))
    assert np.array_equal(s, np.float32(2.0) ** (scales.astype(np.float32) - 128))


def test_mlx_words_round_trip_and_order():
    rng = np.random.default_rng(2)
    blocks, _ = random_blocks(rng, (2, 3, 5))
    words = mxfp4.to_mlx(blocks)
    assert words.dtype == np.uint32 and words.shape == (2, 3, 20)
    assert np.array_equal(mxfp4.from_mlx(words), blocks)
    # 8 codes per word, low nibble first: code i of the word is bits 4i..4i+3
    codes = mxfp4.codes(blocks).reshape(2, 3, 20, 8)
    for i in range(8):
        assert np.array_equal((words >> (4 * i)) & 0xF, codes[..., i])


def canonical(rng, shape):
    """Blocks encode would produce: every block's largest magnitude is code 6 or 7 (4.0 / 6.0), no -0."""
    blocks, scales = random_blocks(rng, shape)
    c = mxfp4.codes(blocks)
    c[c == 8] = 0
    c[c & 7 >= 6] = c[c & 7 >= 6] & 0b1011  # clear 4/6 everywhere (6->2, 7->3, 14->10, 15->11) ...
    c[..., 0] = rng.choice([6, 7, 14, 15], size=c.shape[:-1])  # ... then put one 4 or 6 in each block
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8), scales


def test_encode_decode_round_trip():
    rng = np.random.default_rng(3)
    blocks, scales = canonical(rng, (3, 7, 4))
    b2, s2 = mxfp4.encode(mxfp4.decode(blocks, scales))
    assert np.array_equal(b2, blocks) and np.array_equal(s2, scales)
    # any MXFP4 values survive encode -> decode (bytes may differ: -0 and blocks without a 4 or 6)
    blocks, scales = random_blocks(rng, (5, 6))
    x = mxfp4.decode(blocks, scales)
    assert np.array_equal(mxfp4.decode(*mxfp4.encode(x)), x)
    # arbitrary floats: every value lands on the nearest point of its block's grid
    v = rng.standard_normal((8, 64)).astype(np.float32)
    b3, s3 = mxfp4.encode(v)
    d = mxfp4.decode(b3, s3).reshape(8, 2, 32)
    grid = mxfp4.LUT[None, None, :8, None] * np.ldexp(1.0, s3.astype(int) - 127)[..., None, None]
    best = np.abs(np.abs(v.reshape(8, 2, 1, 32)) - grid).min(axis=2)
    assert np.allclose(np.abs(np.abs(v.reshape(8, 2, 32)) - np.abs(d)), best, rtol=0, atol=1e-7)


def test_check_scales_rejects_nan_scale():
    s = np.full((2, 3, 4), 120, dtype=np.uint8)
    mxfp4.check_scales(s, "x")
    s[1, 2, 3] = 255
    with pytest.raises(EdgecError, match=r"x: MXFP4 scale byte 255 \(NaN\) at index \[1, 2, 3\]"):
        mxfp4.check_scales(s, "x")


# ---- MLX as the independent implementation (mlx[cpu] is a test dependency: a missing one fails, never skips) ----
import mlx.core as mx  # noqa: E402


def test_to_mlx_agrees_with_mlx_lm_sanitize(tiny):
    from mlx_lm.models.gpt_oss import Model

    from edgec.checkpoint import Checkpoint

    ck = Checkpoint.open(tiny)
    p = "model.layers.1.mlp.experts."
    names = ["gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"]
    weights = {p + n: mx.array(np.array(ck.raw(p + n))) for n in names}
    out = Model.sanitize(None, weights)  # self is not used
    words = mxfp4.to_mlx(ck.raw(p + "gate_up_proj_blocks"))
    assert np.array_equal(np.array(out[p + "gate_proj.weight"]), words[:, 0::2])
    assert np.array_equal(np.array(out[p + "up_proj.weight"]), words[:, 1::2])
    assert np.array_equal(np.array(out[p + "down_proj.weight"]), mxfp4.to_mlx(ck.raw(p + "down_proj_blocks")))
    ck.close()


def test_mlx_dequantize_gives_decode_values():
    rng = np.random.default_rng(4)
    blocks, scales = random_blocks(rng, (24, 5), 90, 160)
    w = mx.dequantize(mx.array(mxfp4.to_mlx(blocks)), mx.array(scales), group_size=32, bits=4, mode="mxfp4",
                      dtype=mx.float32)
    assert np.array_equal(np.array(w), mxfp4.decode(blocks, scales))


def test_mlx_quantize_gives_the_same_bytes():
    rng = np.random.default_rng(5)
    blocks, scales = canonical(rng, (16, 3))
    wq, s = mx.quantize(mx.array(mxfp4.decode(blocks, scales)), group_size=32, bits=4, mode="mxfp4")
    assert np.array_equal(np.array(wq), mxfp4.to_mlx(blocks))
    assert np.array_equal(np.array(s), scales)
