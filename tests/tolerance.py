"""Float tolerances from an error model, never from one machine's figures (README "Tolerances").

Two float32 evaluations of the same sum of K products that differ only in the order of the additions (BLAS
blocking for a 30-row vs a 40-row matmul, SIMD width, threads, MLAS vs OpenBLAS vs torch) differ by at most
2·γ_K·Σ|x_i·w_i|, γ_K = K·u / (1 - K·u), u = eps/2 (Higham, Accuracy and Stability of Numerical Algorithms, §3.1).
A forward pass chains `depth` such reductions of length at most K (per layer: q/k/v, scores, probs·v, o, router,
mlp1, mlp2; then the unembedding), each with RMSNorm / softmax in between keeping every stage's output at its own
scale, so to first order the logits differ by at most depth·2·γ_K relative to the logit scale max|logits|.
That holds on any conforming BLAS and vector width; a wrong position, cache or mask moves logits by O(their spread),
hundreds of times more (each test also asserts top-1 agreement or a spread where that matters).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
REDUCTIONS_PER_LAYER = 8  # q/k/v, q·k, probs·v, o, router, mlp1, mlp2, plus the MoE's top-k weighted sum


def gamma(k: int, eps: float = EPS32) -> float:
    """γ_K: the relative error bound of a float sum of K terms (u = eps/2 per rounding)."""
    u = eps / 2
    assert k * u < 1, (k, eps)
    return k * u / (1 - k * u)


def reorder_bound(k: int, scale: float, depth: int = 1, eps: float = EPS32) -> float:
    """How far two orderings of `depth` chained K-term reductions may land apart, for outputs of size `scale`:
    each result carries at most γ_K·scale from its own order, so two results differ by at most 2·γ_K·scale."""
    return depth * 2 * gamma(k, eps) * scale


def logits_bound(config, logits: np.ndarray, positions: int, eps: float = EPS32) -> float:
    """The reorder bound for a gpt-oss forward pass: K is the longest reduction (hidden, intermediate, or the
    attention's positions), depth the chained reductions, scale the logits' max |value|."""
    k = max(config.hidden_size, config.intermediate_size, config.head_dim * config.num_attention_heads, positions)
    depth = REDUCTIONS_PER_LAYER * config.num_hidden_layers + 1
    return reorder_bound(k, float(np.abs(logits).max()), depth, eps)


def assert_reordered(got: np.ndarray, want: np.ndarray, config, positions: int, eps: float = EPS32) -> None:
    """`got` is `want` computed with the additions in another order (another batch size, cache, kernel)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    bound = logits_bound(config, want, positions, eps)
    diff = float(np.abs(got.astype(np.float64) - want).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > reorder bound {bound:.3g} (K-term float32 sums, README Tolerances)"
