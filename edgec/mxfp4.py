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


# byte -> its two decoded values (low nibble first) as one 8-byte word: one gather per byte instead of per nibble
_PAIRS = np.stack([LUT[np.arange(256) & 0x0F], LUT[np.arange(256) >> 4]], axis=-1).view(np.uint64).reshape(256)


def decode(blocks: np.ndarray, scales: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Blocks [..., G, 16] + scales [..., G] -> values [..., G*32] (exact in float32: LUT * 2**(scale-127))."""
    vals = np.take(_PAIRS, np.asarray(blocks, dtype=np.uint8)).view(np.float32)  # [..., G, 32]
    with np.errstate(over="ignore"):  # scales >= 254 can overflow float32 to inf, as in the reference
        vals *= np.ldexp(np.float32(1.0), np.asarray(scales, dtype=np.int32) - 127).astype(np.float32)[..., None]
    return vals.reshape(vals.shape[:-2] + (-1,)).astype(dtype, copy=False)


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


# ---- ONNX Runtime QMoE repackings (onnx-* targets) ---------------------------------------------------------
def to_qmoe_fp4(blocks: np.ndarray) -> np.ndarray:
    """QMoE `quant_type="fp4"` weights in the CUDA kernel's N-packed layout: [..., N, G, 16] (rows = outputs) ->
    [..., K, N/2], the pair of output rows (2n, 2n+1) of input column k packed into one byte, low nibble = even
    row. Lossless. (onnxruntime's CPU kernel takes the checkpoint's own row-major bytes instead.)"""
    b = np.asarray(blocks, dtype=np.uint8)
    c = codes(b)  # [..., N, G, 32]
    c = c.reshape(c.shape[:-2] + (-1,))  # [..., N, K]
    c = np.swapaxes(c, -1, -2)  # [..., K, N]
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def _int4_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each block maximum (magnitude index a = 0..7) and each candidate scale c (in units of the MXFP4
    block scale): the int4 level of every FP4 code, its squared error, and c itself."""
    mags = LUT[:8]
    fracs = np.concatenate([np.linspace(2.5, 8.5, 49), [7.0, 8.0]])
    cands = np.empty((8, 2 * len(fracs) + 4), dtype=np.float32)
    for a in range(8):
        m = mags[a] if a else 1.0
        c = np.concatenate([m / fracs, -m / fracs, [0.5, -0.5, 1.0, -1.0]])
        cands[a] = c
    q = np.clip(np.rint(LUT[None, None, :] / cands[:, :, None]), -8, 7)  # [8, C, 16]
    err = (q * cands[:, :, None] - LUT[None, None, :]) ** 2
    return q.astype(np.int8), err.astype(np.float32), cands


_INT4 = None


def to_qmoe_int4(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lossy QMoE INT4 (zero point 8, block 32) chosen to minimise each block's squared error exactly.

    MXFP4 blocks hold at most 15 distinct values, so for each block the error of every candidate scale is a
    dot product of the block's code histogram with a precomputed table; the best of ~100 candidate scales
    (signed: the asymmetric int4 range -8..7 can put either sign's extreme on -8) is kept.
    Returns packed uint8 [..., N, K/2] (low nibble = even k) and float32 scales [..., N, G].
    """
    global _INT4
    if _INT4 is None:
        _INT4 = _int4_tables()
    qtab, etab, ctab = _INT4
    b = np.asarray(blocks, dtype=np.uint8)
    lead = b.shape[:-2]
    c = codes(b).reshape(-1, 32)  # [nb, 32]
    nb = c.shape[0]
    a = (c & 7).max(axis=1)  # magnitude index of the block maximum (LUT magnitudes grow with code & 7)
    hist = np.bincount((np.arange(nb, dtype=np.int64)[:, None] * 16 + c).ravel(), minlength=nb * 16)
    hist = hist.reshape(nb, 16).astype(np.float32)
    best = np.empty(nb, dtype=np.int64)
    for ai in range(8):
        sel = np.nonzero(a == ai)[0]
        if sel.size:
            best[sel] = np.argmin(hist[sel] @ etab[ai].T, axis=1)
    q = qtab[a[:, None], best[:, None], c]  # [nb, 32] int8 in -8..7
    u = (q + 8).astype(np.uint8).reshape(lead + (-1,))
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    unit = np.ldexp(np.float32(1.0), np.asarray(scales, dtype=np.int32).reshape(-1) - 127)
    scale = (ctab[a, best] * unit).astype(np.float32).reshape(np.asarray(scales).shape)
    return packed, scale
