"""The one interface every runtime backend implements: a loaded model plus its KV cache.

The generation loop, `edgec logits`, `edgec parity`, chat and bench use only this interface.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import EdgecError
from ..spec import GptOssConfig, load_json


class Backend(ABC):
    """A model with a KV cache. `forward` appends tokens; `truncate` rolls the cache back exactly."""

    name: str = "?"
    config: GptOssConfig

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of tokens currently in the cache (the position of the next token)."""

    @abstractmethod
    def forward(self, ids: list[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append `ids` at positions length.. and return float32 logits: [len(ids), V] or, by default, [1, V]."""

    @abstractmethod
    def truncate(self, n: int) -> None:
        """Roll the cache back to its first `n` tokens, exactly (the next forward continues at position n)."""

    def reset(self) -> None:
        self.truncate(0)

    def kv_bytes(self) -> int:
        """Bytes the KV cache has allocated right now."""
        return 0


class WindowedBackend(Backend):
    """A backend that remembers the token ids it holds and whose sliding layers keep positions from `sw_start` on
    (window + a rollback margin): `truncate(n)` only moves the length while that history covers the window before
    n, and otherwise prefills the kept ids again (rare, exact). Subclasses implement `reset` and `forward`."""

    ids: list[int]
    sw_start: int

    @property
    def length(self) -> int:
        return len(self.ids)

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache (ids, sliding history and all)."""

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise EdgecError(f"cannot truncate a cache of {self.length} tokens to {n}")
        if n > 0 and self.sw_start > max(0, n - self.config.sliding_window):  # rolled back past the kept history
            ids = self.ids[:n]
            self.reset()
            self.forward(ids)
        elif n == 0:
            self.reset()
        else:
            del self.ids[n:]


def grown_capacity(need: int, have: int, max_context: int, step: int) -> int:
    """Positions a full-attention KV buffer holding `have` needs for `need`: `have` while it fits, else at least 1.5x
    as many (filling the context copies the cache a few times, not once per step), in multiples of `step`, at most
    max_context."""
    if need <= have:
        return have
    return min(max_context, math.ceil(max(need, have * 3 // 2) / step) * step)


def target_of(folder: Path) -> str:
    """'source' for a gpt-oss checkpoint, else the target recorded in the folder's edgec.json manifest."""
    folder = Path(folder)
    manifest = folder / "edgec.json"
    if manifest.is_file():
        return str(load_json(manifest).get("target", "?"))
    if (folder / "config.json").is_file():
        return "source"
    raise EdgecError(f"{folder}: not a gpt-oss checkpoint nor an edgec output (no config.json / edgec.json)")


def load_backend(folder: str | Path, max_context: int | None = None, **kw) -> Backend:
    """Open a source checkpoint (numpy reference) or a converted folder with the runtime of its target."""
    folder = Path(folder)
    target = target_of(folder)
    if target == "source":
        from .reference_backend import ReferenceBackend

        return ReferenceBackend(folder)
    if target == "mlx":
        from .mlx_backend import MlxBackend

        return MlxBackend(folder, max_context=max_context, **kw)
    if target.startswith("onnx"):
        from .onnx_backend import OnnxBackend

        return OnnxBackend(folder, max_context=max_context, **kw)
    raise EdgecError(f"{folder}: edgec.json names unknown target {target!r}")
