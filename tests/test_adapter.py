"""The adapter merge against PEFT itself: edgec's float32 deltas equal merge_and_unload()'s weights minus the base."""

from __future__ import annotations

import json
import shutil

import numpy as np
import peft
import pytest
import torch
from click.testing import CliRunner
from conftest import hf_logits

from edgec.checkpoint import Checkpoint
from edgec.cli import main
from edgec.convert.adapter import WEIGHTS, expert_delta, linear_delta, load_adapter
from edgec.errors import EdgecError
from edgec.fsutil import sha256_file


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    from hf_written import write_transformers_ckpt
    from transformers import GptOssForCausalLM

    root = tmp_path_factory.mktemp("adapter")
    src = write_transformers_ckpt(root / "base")
    base = GptOssForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(base, cfg)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    for _ in range(3):  # a few training steps, as a fine-tune leaves it: A and B both moved
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(root / "ad")
    ref = GptOssForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    out = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    return src, root / "ad", {k: v.numpy() for k, v in ref.items()}, out


def test_deltas_match_peft_merge(merged):
    from edgec.checkpoint import Checkpoint

    src, ad_dir, base, out = merged
    ad = load_adapter(ad_dir, Checkpoint.scan(src).config)
    assert ad.scale == 2.0 and len(ad.linear) == 8 and len(ad.experts) == 4
    for name in ad.linear:
        np.testing.assert_allclose(linear_delta([ad], name), out[name] - base[name], atol=1e-5)
    for p in ad.experts:
        want = out[p] - base[p]  # [E, in, out]
        got = np.stack([expert_delta([ad], p, e).T for e in range(want.shape[0])])
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_refusals(merged, tmp_path):
    import json
    import shutil

    from edgec.checkpoint import Checkpoint

    src, ad_dir, _, _ = merged
    config = Checkpoint.scan(src).config
    bad = tmp_path / "dora"
    shutil.copytree(ad_dir, bad)
    c = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**c, "use_dora": True}))
    with pytest.raises(EdgecError, match="use_dora"):
        load_adapter(bad, config)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(EdgecError, match="pickle"):
        load_adapter(bad, config)


def test_checkpoint_reads_merged_weights(merged):
    from edgec.checkpoint import Checkpoint

    src, ad_dir, _, out = merged
    ckpt = Checkpoint.open(src)
    ckpt.adapters = [load_adapter(ad_dir, ckpt.config)]
    q = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_allclose(ckpt.f32(q), out[q], atol=1e-5)
    p = "model.layers.0.mlp.experts.gate_up_proj"
    np.testing.assert_allclose(ckpt.experts(0, "gate_up_proj", [0, 3]), out[p][[0, 3]].transpose(0, 2, 1), atol=1e-5)


def test_raw_merges_and_requantizes(merged):
    from edgec.checkpoint import Checkpoint
    from edgec.convert.quantize import quantize_mxfp4, relative_error
    from edgec.safetensors_io import bf16_to_f32

    src, ad_dir, _, out = merged
    ckpt = Checkpoint.open(src)
    ckpt.adapters = [load_adapter(ad_dir, ckpt.config)]
    q = "model.layers.0.self_attn.o_proj.weight"
    np.testing.assert_allclose(bf16_to_f32(ckpt.raw(q)), out[q], rtol=2.0 ** -8, atol=0)  # one bf16 rounding
    p = "model.layers.1.mlp.experts.down_proj"
    blocks = ckpt.raw(p + "_blocks")
    for e in (0, 5):  # the merged weights equal PEFT's (test above); here the quantization of edgec's own
        w = ckpt.experts(1, "down_proj", [e])[0]
        want_b, want_s = quantize_mxfp4(w)
        np.testing.assert_array_equal(blocks[e], want_b)
        np.testing.assert_array_equal(ckpt.raw(p + "_scales")[e], want_s)
        assert ckpt.quant_error["down_proj"][e] == float(relative_error(w, want_b, want_s))


