"""The numpy reference as a Backend: no KV cache, it recomputes the whole sequence (ground truth, not speed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint
from ..memory import Plan, Weights
from ..spec import GptOssConfig
from .base import Backend
from .reference import Q_CHUNK, VOCAB_CHUNK, Reference


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, folder: str | Path, max_context: int | None = None):
        self.ckpt = Checkpoint.open(folder)
        self.config = self.ckpt.config
        self.ref = Reference(self.ckpt)
        self.ids: list[int] = []

    @classmethod
    def held_weights(cls, folder: Path) -> Weights:
        return Weights(Checkpoint.scan(folder).source_bytes())

    @classmethod
    def plan(cls, cfg: GptOssConfig, context: int, weights: Weights, **_: Any) -> Plan:
        """The checkpoint's memory map (pages read as used), no KV cache; each forward recomputes the sequence:
        a few float32 activations per position, a block of attention scores and a widened block of lm_head."""
        act = context * (cfg.hidden_size + cfg.q_dim + 2 * cfg.kv_dim + 2 * cfg.intermediate_size) * 4 * 2
        temps = act + Q_CHUNK * cfg.num_attention_heads * context * 4 * 2 + VOCAB_CHUNK * cfg.hidden_size * 4
        return Plan("reference", context, weights.total, 0, temps, "none (recomputes)", "memory-mapped")

    @property
    def length(self) -> int:
        return len(self.ids)

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        new = [int(i) for i in np.asarray(ids).reshape(-1)]
        self.ids.extend(new)
        return self.ref.logits(self.ids, last=len(new) if all_logits else 1)

    def truncate(self, n: int) -> None:
        del self.ids[n:]
