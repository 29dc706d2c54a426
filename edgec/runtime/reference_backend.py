"""The numpy reference as a Backend: no KV cache, it recomputes the whole sequence (ground truth, not speed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from .base import Backend
from .reference import Reference


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, folder: str | Path):
        self.ckpt = Checkpoint.open(folder)
        self.config = self.ckpt.config
        self.ref = Reference(self.ckpt)
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        new = [int(i) for i in np.asarray(ids).reshape(-1)]
        self.ids.extend(new)
        return self.ref.logits(self.ids, last=len(new) if all_logits else 1)

    def truncate(self, n: int) -> None:
        del self.ids[n:]
