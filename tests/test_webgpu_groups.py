"""QMoE expert groups (`convert --max-buffer`): onnx-webgpu within an adapter whose maxStorageBufferBindingSize is
WebGPU's 128 MiB floor. Where a QMoE expert tensor of all E experts is over the cap, the experts are split into G
groups, one QMoE node each, with gpt-oss's routing over all E kept (edgec/convert/onnx_moe.py `_grouped`).

The tiny fixture cannot be grouped under a cap that every initializer meets: its expert tensors (gate_up int4:
32 KiB) are smaller than tensors convert does not split (the fused qkv, 48 KiB fp32; the cos/sin caches, 4 MiB at
its 131072 positions), and a cap much under 4 MiB would cut its 201088-row embedding into hundreds of shards. So
these tests use the tiny preset with 20b's 32 experts (top 4) and an intermediate size of 5152, 2 layers: gate_up
int4 is 32 x 10304 x 32 B = 10.06 MiB, so 6 MiB gives 2 groups of 16 and 4 MiB (the caches' size) 3 groups of 11, 11
and 10. 5152 is not a multiple of 128: onnxruntime-web's QMoE runs its MatMulNBits at accuracy_level 4, and at a K
that is a multiple of 128 that quantizes activations to int8 (~1% off onnxruntime CPU on this shape, grouped or not;
README), which would hide what is compared here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgec.cli import main
from edgec.convert import run_convert
from edgec.convert.onnx_graph import EDGEC_GRAPH, GENAI_GRAPH
from edgec.convert.onnx_moe import expert_groups

MIB = 1 << 20
CAPS = {2: 6 * MIB, 3: 4 * MIB}  # groups -> --max-buffer
IDS = [200006, 17360, 200008, 3, 1, 200007, 199999, 0, 3575, 553, 261, 1428]


@pytest.fixture(scope="module")
def moe32(tmp_path_factory):
    """The source (tiny preset, 32 experts of intermediate 5152, 2 layers) and its onnx-webgpu --dense fp32 outputs:
    {0: no cap, 2: 6 MiB, 3: 4 MiB (through the CLI)}. Removed at the end of the module (~570 MB)."""
    from conftest import make_ckpt

    root = tmp_path_factory.mktemp("groups")
    src = make_ckpt(root / "src", "tiny", layout="hf", num_hidden_layers=2, num_local_experts=32,
                    intermediate_size=5152)
    outs = {0: root / "whole", 2: root / "g2", 3: root / "g3"}
    run_convert(src, "onnx-webgpu", outs[0], dense="fp32", progress=False)
    run_convert(src, "onnx-webgpu", outs[2], dense="fp32", progress=False, max_buffer=CAPS[2])
    r = CliRunner().invoke(main, ["convert", str(src), "--target", "onnx-webgpu", "--dense", "fp32",
                                  "--max-buffer", "4MiB", "-o", str(outs[3])])
    assert r.exit_code == 0, r.output
    assert "3 QMoE groups" in r.output
    yield src, outs
    shutil.rmtree(root, ignore_errors=True)


def test_expert_groups_are_the_fewest_that_fit():
    """Contiguous groups of ceil(E/G), the last smaller; one group when the whole fits or there is no cap."""
    per = 5760 * 2880 // 2  # 20b's int4 gate_up, one expert
    assert expert_groups(32, per, 256 * MIB) == [(0, 32)] and expert_groups(32, per, 0) == [(0, 32)]
    assert expert_groups(32, per, 128 * MIB) == [(0, 16), (16, 32)]
    assert expert_groups(32, 10304 * 32, 4 * MIB) == [(0, 11), (11, 22), (22, 32)]
    assert expert_groups(8, 100, 250) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert expert_groups(5, 100, 99) == [(e, e + 1) for e in range(5)]  # one expert over: its tensor is refused


def qmoe_nodes(folder, graph=EDGEC_GRAPH):
    return [n for n in onnx.load(str(folder / graph), load_external_data=False).graph.node if n.op_type == "QMoE"]


@pytest.mark.float_sensitive
def test_grouped_logits_equal_ungrouped(moe32):
    """Each grouped output: every initializer within its cap, layers x G QMoE nodes over contiguous experts (the
    last group smaller at G = 3) with the unsplit names gone, edgec.json recording the cap; and onnxruntime CPU's
    logits the ungrouped output's within an error model's bound, top-1 equal.
    Error model (tests/tolerance.py): both graphs hold the same int4 bytes and share every node outside the MoE. Per
    layer the MoE differs only in the order of float32 reductions: each expert's mlp1 (K = hidden) and mlp2 (K =
    intermediate) may block differently (another token count per expert), the k-term weighted sum runs as G group sums
    then an Add, and each routing weight is a k-term softmax computed twice (Softmax, then the group's own) and
    multiplied (S_g x w'). That is 4 reordered reductions of at most max(hidden, intermediate) terms per layer:
    depth 4 x layers in `reorder_bound`. The other experts a group's QMoE runs weigh <= e**-40 of a chosen one (far
    under float32's 2**-24). A routing error moves logits by O(their spread): with the unchosen experts not masked
    (UNCHOSEN = 0) max|diff| measured 9.3, top-1 17%.
    Measured: max|diff| 6.7e-6 (G = 2) and 5.7e-6 (G = 3), mean 5.5e-7, at max|logit| 12.4; bound 0.061."""
    from test_webgpu_limits import cpu_logits, initializer_bytes
    from tolerance import reorder_bound

    _, outs = moe32
    cfg = json.loads((outs[0] / "edgec.json").read_text())["config"]
    L, E, k = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    assert len(qmoe_nodes(outs[0])) == L and max(initializer_bytes(outs[0]).values()) > CAPS[2]
    whole = cpu_logits(outs[0], IDS)
    bound = reorder_bound(max(cfg["hidden_size"], cfg["intermediate_size"]), float(np.abs(whole).max()), 4 * L)
    for G, cap in CAPS.items():
        out = outs[G]
        sizes = initializer_bytes(out)
        assert max(sizes.values()) <= cap and max(initializer_bytes(out, external=False).values()) <= cap
        recipe = json.loads((out / "edgec.json").read_text())["recipe"]
        assert (recipe["max_buffer_bytes"], recipe["expert_groups"]) == (cap, G)
        assert recipe["largest_initializer_bytes"] == max(sizes.values())
        for graph in (GENAI_GRAPH, EDGEC_GRAPH):
            nodes = qmoe_nodes(out, graph)
            assert len(nodes) == L * G and {a.i for n in nodes for a in n.attribute if a.name == "k"} == {k}
        counts = [sizes[f"model.layers.0.moe.experts.g{j}.gate_up_proj.qweight"] // (10304 * 32) for j in range(G)]
        step = -(-E // G)
        assert counts == [step] * (G - 1) + [E - step * (G - 1)]  # G = 3: 11, 11, 10
        assert not any(n.startswith("model.layers.0.moe.experts.gate_up_proj") for n in sizes)
        got = cpu_logits(out, IDS)
        assert np.isfinite(got).all()
        diff = float(np.abs(got - whole).max())
        assert diff <= bound, (G, diff, bound)
        np.testing.assert_array_equal(got.argmax(-1), whole.argmax(-1))


def test_grouped_graph_in_chromium_webgpu(moe32):
    """The 3-group graph in headless Chromium's WebGPU (SwiftShader) through model.js: finite, its onnxruntime CPU
    run's logits within test_webgpu's bound (1e-3: float32 both, same weights, other reduction orders), same top-1,
    and every QMoE node (2 layers x 3) placed on WebGPU. Measured: max|diff| 7.2e-6."""
    from test_webgpu import _browser_logits
    from test_webgpu_limits import cpu_logits

    _, outs = moe32
    ids = IDS[:4]
    got = _browser_logits(outs[3], "fp32", ids)
    assert "error" not in got, got.get("error")
    assert got["arch"] == "swiftshader" and got["length"] == len(ids)
    web, cpu = np.asarray(got["logits"], dtype=np.float32), cpu_logits(outs[3], ids)[-1]
    assert web.shape == cpu.shape and np.isfinite(web).all()
    assert np.abs(web - cpu).max() <= 1e-3
    assert int(web.argmax()) == int(cpu.argmax())
    on_gpu = [name for op, name in got["placement"]["WebGpuExecutionProvider"] if op == "QMoE"]
    assert len(on_gpu) == 6


def test_browser_parity_passes_on_grouped_output(moe32, tmp_path):
    """`edgec parity SRC OUT --browser` on the 3-group output: one short prompt (12 positions) and 4 greedy steps,
    the profile's int4 bounds, placement as tests/test_parity_browser.py checks it."""
    from test_parity_browser import _passes_with_placement

    src, outs = moe32
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hi in three words."]))
    rep = _passes_with_placement(src, outs[3], prompts, tmp_path / "r.json")
    assert rep["prompts"][0]["positions"] > 8 and rep["recipe"]["expert_groups"] == 3


def test_model_js_refuses_an_output_over_the_adapter_limit(moe32, tmp_path):
    """edgec.json says the largest initializer is 8 GiB (a copy, tampered): model.js refuses it right after
    requestAdapter, before fetching any weights, in one line naming both numbers and the convert that fits."""
    from test_webgpu import _browser_logits

    _, outs = moe32
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((outs[3] / "edgec.json").read_text())
    manifest["recipe"]["largest_initializer_bytes"] = 8 << 30
    (bad / "edgec.json").write_text(json.dumps(manifest))  # nothing else: model.js must stop before the graph
    err = _browser_logits(bad, "fp32", [1]).get("error", "")
    assert str(8 << 30) in err and "maxStorageBufferBindingSize" in err and "\n" not in err, err
    assert "edgec convert SRC --target onnx-webgpu --dense fp32 --max-buffer 128MiB" in err
    limit = int(err.split("buffer limit of ")[1].split()[0])
    assert 128 * MIB <= limit < 8 << 30 and str(limit) in err


def test_max_buffer_needs_a_capped_target(tiny, tmp_path):
    """--max-buffer on a target without max_buffer_bytes (mlx) or with a size that is not one: one line, exit 2,
    nothing written."""
    for target, size in (("mlx", "128MiB"), ("onnx-cpu", "128MiB"), ("onnx-webgpu", "lots")):
        out = tmp_path / target
        r = CliRunner().invoke(main, ["convert", str(tiny), "--target", target, "--max-buffer", size, "-o", str(out)])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "--max-buffer" in r.output and not out.exists()
    assert "onnx-webgpu" in CliRunner().invoke(main, ["convert", str(tiny), "--target", "mlx", "--max-buffer", "1GiB",
                                                      "-o", str(tmp_path / "m")]).output
