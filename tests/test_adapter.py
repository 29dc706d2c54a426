"""The adapter merge against PEFT itself: edgec's float32 deltas equal merge_and_unload()'s weights minus the base."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from edgec.convert.adapter import expert_delta, linear_delta, load_adapter
from edgec.errors import EdgecError


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
