"""MXFP4 (OCP microscaling FP4, E2M1 codes + E8M0 block scales) codec and the repackings targets need.

A block is 32 values along the last (input) dimension: 16 bytes of codes, the LOW nibble of byte j is
element 2j and the HIGH nibble element 2j+1; value = LUT[code] * 2**(scale - 127).
"""

from __future__ import annotations

import numpy as np

from .errors import EdgecError

LUT = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
LUT_X2 = (LUT * 2).astype(np.int8)  # {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}: exact INT8 with scale 2**(s-128)
SCALE_NAN = 255  # E8M0 255 is NaN


def codes(blocks: np.ndarray) -> np.ndarray:
    """[..., G, 16] uint8 -> [..., G, 32] uint8 codes in element order."""
    b = np.asarray(blocks, dtype=np.uint8)
    out = np.empty(b.shape[:-1] + (32,), dtype=np.uint8)
    np.bitwise_and(b, 0x0F, out=out[..., 0::2])
    np.right_shift(b, 4, out=out[..., 1::2])
    return out


def decode(blocks: np.ndarray, scales: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Blocks [..., G, 16] + scales [..., G] -> values [..., G*32] (exact in float32)."""
    c = codes(blocks)
    exp = np.asarray(scales, dtype=np.int32) - 127
    vals = np.ldexp(LUT[c], exp[..., None])
    return vals.reshape(c.shape[:-2] + (-1,)).astype(dtype, copy=False)


def to_int8(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact symmetric INT8 form: q [..., G*32] int8 and per-block float32 scales 2**(s-128)."""
    q = LUT_X2[codes(blocks)]
    scale = np.ldexp(np.float32(1.0), np.asarray(scales, dtype=np.int32) - 128).astype(np.float32)
    return q.reshape(q.shape[:-2] + (-1,)), scale


def to_mlx(blocks: np.ndarray) -> np.ndarray:
    """MLX `mode="mxfp4"` weights: 8 codes per uint32 word, low nibble first; [..., G, 16] -> [..., G*4]."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    return b.reshape(b.shape[:-2] + (-1,)).view("<u4")


def from_mlx(words: np.ndarray) -> np.ndarray:
    """Inverse of `to_mlx`: [..., G*4] uint32 -> [..., G, 16] uint8."""
    w = np.ascontiguousarray(words, dtype="<u4")
    return w.view(np.uint8).reshape(w.shape[:-1] + (-1, 16))


def encode(values: np.ndarray, scale_bias: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float values [..., K] (K multiple of 32) to MXFP4 blocks and scales (round to nearest code).

    The scale of each block is chosen so that its largest magnitude maps to at most 6 (plus `scale_bias`).
    """
    v = np.asarray(values, dtype=np.float32)
    g = v.reshape(v.shape[:-1] + (-1, 32))
    amax = np.abs(g).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-38) / 6.0)), -127)
    e = np.clip(e + scale_bias, -127, 127).astype(np.int32)
    scaled = g / np.ldexp(np.float32(1.0), e)[..., None]
    mags = np.abs(LUT[:8])
    idx = np.abs(np.abs(scaled)[..., None] - mags).argmin(axis=-1).astype(np.uint8)
    c = np.where((scaled < 0) & (idx > 0), idx | 8, idx).astype(np.uint8)
    blocks = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (e + 127).astype(np.uint8)


def check_scales(scales: np.ndarray, where: str, chunk: int = 1 << 24) -> None:
    """Reject E8M0 scale byte 255 (NaN), scanning a memory map in chunks."""
    flat = scales.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i : i + chunk]
        if (part == SCALE_NAN).any():
            j = i + int(np.argmax(part == SCALE_NAN))
            idx = np.unravel_index(j, scales.shape)
            raise EdgecError(f"{where}: MXFP4 scale byte 255 (NaN) at index {list(map(int, idx))}")
