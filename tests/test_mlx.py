"""MLX target: converter vs mlx-lm (bit for bit), runtime vs transformers fp32 and mlx-lm, cache, bad input."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx  # noqa: E402
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hf_logits

from edgec.cli import main  # noqa: E402
from edgec.convert import run_convert  # noqa: E402
from edgec.errors import EdgecError  # noqa: E402
from edgec.runtime import mlx_backend  # noqa: E402
from edgec.runtime.base import load_backend  # noqa: E402


@pytest.fixture(scope="module")
def out(tiny_mlx) -> Path:
    return tiny_mlx


@pytest.fixture(scope="module")
def backend(out):
    return load_backend(out)


def _mlx_lm(path: Path):
    from mlx_lm.utils import load_model

    return load_model(Path(path))[0]


def _params(model) -> dict[str, np.ndarray]:  # noqa: ANN001
    from mlx.utils import tree_flatten

    return {k: (str(v.dtype), np.array(v.view(mx.uint8))) for k, v in tree_flatten(model.parameters())}


def test_converted_weights_bit_identical_to_mlx_lm_and_same_logits(tiny, out):
    """Every parameter mlx-lm builds from OUT equals, byte for byte, what it builds from the source checkpoint
    (experts: uint32 MXFP4 words de-interleaved into gate/up; everything else bf16), so its logits are equal."""
    src, dst = _mlx_lm(tiny), _mlx_lm(out)
    a, b = _params(src), _params(dst)
    assert a.keys() == b.keys()
    assert any(k.endswith("experts.gate_proj.weight") for k in a)
    for k in a:
        assert a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]), k
    assert dst.model.layers[0].mlp.experts.gate_proj.mode == "mxfp4"
    ids = mx.array([[200006, 17360, 200008, 3575, 553, 261, 200007]])
    assert np.array_equal(np.array(src(ids).astype(mx.float32)), np.array(dst(ids).astype(mx.float32)))


def test_q8_dense_matches_mlx_lm_quantization(tiny, tmp_path):
    """--dense q8 equals mlx-lm quantizing the source itself (affine, 8 bits, group 64) on the same modules."""
    import mlx.nn as nn

    o = tmp_path / "q8"
    run_convert(tiny, "mlx", o, dense="q8", progress=False)
    src = _mlx_lm(tiny)
    nn.quantize(src, group_size=64, bits=8, mode="affine",
                class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)) and "experts" not in p)
    a, b = _params(src), _params(_mlx_lm(o))
    assert a.keys() == b.keys() and any(k.endswith("q_proj.biases") for k in a)
    for k in a:
        assert a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]), k
    got = load_backend(o).forward([200006, 17360, 200008], all_logits=True)  # the runtime reads q8 folders
    assert got.shape == (3, 201088) and np.isfinite(got).all()


def test_runtime_vs_transformers_300(tiny, out, backend, ids300):
    ref = hf_logits(tiny, ids300)
    backend.reset()
    got = backend.forward(ids300, all_logits=True)
    ours = np.abs(got - ref).max()
    theirs = np.abs(np.array(_mlx_lm(out)(mx.array([ids300]))[0].astype(mx.float32)) - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert ours <= theirs, (ours, theirs)


def test_runtime_long_context(tiny, backend, ids_long):
    """Positions 4,200-4,500 (past YaRN's original 4,096): >= 99% top-1 agreement with transformers fp32."""
    ref = hf_logits(tiny, ids_long)[4200:]
    backend.reset()
    backend.forward(ids_long[:4200])
    got = backend.forward(ids_long[4200:], all_logits=True)
    assert got.shape == ref.shape
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert backend.kv_bytes() > 0


def test_incremental_decode_and_truncate(out, ids_long, monkeypatch):
    """Prefill + token-by-token decode == one-shot prefill; truncate(n) + forward == a fresh prefill, both within
    the kept sliding history and past it (small margins so the sliding buffers move in a short sequence)."""
    monkeypatch.setattr(mlx_backend, "ROLLBACK_MARGIN", 16)
    monkeypatch.setattr(mlx_backend, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(mlx_backend, "FULL_CHUNK", 64)
    ids = ids_long[:200]
    b = load_backend(out)
    whole = b.forward(ids, all_logits=True)
    assert b.sw_start > 0  # the sliding buffers did drop old positions
    b.reset()
    steps = [b.forward(ids[:170], all_logits=True)] + [b.forward([t]) for t in ids[170:]]
    np.testing.assert_allclose(np.concatenate(steps), whole, atol=1e-5, rtol=0)
    # the full layer grew 64 -> 128 -> 192 -> 320 positions (x1.5, in 64-position steps), not once per decode step;
    # sliding layers: window 128 + margin 16 + prefill chunk 16; float32 K and V, 2 kv heads, head dim 16
    assert b.kv_bytes() == (320 + 2 * (128 + 16 + 16)) * 2 * 2 * 16 * 4
    for n in (190, 60, 5):  # 190: inside the kept history (144 positions); 60 and 5: past it (recomputed)
        b.truncate(n)
        assert b.length == n
        np.testing.assert_allclose(b.forward(ids[n:], all_logits=True), whole[n:], atol=1e-5, rtol=0)
        assert b.length == len(ids)


def test_edgec_logits_cli(out, backend, tmp_path):
    npy = tmp_path / "l.npy"
    r = CliRunner().invoke(main, ["logits", str(out), "--ids", "200006,17360,200008,3575", "--out", str(npy)])
    assert r.exit_code == 0, r.output
    backend.reset()
    want = backend.forward([200006, 17360, 200008, 3575], all_logits=True)
    got = np.load(npy)
    np.testing.assert_allclose(got.reshape(-1, want.shape[-1])[-1], want[-1], atol=1e-5, rtol=0)


def test_bad_input(tiny, out, tmp_path, monkeypatch):
    with pytest.raises(EdgecError, match="exists"):
        run_convert(tiny, "mlx", out, progress=False)
    r = CliRunner().invoke(main, ["convert", str(tiny), "-t", "mlx", "-o", str(tmp_path / "x"), "--experts", "int4"])
    assert r.exit_code == 2 and "mxfp4" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()

    from edgec.safetensors_io import SafetensorsWriter

    calls = {"n": 0}
    real = SafetensorsWriter.write

    def interrupted(self, name, data, **kw):  # noqa: ANN001, ANN003
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(self, name, data, **kw)

    monkeypatch.setattr(SafetensorsWriter, "write", interrupted)
    with pytest.raises(EdgecError, match="interrupted"):
        run_convert(tiny, "mlx", tmp_path / "y", progress=False)
    assert calls["n"] == 20 and list(tmp_path.iterdir()) == []  # no folder, no temporary left behind
