"""The model spec against the published numbers (facts file sections 1, 2, 5), without writing any weights."""

from __future__ import annotations

import pytest

from edgec.errors import EdgecError
from edgec.spec import GptOssConfig, hf_tensors, original_sources, original_tensors, preset

# HF config.json of gpt-oss-20b as published (facts file section 1)
PUBLISHED_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
    "head_dim": 64, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "vocab_size": 201088,
    "max_position_embeddings": 131072, "initial_context_length": 4096, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "swiglu_limit": 7.0, "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": True,
    "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999, "router_aux_loss_coef": 0.9,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}

# per-layer tensor table of gpt-oss-20b (facts file section 2)
LAYER_20B = {
    "input_layernorm.weight": ("BF16", (2880,)), "post_attention_layernorm.weight": ("BF16", (2880,)),
    "self_attn.q_proj.weight": ("BF16", (4096, 2880)), "self_attn.q_proj.bias": ("BF16", (4096,)),
    "self_attn.k_proj.weight": ("BF16", (512, 2880)), "self_attn.k_proj.bias": ("BF16", (512,)),
    "self_attn.v_proj.weight": ("BF16", (512, 2880)), "self_attn.v_proj.bias": ("BF16", (512,)),
    "self_attn.o_proj.weight": ("BF16", (2880, 4096)), "self_attn.o_proj.bias": ("BF16", (2880,)),
    "self_attn.sinks": ("BF16", (64,)),
    "mlp.router.weight": ("BF16", (32, 2880)), "mlp.router.bias": ("BF16", (32,)),
    "mlp.experts.gate_up_proj_blocks": ("U8", (32, 5760, 90, 16)),
    "mlp.experts.gate_up_proj_scales": ("U8", (32, 5760, 90)),
    "mlp.experts.gate_up_proj_bias": ("BF16", (32, 5760)),
    "mlp.experts.down_proj_blocks": ("U8", (32, 2880, 90, 16)),
    "mlp.experts.down_proj_scales": ("U8", (32, 2880, 90)),
    "mlp.experts.down_proj_bias": ("BF16", (32, 2880)),
}


def test_20b_preset_is_the_published_config():
    cfg = preset("20b")
    hf = cfg.to_hf()
    for k, v in PUBLISHED_20B.items():
        assert hf[k] == v, k
    assert GptOssConfig.from_hf(PUBLISHED_20B) == cfg
    assert cfg.sliding_layers == list(range(0, 24, 2)) and cfg.full_layers == list(range(1, 24, 2))


def test_20b_tensor_inventory():
    specs = hf_tensors(preset("20b"))
    assert len(specs) == 459
    by = {t.name: t for t in specs}
    for n in range(24):
        for suffix, (dtype, shape) in LAYER_20B.items():
            t = by[f"model.layers.{n}.{suffix}"]
            assert (t.dtype, t.shape) == (dtype, shape), t.name
    for name, shape in [("model.embed_tokens.weight", (201088, 2880)), ("lm_head.weight", (201088, 2880)),
                        ("model.norm.weight", (2880,))]:
        assert (by[name].dtype, by[name].shape) == ("BF16", shape)
    total = sum(t.nbytes for t in specs)
    assert 13.6e9 < total < 13.9e9  # ~13.8 GB on disk (facts file)


@pytest.mark.parametrize("name,total,active,layers,experts", [("20b", 21e9, 3.6e9, 24, 32),
                                                              ("120b", 117e9, 5.1e9, 36, 128)])
def test_parameter_counts(name, total, active, layers, experts):
    cfg = preset(name)
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (layers, experts, 4)
    p = cfg.params()
    assert abs(p["total"] / total - 1) < 0.03, p
    assert abs(p["active"] / active - 1) < 0.03, p


def test_original_layout_20b():
    cfg = preset("20b")
    orig = {t.name: t for t in original_tensors(cfg)}
    assert len(orig) == 3 + 24 * 15  # qkv fused: 19 HF tensors per layer become 15
    assert orig["block.0.attn.qkv.weight"].shape == (5120, 2880) and orig["block.0.attn.qkv.bias"].shape == (5120,)
    assert orig["block.5.mlp.mlp1_weight.blocks"].shape == (32, 5760, 90, 16)
    assert orig["block.5.mlp.mlp2_weight.scales"].shape == (32, 2880, 90)
    assert {"embedding.weight", "norm.scale", "unembedding.weight", "block.23.mlp.gate.bias",
            "block.23.attn.sinks", "block.23.attn.out.weight", "block.23.mlp.norm.scale"} <= orig.keys()
    src = original_sources(cfg)
    assert src["model.layers.3.self_attn.k_proj.weight"] == ("block.3.attn.qkv.weight", slice(4096, 4608))
    assert src["model.layers.3.self_attn.v_proj.bias"] == ("block.3.attn.qkv.bias", slice(4608, 5120))
    oc = cfg.to_original()
    assert (oc["num_experts"], oc["experts_per_token"], oc["rope_scaling_factor"], oc["rope_ntk_alpha"],
            oc["rope_ntk_beta"]) == (32, 4, 32, 1, 32)
    assert GptOssConfig.from_original(oc) == cfg


def test_rope_parameters_spelling():
    d = dict(PUBLISHED_20B)
    rope = dict(d.pop("rope_scaling"), rope_theta=150000.0)
    del d["rope_theta"]
    d["rope_parameters"] = {**rope, "factor": 16.0, "beta_fast": 24.0}
    d["swiglu_alpha"] = 1.5
    cfg = GptOssConfig.from_hf(d)
    assert (cfg.yarn.factor, cfg.yarn.beta_fast, cfg.rope_theta, cfg.swiglu_alpha) == (16.0, 24.0, 150000.0, 1.5)


def test_transformers_reads_our_config_the_same_way():
    from transformers import GptOssConfig as HFConfig

    cfg = preset("120b")
    hf = HFConfig(**cfg.to_hf())
    assert hf.num_hidden_layers == 36 and hf.num_local_experts == 128 and hf.sliding_window == 128
    assert list(hf.layer_types) == list(cfg.layer_types)
    assert GptOssConfig.from_hf(hf.to_dict()) == cfg  # transformers 5 writes `rope_parameters`


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "not a gpt-oss checkpoint"),
    ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
    ({"hidden_size": 2000}, "multiples of 32"),
    ({"num_experts_per_tok": 40}, "num_experts_per_tok"),
    ({"num_hidden_layers": "many"}, "num_hidden_layers must be an integer, got 'many'"),
    ({"rope_scaling": [1, 2]}, "malformed gpt-oss config"),
    ({"layer_types": ["sliding_attention"] * 3}, "one type per layer"),
])
def test_bad_configs_are_one_line_errors(change, message):
    with pytest.raises(EdgecError, match=message) as e:
        GptOssConfig.from_hf({**PUBLISHED_20B, **change}, "x/config.json")
    assert str(e.value).startswith("x/config.json: ") and "\n" not in str(e.value)


def test_preset_overrides_and_unknown():
    cfg = preset("tiny", num_hidden_layers=3, num_key_value_heads=4)
    assert cfg.num_hidden_layers == 3 and cfg.layer_types == ("sliding_attention", "full_attention",
                                                                "sliding_attention")
    with pytest.raises(EdgecError, match="unknown preset"):
        preset("7b")
    with pytest.raises(EdgecError, match="multiples of 32"):
        preset("tiny", hidden_size=100)
