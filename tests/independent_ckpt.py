"""A gpt-oss checkpoint written independently of edgec's synth: real-valued random weights, encoded to MXFP4 here
by the OCP rule, written with the `safetensors` library (torch tensors) in the published HF layout, config.json
typed out from the facts file.

Unkind on purpose: heavy-tailed values (Student t, 3 degrees of freedom), per-block magnitudes spread over
`binades` binades within every expert row (plus 1% outlier blocks 3 binades higher), and odd shapes the spec allows
(3 layers, hidden 160 = 5 MXFP4 blocks, intermediate 96, 5 query heads on 1 kv head, 6 experts, top 3).
The tokenizer files come from edgec (they are not under test here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
SHAPE = dict(layers=3, hidden=160, inter=96, heads=5, kv_heads=1, head_dim=32, experts=6, top_k=3, vocab=201088)


def to_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., K] float -> (blocks [..., K/32, 16] uint8, E8M0 scales [..., K/32] uint8), the OCP MX rule: shared
    exponent floor(log2(amax)) - 2 (E2M1's largest exponent), each value rounded to the nearest E2M1 magnitude
    (ties to the smaller one), saturating at 6; low nibble = even element."""
    g = np.asarray(w, dtype=np.float64).reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(g).max(-1)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127).clip(-127, 127)
    x = g / 2.0 ** e[..., None]
    mag = np.abs(np.abs(x)[..., None] - E2M1).argmin(-1)
    code = (mag | np.where((x < 0) & (mag > 0), 8, 0)).astype(np.uint8)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8), (e + 127).astype(np.uint8)


def expert_matrix(rng: np.random.Generator, e: int, n: int, k: int, binades: float) -> np.ndarray:
    """[e, n, k] heavy-tailed values whose 32-wide blocks span `binades` binades within each row, unit gain."""
    w = rng.standard_t(3, size=(e, n, k // 32, 32))
    level = rng.uniform(-binades / 2, binades / 2, size=(e, n, k // 32))
    level[..., 0], level[..., -1] = -binades / 2, binades / 2  # every row spans the full range
    level += np.where(rng.random(level.shape) < 0.01, 3.0, 0.0)
    w *= 2.0 ** level[..., None]
    w /= np.sqrt((w**2).mean() * k)
    return w.reshape(e, n, k)


def hf_config(s: dict) -> dict:
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": s["top_k"], "head_dim": s["head_dim"], "hidden_act": "silu",
        "hidden_size": s["hidden"], "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": s["inter"], "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                         for i in range(s["layers"])],
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": s["heads"],
        "num_experts_per_tok": s["top_k"], "num_hidden_layers": s["layers"], "num_key_value_heads": s["kv_heads"],
        "num_local_experts": s["experts"], "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
        "vocab_size": s["vocab"],
    }


def write(root: Path, seed: int = 0, binades: float = 10.0, **shape) -> Path:
    """Write the checkpoint to `root` (two shards + index, config, generation config, tokenizer)."""
    import torch
    from safetensors.torch import save_file

    s = {**SHAPE, **shape}
    rng = np.random.default_rng(seed)
    H, inter, E, hd = s["hidden"], s["inter"], s["experts"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd

    def bf16(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)

    def normal(std: float, *shape: int, mean: float = 0.0) -> torch.Tensor:
        return bf16(mean + std * rng.standard_normal(shape))

    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = normal(1.0, s["vocab"], H)
    for i in range(s["layers"]):
        p, t = f"model.layers.{i}.", shards[0] if i < s["layers"] // 2 else shards[1]
        t[p + "input_layernorm.weight"] = normal(0.1, H, mean=1.0)
        t[p + "post_attention_layernorm.weight"] = normal(0.1, H, mean=1.0)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            t[p + f"self_attn.{name}_proj.weight"] = normal(1.5 / np.sqrt(H), rows, H)
            t[p + f"self_attn.{name}_proj.bias"] = normal(0.1, rows)
        t[p + "self_attn.o_proj.weight"] = normal(0.5 / np.sqrt(q), H, q)
        t[p + "self_attn.o_proj.bias"] = normal(0.1, H)
        t[p + "self_attn.sinks"] = normal(1.0, s["heads"])
        t[p + "mlp.router.weight"] = normal(1.5 / np.sqrt(H), E, H)
        t[p + "mlp.router.bias"] = normal(0.5, E)
        for which, n, k in (("gate_up_proj", 2 * inter, H), ("down_proj", H, inter)):
            blocks, scales = to_mxfp4(expert_matrix(rng, E, n, k, binades))
            t[p + f"mlp.experts.{which}_blocks"] = torch.from_numpy(blocks)
            t[p + f"mlp.experts.{which}_scales"] = torch.from_numpy(scales)
            t[p + f"mlp.experts.{which}_bias"] = normal(0.1, E, n)
    shards[1]["model.norm.weight"] = normal(0.1, H, mean=1.0)
    shards[1]["lm_head.weight"] = normal(2.5 / np.sqrt(H), s["vocab"], H)

    root.mkdir(parents=True, exist_ok=True)
    names = ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]
    for name, tensors in zip(names, shards, strict=True):
        save_file(tensors, str(root / name), metadata={"format": "pt"})
    weight_map = {k: n for n, t in zip(names, shards, strict=True) for k in t}
    total = sum(v.numel() * v.element_size() for t in shards for v in t.values())
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (root / "config.json").write_text(json.dumps(hf_config(s), indent=2))
    (root / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
         "pad_token_id": 199999}, indent=2))
    from edgec.harmony.tokenizer import write_tokenizer_files

    write_tokenizer_files(root)
    return root