def write_lora(folder, config, r: int = 2, alpha: int = 4, seed: int = 0):
    """A PEFT-format adapter written by hand (the format `test_deltas_match_peft_merge` pins against PEFT) for a
    checkpoint PEFT cannot load (synth's MXFP4 one): q_proj of layer 0 and the gate_up experts of layer 0."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, e, inter = config.hidden_size, config.num_local_experts, config.intermediate_size
    pre = "base_model.model.model.layers.0."
    t = {pre + "self_attn.q_proj.lora_A.weight": rng.normal(0, 0.1, (r, h)),
         pre + "self_attn.q_proj.lora_B.weight": rng.normal(0, 0.1, (config.q_dim, r)),
         pre + "mlp.experts.lora_A.weight": rng.normal(0, 0.1, (r * e, h)),
         pre + "mlp.experts.lora_B.weight": rng.normal(0, 0.1, (2 * inter, r * e))}
    folder.mkdir(parents=True)
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    return folder


def test_mxfp4_source_requantizes_only_adapted_experts(tiny, tmp_path):
    from edgec import mxfp4
    from edgec.checkpoint import Checkpoint
    from edgec.convert.quantize import quantize_mxfp4

    ckpt = Checkpoint.open(tiny)
    ad = load_adapter(write_lora(tmp_path / "ad", ckpt.config), ckpt.config)
    ckpt.adapters = [ad]
    p0, p1 = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"
    base = mxfp4.decode(ckpt.stored(p0 + "_blocks")[2], ckpt.stored(p0 + "_scales")[2])
    merged = base + ad.scale * (ad.experts[p0][1][:, :, 2] @ ad.experts[p0][0][2])
    np.testing.assert_array_equal(ckpt.raw(p0 + "_blocks")[2], quantize_mxfp4(merged)[0])
    assert not np.array_equal(ckpt.raw(p0 + "_blocks"), ckpt.stored(p0 + "_blocks"))
    assert ckpt.raw(p1 + "_blocks") is not None and ckpt.file_range(ckpt.raw(p1 + "_blocks")) is not None  # as stored
    assert list(ckpt.quant_error) == ["gate_up_proj"] and len(ckpt.quant_error["gate_up_proj"]) == 8


# ---- convert --adapter, inspect, parity, and the oracle: merge_and_unload() logits -------------------------------
IDS = list(range(200000, 200006)) + [12194, 11, 1495, 553, 481, 30, 3085, 0] * 8  # 70 positions


def _convert(src, ad_dir, target, out, *extra):
    r = CliRunner().invoke(main, ["convert", str(src), "-t", target, "-o", str(out), "--adapter", str(ad_dir),
                                  "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _oracle_logits(src, merged_state, dense_bf16: bool) -> np.ndarray:
    """transformers fp32 (eager) on merge_and_unload()'s weights stored as edgec stores them: experts quantized to
    MXFP4 (edgec's quantizer, pinned by brute force in test_quantize.py) from PEFT's merged float32, and for a bf16
    target the merged linear weights rounded to bf16. So the bound is the float32 reorder bound (tests/tolerance.py),
    not a measured figure: what is left is the order of the sums. (On this fixture edgec's merged float32 equals
    PEFT's bit for bit, so a rounding flip at a quantization boundary would be a real difference.)"""
    from transformers import GptOssForCausalLM

    from edgec import mxfp4
    from edgec.convert.quantize import quantize_mxfp4

    model = GptOssForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    state = {}
    for k, v in merged_state.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]
            v = np.stack([mxfp4.decode(*quantize_mxfp4(np.ascontiguousarray(w.T))).T for w in v])
        elif dense_bf16 and k.endswith("_proj.weight"):
            v = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
        state[k] = torch.from_numpy(np.ascontiguousarray(v, np.float32))
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.float_sensitive
@pytest.mark.parametrize("target", ["mlx", "onnx-cpu"])
def test_converted_logits_match_merge_and_unload(merged, tmp_path, target):
    from tolerance import assert_reordered

    from edgec.runtime.base import load_backend

    src, ad_dir, _, out_state = merged
    summary = _convert(src, ad_dir, target, tmp_path / target)
    assert summary["adapters"][0]["scale"] == 2.0 and summary["quantization"]["gate_up_proj"]["matrices"] == 16
    opts = {"compute": "float32-upcast", "kv_dtype": "float32"} if target == "mlx" else {}  # the float32 runs
    got = load_backend(tmp_path / target, **opts).forward(IDS, all_logits=True)
    want = _oracle_logits(src, out_state, dense_bf16=target == "mlx")  # onnx-cpu keeps dense weights in fp32
    cfg = Checkpoint.open(src).config
    assert_reordered(got, want, cfg, len(IDS))
    base = hf_logits(src, IDS)  # the base model, no adapter: far outside that bound
    assert np.abs(base - want).max() > 100 * np.abs(got - want).max()


def test_convert_error_figures_equal_a_recomputation(merged, tmp_path):
    """convert's relative error per kind equals one recomputed from PEFT's merged float32 and the blocks OUT holds."""
    from edgec.convert.quantize import relative_error

    src, ad_dir, _, out_state = merged
    summary = _convert(src, ad_dir, "onnx-cpu", tmp_path / "o")
    held = Checkpoint.open(src)
    held.adapters = [load_adapter(ad_dir, held.config)]
    for kind in ("gate_up_proj", "down_proj"):
        rel = []
        for n in range(held.config.num_hidden_layers):
            p = f"model.layers.{n}.mlp.experts.{kind}"
            blocks, scales = held.raw(p + "_blocks"), held.raw(p + "_scales")
            w = out_state[p].transpose(0, 2, 1).astype(np.float64)  # PEFT's merged, [E, out, in]
            rel += list(relative_error(w, blocks, scales))
        assert summary["quantization"][kind]["mean"] == pytest.approx(np.mean(rel), rel=1e-9)
        assert summary["quantization"][kind]["worst"] == pytest.approx(np.max(rel), rel=1e-9)


def test_manifest_inspect_and_parity(merged, tmp_path):
    src, ad_dir, _, _ = merged
    out = tmp_path / "mlx"
    _convert(src, ad_dir, "mlx", out)
    rec = json.loads((out / "edgec.json").read_text())["adapters"]
    assert rec == [{"name": "ad", "path": str(ad_dir.resolve()), "sha256": sha256_file(ad_dir / WEIGHTS),
                    "config_sha256": sha256_file(ad_dir / "adapter_config.json"), "scale": 2.0, "modules": 12}]
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "adapter merged" in r.output and rec[0]["sha256"][:12] in r.output, r.output
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([IDS]))
    args = ["parity", str(src), str(out), "--prompts", str(prompts), "--tokens", "2", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["adapters"] == [str(ad_dir.resolve())] and rep["thresholds"]["max_abs"] == 2.5
    r = CliRunner().invoke(main, [*args, "--no-adapters"])  # against the base: the adapter's change is seen
    assert r.exit_code == 1 and "parity failed" in r.output, r.output
    moved = tmp_path / "moved"
    shutil.copytree(ad_dir, moved)
    c = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**c, "lora_alpha": 16}))
    r = CliRunner().invoke(main, [*args, "--adapter", str(moved)])
    assert r.exit_code == 2 and "not the adapter ad this output merged" in r.output, r.output


