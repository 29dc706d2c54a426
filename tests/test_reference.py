"""The numpy reference against transformers' GptOssForCausalLM in float32 (the independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_logits, make_ckpt
from tolerance import assert_reordered, logits_bound

from edgec.checkpoint import Checkpoint
from edgec.runtime.base import load_backend
from edgec.runtime.reference import Reference

pytestmark = pytest.mark.float_sensitive


def assert_agrees(ours: np.ndarray, oracle: np.ndarray, config, positions: int) -> None:
    assert ours.shape == oracle.shape and ours.dtype == np.float32
    diff = np.abs(ours - oracle).max(axis=-1)  # per position
    top1 = (ours.argmax(-1) == oracle.argmax(-1)).mean()
    # numpy and torch evaluate the same float32 sums in other orders (and libm's exp to within an ulp, one more
    # rounding per reduction): tests/tolerance.py's reorder bound, relative to the logit scale
    tol = logits_bound(config, oracle, positions)
    assert diff.max() <= tol, f"max |diff| {diff.max():.2e} > {tol:.2e} at position {int(diff.argmax())}"
    assert top1 == 1.0, f"top-1 agreement {top1:.3%}"
    assert oracle.std() > 0.3  # logits are spread, so top-1 agreement means something


def test_tiny_300_positions_both_layouts(tiny, ids300):
    """3 layers (odd), 8 q / 2 kv heads, top-4 of 8 experts, 300 positions: past the 128-token window."""
    ours = Reference(ck := Checkpoint.open(tiny)).logits(ids300)
    assert_agrees(ours, hf_logits(tiny, ids300), ck.config, len(ids300))
    assert np.array_equal(Reference(Checkpoint.open(tiny / "original")).logits(ids300), ours)


@pytest.fixture(scope="module")
def odd_shape(tmp_path_factory):
    """kv heads != heads/8 (6 q heads over 3 kv heads), top-2 of 6 experts, head_dim 64 as in the real models,
    hidden != intermediate."""
    return make_ckpt(tmp_path_factory.mktemp("odd") / "odd", layout="hf", seed=7, num_hidden_layers=2,
                     hidden_size=96, intermediate_size=160, head_dim=64, num_attention_heads=6,
                     num_key_value_heads=3, num_local_experts=6, num_experts_per_tok=2)


def test_odd_shape_300_positions(odd_shape, ids300):
    ck = Checkpoint.open(odd_shape)
    assert_agrees(Reference(ck).logits(ids300), hf_logits(odd_shape, ids300), ck.config, len(ids300))


def test_long_context_past_4096(tiny, ids_long):
    """Positions 4,200-4,500: YaRN's extrapolated range, the correction range left unrounded (truncate false)."""
    ours = Reference(ck := Checkpoint.open(tiny)).logits(ids_long, last=301)
    assert_agrees(ours, hf_logits(tiny, ids_long)[-301:], ck.config, len(ids_long))


def test_last_and_backend_agree_with_full_sequence(tiny, ids300):
    """The same logits from other batch shapes: a 30-row and a 40-row matmul may take different BLAS blockings, so
    they agree to the reorder bound (tests/tolerance.py), not bit for bit."""
    ref = Reference(ck := Checkpoint.open(tiny))
    ids = ids300[:40]
    full = ref.logits(ids)

    def agree(got, want):
        assert_reordered(got, want, ck.config, len(ids))
        assert np.array_equal(got.argmax(-1), want.argmax(-1))

    agree(ref.logits(ids, last=3), full[-3:])
    be = load_backend(tiny)
    first = be.forward(ids[:30], all_logits=True)
    assert be.length == 30
    agree(first, full[:30])
    agree(be.forward(ids[30:]), full[-1:])
    be.truncate(10)
    assert be.length == 10
    agree(be.forward(ids[10:20], all_logits=True), full[10:20])
