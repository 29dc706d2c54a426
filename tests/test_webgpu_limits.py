"""onnx-webgpu within a browser's buffer limits (issue 21): every initializer within the profile's
`max_buffer_bytes` (the embedding and lm_head as vocabulary shards), the sharded graph's logits identical to the
unsharded graph's, and the 20b shape's graphs within the limits."""

import shutil

import numpy as np
import onnx
import pytest

import edgec.convert as conv
from edgec.convert import run_convert
from edgec.convert.onnx_graph import EDGEC_GRAPH, F32_GRAPH, GENAI_GRAPH, ITEMSIZE, data_files
from edgec.errors import EdgecError
from edgec.runtime.onnx_backend import OnnxBackend
from edgec.targets import load_profile

IDS = [200006, 17360, 200008, 3, 1, 200007, 199999, 0]  # both ends of the vocabulary: first, middle, last shards


def convert_capped(monkeypatch, src, out, cap, file_cap=0, **formats):
    """`edgec convert --target onnx-webgpu` with the profile's max_buffer_bytes set to `cap` and its
    max_data_file_bytes to `file_cap` (0: no cap)."""
    prof = load_profile("onnx-webgpu")
    prof["max_buffer_bytes"], prof["max_data_file_bytes"] = cap, file_cap
    monkeypatch.setattr(conv, "load_profile", lambda name: prof)
    run_convert(src, "onnx-webgpu", out, progress=False, **formats)
    return out


def initializer_bytes(folder, graph=EDGEC_GRAPH, external=True):
    """{name: bytes} of the graph's initializers stored in model.onnx.data (external=False: the small constants
    inside the graph)."""
    g = onnx.load(str(folder / graph), load_external_data=False).graph
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) * ITEMSIZE[t.data_type] for t in g.initializer
            if (t.data_location == onnx.TensorProto.EXTERNAL) == external}


