"""8-bit KV cache of the MLX runtime (full-attention layers, `kv_bits=8`): fidelity against transformers fp32,
incremental decode and rollback against a fresh prefill, the bytes it allocates, and `edgec chat --kv-bits 8`.

The tiny model has head_dim 16, which no MLX group size divides: its K/V are zero-padded to 32 (group 32); the 20b
shape (head_dim 64) uses group 64 unpadded. Same code path either way (mx.quantize + mx.quantized_matmul)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hf_logits
from tolerance import assert_reordered

from edgec.cli import main
from edgec.spec import preset

STATS = re.compile(r"^prefill=(\d+) reused=(\d+) decode=(\d+) tok/s=(\d+\.\d)$", re.M)


@pytest.fixture(scope="session")
def kv8_once(tiny_mlx, ids300):
    """Logits of one 300-token prefill with the 8-bit cache."""
    return backend(tiny_mlx, kv_bits=8).forward(ids300, all_logits=True)


def backend(folder, **kw):
    from edgec.runtime.mlx_backend import MlxBackend

    return MlxBackend(folder, max_context=kw.pop("max_context", 2048), **kw)


@pytest.mark.float_sensitive
def test_kv8_logits_vs_transformers_and_the_float32_cache(tiny_mlx, kv8_once, tiny, ids300):
    """Measured on this fixture (sliding layers in the default float16): vs transformers max |diff| 1.22, mean
    0.0128, top-1 97.7% (float32 sliding layers: 0.34 / 0.0113 / 97.7%); the float32 cache is at 3e-5 / 100%.
    Bounds with margin: max |diff| < 2, mean < 0.02, top-1 >= 95%."""
    ref = hf_logits(tiny, ids300)
    q8, f32 = kv8_once, backend(tiny_mlx, kv_dtype="float32").forward(ids300, all_logits=True)
    assert np.abs(q8 - ref).max() < 2 and np.abs(q8 - ref).mean() < 0.02
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert_reordered(f32, ref, preset("tiny", num_hidden_layers=3), 300)  # the float32 cache is the exact one
    assert np.abs(q8 - f32).max() > 1e-3  # the 8-bit path really ran (quantized storage, checked below too)


@pytest.mark.float_sensitive
def test_kv8_incremental_decode_and_truncate_equal_one_shot_prefill(tiny_mlx, kv8_once, ids300):
    """Each position is quantized on its own, so decoding token by token sees the cache one prefill makes, and a
    rollback leaves the positions before it untouched. Measured max |diff| ~1e-5 (float rounding of batched vs
    single-row matmuls); bound 1e-3."""
    b = backend(tiny_mlx, kv_bits=8)
    b.forward(ids300[:280])
    steps = np.concatenate([b.forward([t]) for t in ids300[280:]])
    assert np.abs(steps - kv8_once[280:]).max() < 1e-3
    assert (steps.argmax(-1) == kv8_once[280:].argmax(-1)).all()
    full = b.cache[b.config.full_layers[0]]
    assert [t.dtype for t in full] == [b.mx.uint32, b.mx.float16, b.mx.float16] * 2  # codes, scales, biases
    b.truncate(200)
    b.forward(ids300[20:60])  # a different continuation overwrites positions 200..239
    b.truncate(200)
    again = b.forward(ids300[200:], all_logits=True)  # ... and the original one rewrites them
    assert b.length == 300
    assert np.abs(again - kv8_once[200:]).max() < 1e-3


def test_kv8_bytes_match_the_arithmetic_and_the_memory_plan(tiny_mlx):
    import mlx.core as mx

    from edgec.memory import facts_kv_bytes, recipe_weights
    from edgec.runtime.mlx_backend import MlxBackend
    from edgec.spec import preset

    for kw in ({"kv_bits": 8}, {"kv_bits": 8, "kv_dtype": "bfloat16"}, {"kv_dtype": "float32"}):
        b = backend(tiny_mlx, max_context=131072, **kw)
        c = b.config
        for i in range(c.num_hidden_layers):  # one token at the last position: each layer allocates its full plan
            z = mx.zeros((c.num_key_value_heads, 1, c.head_dim))
            b._store(i, z, z, 0 if c.is_sliding(i) else 131071)
        mx.eval(*[t for kv in b.cache for t in kv])
        base = {"float32": 4, "bfloat16": 2, "float16": 2}[b.kv_dtype_name]
        # by hand for this model: 1 full layer, 2 kv heads, head_dim 16 padded to 32 (one group: 32 code bytes +
        # float16 scale + float16 bias); 2 sliding layers of 128 + 1024 + 512 positions
        full = 131072 * 2 * 2 * ((32 + 4) if kw.get("kv_bits") else 16 * base)
        assert b.kv_bytes() == full + 2 * 1664 * 2 * 2 * 16 * base == b.memory_plan().kv
    cfg20 = preset("20b")  # head_dim 64: group 64, 68 bytes per head and position vs bf16's 128
    w = recipe_weights(cfg20, "bf16", "mxfp4")
    kv8 = MlxBackend.plan(cfg20, 131072, w, kv_bits=8, kv_dtype="float16").kv
    assert kv8 == 12 * 131072 * 2 * 8 * 68 + 12 * 1664 * 2048
    assert 0.52 < kv8 / MlxBackend.plan(cfg20, 131072, w, kv_dtype="float16").kv < 0.54
    assert MlxBackend.plan(cfg20, 131072, w, kv_dtype="float16").kv - facts_kv_bytes(cfg20, 131072) == \
        12 * (1664 - 128) * 2048  # the sliding layers' rollback margin and prefill chunk


def test_chat_and_generate_with_kv_bits_8(tiny_mlx, tiny_onnx):
    r = CliRunner().invoke(main, ["chat", str(tiny_mlx), "--kv-bits", "8", "--stats", "--max-tokens", "4",
                                  "--temperature", "0"], input="hi\n/exit\n")
    assert r.exit_code == 0, (r.output, r.exception)
    m = STATS.search(r.output)
    assert m and int(m.group(1)) > 0 and int(m.group(3)) == 4
    r = CliRunner().invoke(main, ["generate", str(tiny_mlx), "--prompt", "hi", "--kv-bits", "8", "--kv-dtype",
                                  "bfloat16", "--max-tokens", "3", "--temperature", "0", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert len(json.loads(r.output)["tokens"]) == 3
    r = CliRunner().invoke(main, ["chat", str(tiny_onnx), "--kv-bits", "8"], input="/exit\n")
    assert r.exit_code == 2 and "--kv-bits 8: the onnx runtime" in r.output and "has no such option" in r.output
