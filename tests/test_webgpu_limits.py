"""onnx-webgpu within a browser's buffer limits (issue 21): every initializer within the profile's
`max_buffer_bytes` (the embedding and lm_head as vocabulary shards), the sharded graph's logits identical to the
unsharded graph's, and the 20b shape's graphs within the limits."""

import numpy as np
import onnx
import pytest

import edgec.convert as conv
from edgec.convert import run_convert
from edgec.convert.onnx_graph import EDGEC_GRAPH, GENAI_GRAPH, ITEMSIZE
from edgec.errors import EdgecError
from edgec.runtime.onnx_backend import OnnxBackend
from edgec.targets import load_profile

IDS = [200006, 17360, 200008, 3, 1, 200007, 199999, 0]  # both ends of the vocabulary: first, middle, last shards


def convert_capped(monkeypatch, src, out, cap, **formats):
    """`edgec convert --target onnx-webgpu` with the profile's max_buffer_bytes set to `cap` (0: no cap)."""
    prof = load_profile("onnx-webgpu")
    prof["max_buffer_bytes"] = cap
    monkeypatch.setattr(conv, "load_profile", lambda name: prof)
    run_convert(src, "onnx-webgpu", out, progress=False, **formats)
    return out


def initializer_bytes(folder, graph=EDGEC_GRAPH, external=True):
    """{name: bytes} of the graph's initializers stored in model.onnx.data (external=False: the small constants
    inside the graph)."""
    g = onnx.load(str(folder / graph), load_external_data=False).graph
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) * ITEMSIZE[t.data_type] for t in g.initializer
            if (t.data_location == onnx.TensorProto.EXTERNAL) == external}


def cpu_logits(folder):
    b = OnnxBackend(folder, provider="CPUExecutionProvider")
    return b.forward(IDS, all_logits=True)


@pytest.mark.parametrize("dense", ["fp32", "fp16"])
def test_sharded_logits_equal_unsharded(monkeypatch, tmp_path, tiny, dense):
    """A cap below the tiny model's embedding / lm_head (201088 x 64: 51 MB fp32) shards both over the vocabulary:
    the Gather shards pick each id's row exactly and each vocabulary shard's Gemm row is the unsharded Gemm's row
    (the same dot product over the same 64 terms), so the logits are equal, not merely close."""
    cap = 4 << 20
    whole = convert_capped(monkeypatch, tiny, tmp_path / "whole", 0, dense=dense)
    parts = convert_capped(monkeypatch, tiny, tmp_path / "parts", cap, dense=dense)
    sizes = initializer_bytes(parts)
    assert max(sizes.values()) <= cap and max(initializer_bytes(parts, external=False).values()) <= cap
    shards = [n for n in sizes if n.startswith("model.embed_tokens.weight.")]
    item = {"fp32": 4, "fp16": 2}[dense]
    assert len(shards) == -(-201088 * 64 * item // cap) and len([n for n in sizes if n.startswith("lm_head.weight.")]) == len(shards)
    assert max(initializer_bytes(whole).values()) > cap  # the unsharded graph really is over the cap
    # every byte written is counted: shards and all
    assert sum(sizes.values()) == sum(initializer_bytes(whole).values())
    assert OnnxBackend.held_weights(parts).embedding == OnnxBackend.held_weights(whole).embedding
    a, b = cpu_logits(whole), cpu_logits(parts)
    assert a.shape == b.shape == (len(IDS), 201088)
    np.testing.assert_array_equal(a, b)


def test_unshardable_tensor_over_the_cap_is_one_line(monkeypatch, tmp_path, tiny):
    """QMoE's expert tensors are not split: over the cap, convert refuses them naming the tensor (exit 2)."""
    with pytest.raises(EdgecError) as e:
        convert_capped(monkeypatch, tiny, tmp_path / "o", 4096, dense="fp32")
    assert "max_buffer_bytes" in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