def test_convert_refusals_one_line(merged, tmp_path):
    src, ad_dir, _, _ = merged
    base = ["convert", str(src), "-t", "mlx", "-o", str(tmp_path / "x"), "--adapter", str(ad_dir)]
    r = CliRunner().invoke(main, [*base, "--adapter-scale", "1", "--adapter-scale", "2"])
    assert r.exit_code == 2 and "--adapter-scale given 2 time(s) for 1" in r.output, r.output
    bad = tmp_path / "bad"
    shutil.copytree(ad_dir, bad)
    c = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**c, "r": 8}))
    r = CliRunner().invoke(main, ["convert", str(src), "-t", "mlx", "-o", str(tmp_path / "y"), "--adapter", str(bad)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "adapter_model.safetensors: tensor" in r.output, r.output
    assert not (tmp_path / "y").exists()


def test_mxfp4_source_with_adapter_parity(tiny, tmp_path):
    """An MXFP4 source + adapter: the adapted experts are requantized (recipe experts_from mxfp4+lora), parity
    against SRC + adapter passes, against SRC alone fails."""
    ad = write_lora(tmp_path / "ad", Checkpoint.scan(tiny).config)
    out = tmp_path / "o"
    summary = _convert(tiny, ad, "onnx-cpu", out)
    q = summary["quantization"]
    assert list(q) == ["gate_up_proj"] and q["gate_up_proj"]["matrices"] == 8  # layer 0 only
    assert json.loads((out / "edgec.json").read_text())["recipe"]["experts_from"] == "mxfp4+lora"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([IDS]))
    args = ["parity", str(tiny), str(out), "--prompts", str(prompts), "--tokens", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--no-adapters"])
    assert r.exit_code == 1, r.output
