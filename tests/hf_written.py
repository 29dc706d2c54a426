"""A tiny gpt-oss written by transformers itself: `GptOssForCausalLM(config)` with random weights, saved with
`save_pretrained` in bf16, so its experts are the dense 16-bit layout a fine-tune has (`mlp.experts.gate_up_proj`
[E, hidden, 2*inter], `down_proj` [E, inter, hidden], no `quantization_config`). transformers is the oracle here,
never a runtime dependency. hidden != intermediate so a missed transpose cannot pass."""

from __future__ import annotations

from pathlib import Path

SHAPE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4, vocab_size=201088)


def write_transformers_ckpt(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from edgec.harmony.tokenizer import write_tokenizer_files

    torch.manual_seed(seed)
    cfg = GptOssConfig(**SHAPE, initializer_range=0.1, bos_token_id=199998, eos_token_id=200002,
                       pad_token_id=199999)
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():  # transformers initializes biases to zero and the sinks to N(0, 0.1): give them weight
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    write_tokenizer_files(out)
    return out