def cpu_logits(folder, ids=IDS):
    b = OnnxBackend(folder, provider="CPUExecutionProvider")
    return b.forward(ids, all_logits=True)


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
    # fp16 is sharded at its widened (float32) width: model.f32.edgec.onnx's tensors hold the cap too
    assert len(shards) == -(-201088 * 64 * 4 // cap) == len([n for n in sizes if n.startswith("lm_head.weight.")])
    assert max(initializer_bytes(whole).values()) > cap  # the unsharded graph really is over the cap
    # every byte written is counted: shards and all
    assert sum(sizes.values()) == sum(initializer_bytes(whole).values())
    assert OnnxBackend.held_weights(parts).embedding == OnnxBackend.held_weights(whole).embedding
    a, b = cpu_logits(whole), cpu_logits(parts)
    assert a.shape == b.shape == (len(IDS), 201088)
    np.testing.assert_array_equal(a, b)


def test_unshardable_tensor_over_the_cap_is_one_line(monkeypatch, tmp_path, tiny):
    """A tensor convert does not split (attention, QMoE experts, caches) over the cap: refused before it is
    written, in one line naming it (exit 2)."""
    with pytest.raises(EdgecError) as e:
        convert_capped(monkeypatch, tiny, tmp_path / "o", 4096, dense="fp32")
    assert "max_buffer_bytes" in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def locations(folder, graph=EDGEC_GRAPH):
    """{initializer: the data file its `location` names}."""
    g = onnx.load(str(folder / graph), load_external_data=False).graph
    return {t.name: {e.key: e.value for e in t.external_data}["location"] for t in g.initializer if t.external_data}


FILE_CAP = 64 << 20  # over the tiny fp32 embedding / lm_head (51 MB each), under both together: several files


def test_split_data_files_give_the_one_file_logits(monkeypatch, tmp_path, tiny):
    """max_data_file_bytes splits the external data into model.onnx.data, .1, ... with no tensor across two: each
    initializer's location names one file and its bytes lie within it, edgec.json hashes every file, onnx.checker
    passes and onnxruntime's CPU run gives the one-file output's logits exactly (the same graph, the same bytes)."""
    import json

    whole = convert_capped(monkeypatch, tiny, tmp_path / "whole", 0, dense="fp32")
    parts = convert_capped(monkeypatch, tiny, tmp_path / "parts", 0, FILE_CAP, dense="fp32")
    assert [f.name for f in data_files(whole)] == ["model.onnx.data"]
    files = data_files(parts)
    assert len(files) >= 2 and [f.name for f in files[:2]] == ["model.onnx.data", "model.onnx.data.1"]
    assert max(f.stat().st_size for f in files) <= FILE_CAP
    assert sum(f.stat().st_size for f in files) >= sum(initializer_bytes(whole).values())
    for graph in (GENAI_GRAPH, EDGEC_GRAPH):
        g = onnx.load(str(parts / graph), load_external_data=False).graph
        for t in g.initializer:
            if t.external_data:
                e = {x.key: x.value for x in t.external_data}
                assert int(e["offset"]) + int(e["length"]) <= (parts / e["location"]).stat().st_size, t.name
        assert {*locations(parts, graph).values()} <= {f.name for f in files}
        onnx.checker.check_model(str(parts / graph))
    manifest = json.loads((parts / "edgec.json").read_text())["files"]
    assert all(manifest[f.name]["bytes"] == f.stat().st_size for f in files)
    np.testing.assert_array_equal(cpu_logits(whole), cpu_logits(parts))


def test_tensor_over_the_file_cap_is_one_line(monkeypatch, tmp_path, tiny):
    """A tensor larger than max_data_file_bytes (it would not fit any file): refused in one line naming it."""
    with pytest.raises(EdgecError) as e:
        convert_capped(monkeypatch, tiny, tmp_path / "o", 0, 1 << 20, dense="fp32")
    assert "max_data_file_bytes" in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


CHUNK = 16  # the chat page's prefill chunk (edgec/web/page/chat.js): the most positions one run computes logits for


def bounded_activations(folder, cfg, seq=CHUNK):
    """{tensor: bytes} of every float activation of model.onnx (logits at every position) that onnx's shape
    inference sizes for one prefill chunk of `seq` tokens on an empty cache. The com.microsoft ops' outputs
    (attention, norms, MoE: [1, seq, hidden]-sized by their contracts) are declared so it propagates past them."""
    m = onnx.load(str(folder / GENAI_GRAPH), load_external_data=False)
    dims = {"batch_size": 1, "sequence_length": seq, "total_sequence_length": seq, "past_sequence_length": 0,
            "past_sliding_length": 0, "total_sliding_length": seq}
    for v in [*m.graph.input, *m.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = dims[d.dim_param]
    io = m.graph.output[0].type.tensor_type.elem_type
    H, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    declared = {"GroupQueryAttention": [[1, seq, heads * hd]], "SkipSimplifiedLayerNormalization": [[1, seq, H]] * 4,
                "QMoE": [[1, seq, H]]}
    for n in m.graph.node:
        for out, shape in zip(n.output, declared.get(n.op_type, []), strict=False):
            if out and not out.startswith("present."):
                m.graph.value_info.append(onnx.helper.make_tensor_value_info(out, io, shape))
    got = onnx.shape_inference.infer_shapes(m, data_prop=True).graph
    sizes = {}
    for v in [*got.value_info, *got.output]:
        t = v.type.tensor_type
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and t.HasField("shape") and \
                all(d.HasField("dim_value") for d in t.shape.dim):
            sizes[v.name] = int(np.prod([d.dim_value for d in t.shape.dim], dtype=np.int64)) * ITEMSIZE[t.elem_type]
    return sizes


def check_20b_limits(folder, cap):
    """The structural proof for one converted 20b-shaped folder (see test_20b_shape_within_browser_limits)."""
    import json

    cfg = json.loads((folder / "edgec.json").read_text())["config"]
    wide = json.loads((folder / "edgec.json").read_text())["recipe"].get("widened")
    for graph in (GENAI_GRAPH, EDGEC_GRAPH, *([F32_GRAPH] if wide else [])):  # the f32 graph: widened bytes
        assert (folder / graph).stat().st_size < 2 << 30  # protobuf's limit: only the graph is in the proto
        sizes = initializer_bytes(folder, graph)
        assert max(sizes.values()) <= cap, max(sizes.items(), key=lambda kv: kv[1])
    if wide:  # the widened files the browser builds, each within max_data_file_bytes too
        assert max(f["bytes"] for f in wide["files"]) <= load_profile("onnx-webgpu")["max_data_file_bytes"]
    sizes = initializer_bytes(folder, EDGEC_GRAPH)
    for graph in (GENAI_GRAPH, EDGEC_GRAPH):
        # every weight's bytes live in model.onnx.data (the external-data path onnxruntime-web loads)
        assert sum(initializer_bytes(folder, graph, external=False).values()) < 1 << 20
    files = data_files(folder)  # model.onnx.data, .1, ...: each within the profile's max_data_file_bytes
    assert len(files) > 1 and max(f.stat().st_size for f in files) <= load_profile("onnx-webgpu")["max_data_file_bytes"]
    assert sum(f.stat().st_size for f in files) >= sum(initializer_bytes(folder, GENAI_GRAPH).values())
    acts = bounded_activations(folder, cfg)
    names = set(acts)
    # the big ones are bounded: the logits, each lm_head shard's product, the embedding shards and their sum
    assert "logits" in names and any(n.startswith("/lm_head/Gemm") for n in names)
    assert "/model/embed_tokens/Sum/output_0" in names
    assert max(acts.values()) <= cap, max(acts.items(), key=lambda kv: kv[1])
    return sizes, acts


@pytest.fixture(scope="module")
def slice20b(tmp_path_factory):
    """One layer of the 20b shape (edgec synth --preset 20b --layers 1): 20b's vocabulary (201088), hidden size
    (2880), heads and 32 experts of 5760 x 2880, so the embedding, lm_head and expert tensors are 20b's."""
    from conftest import make_ckpt

    src = make_ckpt(tmp_path_factory.mktemp("slice20b") / "src", "20b", layout="hf", num_hidden_layers=1)
    yield src
    shutil.rmtree(src)  # disk: removed when the module ends


@pytest.mark.parametrize("dense", ["fp16", "fp32"])
def test_20b_shape_within_browser_limits(tmp_path, slice20b, dense):
    """`edgec convert --target onnx-webgpu` (its default int4 experts) of the 20b shape, fp16 and --dense fp32:
    every initializer within the profile's max_buffer_bytes (256 MiB: the embedding and lm_head, 1.16 GB fp16 /
    2.32 GB fp32 each, as vocabulary shards, 9 in both: fp16's are sized so model.f32.edgec.onnx's widened ones fit;
    QMoE's gate_up at 253 MiB as it is), every activation shape inference sizes for a prefill chunk within it too,
    both graphs far under protobuf's 2 GB with the weights external."""
    out = tmp_path / "w"
    run_convert(slice20b, "onnx-webgpu", out, dense=dense, progress=False)
    cap = load_profile("onnx-webgpu")["max_buffer_bytes"]
    sizes, _ = check_20b_limits(out, cap)
    item = {"fp16": 2, "fp32": 4}[dense]
    shards = [n for n in sizes if n.startswith("model.embed_tokens.weight.")]
    # fp16 too: shards sized at the widened (float32) width
    assert len(shards) == -(-201088 * 2880 * 4 // cap) == len([n for n in sizes if n.startswith("lm_head.")])
    assert sizes["model.layers.0.moe.experts.gate_up_proj.qweight"] == 32 * 5760 * 2880 // 2
    # the memory plan counts the bytes written: shards included
    from edgec.runtime.onnx_backend import OnnxBackend

    held = OnnxBackend.held_weights(out)
    assert held.embedding == 201088 * 2880 * item and held.total >= sum(f.stat().st_size for f in data_files(out))


def test_20b_shape_at_the_128mib_floor(tmp_path, slice20b):
    """`--max-buffer 128MiB` (WebGPU's guaranteed maxStorageBufferBindingSize) on the 20b shape, --dense fp32 only
    (one conversion: disk is scarce; the output is removed at the end): every initializer and bounded activation
    within 128 MiB, the 32 experts' QMoE in 2 groups of 16 (gate_up int4: 253 MiB whole, 126.6 MiB a group), the
    embedding and lm_head in 18 vocabulary shards each, and edgec.json recording the cap."""
    import json
    import shutil

    out, cap = tmp_path / "w128", 128 << 20
    run_convert(slice20b, "onnx-webgpu", out, dense="fp32", max_buffer=cap, progress=False)
    try:
        sizes, _ = check_20b_limits(out, cap)
        for graph in (GENAI_GRAPH, EDGEC_GRAPH):
            g = onnx.load(str(out / graph), load_external_data=False).graph
            assert sum(n.op_type == "QMoE" for n in g.node) == 2  # 1 layer x 2 groups
        for j in range(2):
            assert sizes[f"model.layers.0.moe.experts.g{j}.gate_up_proj.qweight"] == 16 * 5760 * 2880 // 2
        assert "model.layers.0.moe.experts.gate_up_proj.qweight" not in sizes
        assert len([n for n in sizes if n.startswith("model.embed_tokens.weight.")]) == -(-201088 * 2880 * 4 // cap)
        recipe = json.loads((out / "edgec.json").read_text())["recipe"]
        assert (recipe["max_buffer_bytes"], recipe["expert_groups"]) == (cap, 2)
        assert recipe["largest_initializer_bytes"] == max(sizes.values()) <= cap
    finally:
        shutil.rmtree(out)


def test_sharded_graph_in_chromium_webgpu(monkeypatch, tmp_path, tiny):
    """The sharded fp32 graph (embedding Gather/Where/Sum shards, lm_head Gemm shards + Concat) runs in headless
    Chromium's WebGPU (SwiftShader) through model.js and gives the unsharded graph's logits there. Everything before
    the lm_head is the same graph on the same device (identical hidden state); the embedding shards pick the same
    rows exactly; only the lm_head's Gemm runs at another width, so a logit may differ by one K=64 reduction's
    reordering (tests/tolerance.py: 2 * gamma_64 * max|logit|), and top-1 is the same."""
    from test_webgpu import _browser_logits
    from tolerance import reorder_bound

    ids = IDS[:4]
    whole = convert_capped(monkeypatch, tiny, tmp_path / "whole", 0, dense="fp32")
    parts = convert_capped(monkeypatch, tiny, tmp_path / "parts", 4 << 20, dense="fp32")
    a, b = _browser_logits(whole, "fp32", ids), _browser_logits(parts, "fp32", ids)
    assert "error" not in b, b.get("error")
    assert a["arch"] == b["arch"] == "swiftshader" and b["length"] == len(ids)
    a, b = np.asarray(a["logits"], dtype=np.float32), np.asarray(b["logits"], dtype=np.float32)
    assert a.shape == b.shape == (201088,) and np.isfinite(b).all()
    assert np.abs(a - b).max() <= reorder_bound(64, float(np.abs(a).max()))
    assert int(a.argmax()) == int(b.argmax())
    np.testing.assert_allclose(b, cpu_logits(parts, ids)[-1], atol=1e-3)  # and the CPU run (test_webgpu's bound)


def test_split_data_files_in_chromium_webgpu(monkeypatch, tmp_path, tiny):
    """model.js hands every data file to onnxruntime-web by URL (edgec.json's list): the split output's logits in
    headless Chromium's WebGPU equal the one-file output's there (the same graph, the same bytes, the same device)."""
    from test_webgpu import _browser_logits

    ids = IDS[:4]
    whole = convert_capped(monkeypatch, tiny, tmp_path / "whole", 0, dense="fp32")
    parts = convert_capped(monkeypatch, tiny, tmp_path / "parts", 0, FILE_CAP, dense="fp32")
    assert len(data_files(parts)) >= 2
    a, b = _browser_logits(whole, "fp32", ids), _browser_logits(parts, "fp32", ids)
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert b["arch"] == "swiftshader" and b["length"] == len(ids)
    np.testing.assert_array_equal(np.asarray(a["logits"], np.float32), np.asarray(b["logits"], np.float32))
