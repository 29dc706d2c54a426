"""tests/tolerance.py's bound holds for float32 sums in any order, and a real error (a wrong row) breaks it."""

from __future__ import annotations

import numpy as np
import pytest
from tolerance import EPS32, gamma, reorder_bound

pytestmark = pytest.mark.float_sensitive


def test_reorder_bound_holds_for_blas_pairwise_and_sequential_sums():
    rng = np.random.default_rng(0)
    k = 4096
    x = rng.standard_normal((40, k)).astype(np.float32)
    w = (rng.standard_normal((k, 64)) * 0.05).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    blas = x @ w  # the BLAS kernel's blocking and vector width
    rows = x[:30] @ w  # another row count: another blocking
    seq = np.zeros((40, 64), np.float32)
    for i in range(0, k, 7):  # sequential-ish chunks: another order again
        seq += x[:, i:i + 7] @ w[i:i + 7]
    scale = float((np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)).max())  # Σ|x·w|
    for got in (blas, seq):
        assert np.abs(got - exact).max() <= gamma(k) * scale  # Higham's bound for one order
    assert np.abs(blas - seq).max() <= reorder_bound(k, scale)
    assert np.abs(rows - blas[:30]).max() <= reorder_bound(k, scale)
    # a wrong row (an off-by-one position) is far outside it
    assert np.abs(blas[1:31] - blas[:30]).max() > 100 * reorder_bound(k, scale)


def test_gamma_is_the_standard_constant():
    assert gamma(1) == pytest.approx(EPS32 / 2, rel=1e-6)
    assert reorder_bound(100, 2.0, depth=3) == pytest.approx(3 * 2 * gamma(100) * 2.0)
