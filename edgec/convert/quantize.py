"""16-bit weights -> MXFP4 (E2M1 codes, one E8M0 scale per 32 inputs), with the error it costs.

The rule (per block of 32 values along the input axis):
- codes: round to nearest on the E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code
  (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), magnitudes above 6 saturate to 6;
  the sign bit is the value's sign bit, so -0.0 stays code 8 (bf16 keeps -0, and so does the round trip).
- scale: two candidates, the OCP MX spec's X = floor(log2(amax)) - 2 (amax maps into [4, 8), the part above 6
  saturates) and X + 1 (amax maps into [2, 4), nothing saturates, coarser grid). Each block keeps the candidate
  with the smaller squared error; on a tie the larger scale. The exponent is clamped to E8M0's -127..127.
  An all-zero block gets scale byte 0 (its codes keep the zeros' signs).
- Compared: the OCP MX v1.0 spec (section 6.3) and llama.cpp's `quantize_row_mxfp4_ref` (ggml-quants.c: e =
  floor(log2(amax)) - 2, byte 0 for an all-zero block, then the nearest code, ties to the lower code) use X alone;
  transformers' `integrations/mxfp4.py` quantizes through
  triton_kernels' `downcast_to_mxfp`, which rounds the scale up from amax / 6 (ceil(log2(amax / 6)), so nothing
  saturates; equal to X or X + 1). Trying both and keeping the better is never worse than either rule alone.
- Round trip: every MXFP4 value is exact in bf16 (and float32), so dequantized MXFP4 requantizes with zero error
  and the same decoded values. Bits are identical whenever the stored encoding is the one this rule picks among the
  exact ones: a value set has several exact encodings only when it also fits the grid one binade up (no ±0.5 or
  ±1.5 codes) or down (no code above 3); the tie rule takes the larger scale, which is what a ceil rule writes for
  blocks whose maximum code is 2 or 3. Blocks whose largest code is 4 or 6 and that hold a ±0.5 or ±1.5 code,
  and blocks whose largest code is 2 or 3, always come back bit for bit; an all-zero block comes back with scale 0.
"""

from __future__ import annotations

import numpy as np

from ..mxfp4 import LUT

BLOCK = 32
CHUNK_BLOCKS = 8192
RULE = ("E2M1 round-to-nearest-even; per block the E8M0 scale floor(log2(amax))-2 or +1 with the smaller squared "
        "error (ties: the larger)")
# tie-breaking thresholds on |x| / 2**e: code k+1 when |x| > MID[k] (even k) or >= MID[k] (odd k): ties to even
_MID = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
_MAG = np.abs(LUT[:8])
_MAG2 = 2 * _MAG


def _codes(mag: np.ndarray) -> np.ndarray:
    """Scaled magnitudes -> magnitude code 0..7 (round to nearest, ties to even, saturating)."""
    idx = np.zeros(mag.shape, dtype=np.uint8)
    for k, m in enumerate(_MID):
        idx += (mag >= m) if k % 2 else (mag > m)
    return idx


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., out, in] (in % 32 == 0) -> (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]),
    the checkpoint's MXFP4 layout (`edgec.mxfp4.decode` inverts it). Finite input expected. Works in chunks of
    CHUNK_BLOCKS blocks, so the temporaries stay in cache."""
    v = np.asarray(w, dtype=np.float32)
    if v.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {v.shape[-1]} is not a multiple of {BLOCK}")
    g = v.reshape(-1, BLOCK)
    blocks = np.empty((g.shape[0], BLOCK // 2), np.uint8)
    scales = np.empty(g.shape[0], np.uint8)
    for i in range(0, g.shape[0], CHUNK_BLOCKS):
        blocks[i : i + CHUNK_BLOCKS], scales[i : i + CHUNK_BLOCKS] = _quantize_blocks(g[i : i + CHUNK_BLOCKS])
    lead = v.shape[:-1] + (v.shape[-1] // BLOCK,)
    return blocks.reshape(lead + (BLOCK // 2,)), scales.reshape(lead)


def _quantize_blocks(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 32] float32 -> ([n, 16], [n]) uint8."""
    mag = np.abs(g)
    amax = mag.max(axis=-1)
    _, ex = np.frexp(amax)  # amax = m * 2**ex, m in [0.5, 1): floor(log2(amax)) = ex - 1
    x0 = np.clip(ex.astype(np.int32) - 3, -127, 127)
    s0 = mag * np.ldexp(np.float32(1.0), -x0)[..., None]  # exact power-of-two scaling: amax/2**x0 in [4, 8)
    i0, i1 = _codes(s0), _codes(s0 * np.float32(0.5))  # candidate X and X + 1 (half the scaled magnitudes)
    # squared error in units of 4**X: (LUT - s)**2 at X, 4 * (LUT - s/2)**2 = (2 * LUT - s)**2 at X + 1; the sums
    # are float32 (exactly 0 for an exact block, so the round trip's choice is exact; near-ties may go either way)
    e0 = np.square(_MAG[i0] - s0).sum(axis=-1)
    e1 = np.square(_MAG2[i1] - s0).sum(axis=-1)
    up = (e1 <= e0) & (x0 < 127)
    best_idx = np.where(up[..., None], i1, i0)
    best_e = x0 + up
    code = best_idx | (np.signbit(g).astype(np.uint8) << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    scales = np.where(amax > 0, best_e + 127, 0).astype(np.uint8)
    return blocks, scales


def squared_error(w: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per matrix over the last two axes of w [..., out, in]: (sum of squared error, sum of squares of w), float64."""
    from ..mxfp4 import decode

    v = np.asarray(w, dtype=np.float32)
    d = decode(blocks, scales).reshape(v.shape)
    diff = (d.astype(np.float64) - v) ** 2
    return diff.sum(axis=(-2, -1)), np.square(v, dtype=np.float64).sum(axis=(-2, -1))


def relative_error(w: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per matrix over the last two axes: ||w - dequant||_F / ||w||_F (0 where w is all zero and so is the error)."""
    err, ref = squared_error(w, blocks, scales)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, np.sqrt(err / np.where(ref > 0, ref, 1)), np.sqrt(err))
