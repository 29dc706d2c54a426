"""The one interface every runtime backend implements, and the one registry that picks a backend for a folder.

A backend is a loaded model plus its KV cache; the generation loop, `edgec logits`, `edgec parity`, chat and bench
use only this interface. The registry maps a profile's `runtime` (recorded in the folder's edgec.json) to a backend
class, imported only when used, so importing this module imports no backend. Each backend class declares the
options it takes (`options`), their defaults on this device (`defaults`) and what it will hold (`plan`: the memory
model of `edgec.memory`).
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import manifest
from ..errors import EdgecError
from ..jsonio import load_json
from ..memory import Budget, Plan, Weights, device_budget
from ..spec import GptOssConfig, check_token_ids

# profile `runtime` -> "module:Class", imported lazily
RUNTIMES: dict[str, str] = {
    "mlx": "edgec.runtime.mlx_backend:MlxBackend",
    "onnxruntime-genai": "edgec.runtime.onnx_backend:OnnxBackend",
    "reference": "edgec.runtime.reference_backend:ReferenceBackend",
}


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

    # ---- what the backend takes and holds (class level: known before loading) ------------------------------------
    @classmethod
    def options(cls, folder: Path) -> dict[str, tuple]:
        """Option name -> the values this backend can run for `folder` on this machine (an empty tuple: any int)."""
        return {}

    @classmethod
    def defaults(cls, folder: Path | None, profile: dict[str, Any] | None = None,
                 device: str | None = None) -> dict[str, Any]:
        """The options used where none is given: for `folder` (as its edgec.json records them) or, without one,
        for a `profile`; on `device` (None: this machine's)."""
        return {}

    @classmethod
    def budget(cls, options: dict[str, Any], override: int | None = None) -> Budget:
        """What the device this backend runs on can give (RAM unless a backend knows better)."""
        return device_budget(None, override)

    @classmethod
    def plan(cls, cfg: GptOssConfig, context: int, weights: Weights, **options: Any) -> Plan:
        """Weights as held + KV at `context` by this backend's own allocation rule + per-step temporaries. Every
        backend of the registry states it."""
        raise NotImplementedError(f"{cls.__name__} states no memory plan")

    @classmethod
    def held_weights(cls, folder: Path) -> Weights:
        """The weights of a folder as stored (what `plan` widens, if the options say so)."""
        raise NotImplementedError(f"{cls.__name__} states no memory plan")

    @classmethod
    def plan_folder(cls, folder: Path, context: int, **options: Any) -> Plan:
        opts = {**cls.defaults(folder), **{k: v for k, v in options.items() if v is not None}}
        return cls.plan(config_of(folder), context, cls.held_weights(folder), **opts)

    @classmethod
    def check_options(cls, folder: Path, given: dict[str, Any]) -> dict[str, Any]:
        """The given options (None = not given) if this backend can run them for `folder`, else a one-line error
        naming what it can run."""
        allowed = cls.options(folder)
        for k, v in given.items():
            if v is None:
                continue
            flag = f"--{k.replace('_', '-')} {v}"
            if k not in allowed:
                runs = ", ".join(f"--{a.replace('_', '-')}" for a in allowed) or "no options"
                raise EdgecError(f"{flag}: the {cls.name} runtime of {folder} has no such option (it takes: {runs})")
            if allowed[k] and v not in allowed[k]:
                raise EdgecError(f"{flag}: the {cls.name} runtime cannot run this for {folder} here; it can run: "
                                 + ", ".join(str(a) for a in allowed[k]))
        return {k: v for k, v in given.items() if v is not None}


class WindowedBackend(Backend):
    """A backend that remembers the token ids it holds, whose full-attention layers grow in FULL_CHUNK steps up to
    `max_context` and whose sliding layers keep the positions from `sw_start` on (window + ROLLBACK_MARGIN, in
    buffers of window + ROLLBACK_MARGIN + PREFILL_CHUNK positions that move only when full). `truncate(n)` only
    moves the length while that history covers the window before n, and otherwise prefills the kept ids again
    (rare, exact). Subclasses implement `reset`, `_run` (one chunk of at most PREFILL_CHUNK tokens) and
    `_move_sliding`."""

    FULL_CHUNK: ClassVar[int] = 1024  # full-attention buffers grow by at least this many positions
    ROLLBACK_MARGIN: ClassVar[int] = 1024  # sliding history kept beyond the window, so truncate(n) rarely recomputes
    PREFILL_CHUNK: ClassVar[int] = 256  # tokens per run of the model while prefilling

    ids: list[int]
    sw_start: int
    max_context: int

    @property
    def length(self) -> int:
        return len(self.ids)

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache (ids, sliding history and all)."""

    @abstractmethod
    def _run(self, ids: list[int], logits: str) -> np.ndarray | None:
        """Append one chunk of ids; float32 logits of every position ("all"), the last ("last") or none ("none")."""

    @abstractmethod
    def _move_sliding(self, drop: int, upto: int) -> None:
        """Move every sliding layer's buffer left by `drop` positions: indices [drop, upto) to [0, upto - drop)."""

    # ---- the allocation rule (one place: `plan` and the buffers both use it) --------------------------------------
    @classmethod
    def sliding_positions(cls, cfg: GptOssConfig, max_context: int) -> int:
        """Positions allocated per sliding layer: window + rollback margin + a prefill chunk, at most max_context."""
        return min(cfg.sliding_window + cls.ROLLBACK_MARGIN + cls.PREFILL_CHUNK, max_context)

    @classmethod
    def full_capacity(cls, need: int, have: int, max_context: int) -> int:
        """Positions a full-attention buffer holding `have` needs for `need`: `have` while it fits, else at least
        1.5x as many (filling the context copies the cache a few times, not once per step), in multiples of
        FULL_CHUNK, at most max_context. Full, the buffers hold exactly max_context positions."""
        if need <= have:
            return have
        return min(max_context, math.ceil(max(need, have * 3 // 2) / cls.FULL_CHUNK) * cls.FULL_CHUNK)

    @classmethod
    def kv_positions(cls, cfg: GptOssConfig, context: int) -> tuple[int, int]:
        """(full, sliding) positions per layer the cache holds once `context` tokens are cached with
        max_context = context."""
        return context, cls.sliding_positions(cfg, context)

    # ---- cache bookkeeping ------------------------------------------------------------------------------------
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

    def _slide(self, start: int, n: int) -> None:
        """Before writing n positions at `start`, move the sliding buffers (when full) so they keep the last
        window + ROLLBACK_MARGIN positions."""
        if start + n - self.sw_start <= self.sliding_positions(self.config, self.max_context):
            return
        drop = start - (self.config.sliding_window + self.ROLLBACK_MARGIN) - self.sw_start
        self._move_sliding(drop, start - self.sw_start)
        self.sw_start += drop

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        if not ids:
            raise EdgecError("forward needs at least one token id")
        if self.length + len(ids) > self.max_context:
            raise EdgecError(f"context full: {self.length} + {len(ids)} tokens exceed max_context "
                             f"{self.max_context}")
        check_token_ids(ids, self.config.vocab_size)
        outs = []
        for s in range(0, len(ids), self.PREFILL_CHUNK):
            last = s + self.PREFILL_CHUNK >= len(ids)
            out = self._run(ids[s : s + self.PREFILL_CHUNK], "all" if all_logits else "last" if last else "none")
            if out is not None:
                outs.append(out)
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False) if len(outs) > 1 else outs[0]


# ---- the registry --------------------------------------------------------------------------------------------
def runtime_class(runtime: str) -> type[Backend]:
    """The backend class of a profile's `runtime`, imported now."""
    if runtime not in RUNTIMES:
        raise EdgecError(f"unknown runtime {runtime!r}; edgec has: {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[runtime].split(":")
    return getattr(importlib.import_module(module), cls)


def target_of(folder: Path) -> str:
    """'source' for a gpt-oss checkpoint, else the target recorded in the folder's edgec.json manifest."""
    folder = Path(folder)
    manifest = folder / "edgec.json"
    if manifest.is_file():
        return str(load_json(manifest).get("target", "?"))
    if (folder / "config.json").exists():  # a FIFO or device is refused by the checkpoint reader, by name
        return "source"
    raise EdgecError(f"{folder}: not a gpt-oss checkpoint nor an edgec output (no config.json / edgec.json)")


def runtime_of(folder: Path) -> str:
    """The runtime a folder runs on: 'reference' for a source checkpoint, else its manifest's (or its target
    profile's) `runtime`."""
    folder = Path(folder)
    target = target_of(folder)
    if target != "source":
        manifest.verify(folder)  # sizes, headers, small files' sha256, the config: edgec.json is not taken on trust
    if target == "source":
        return "reference"
    runtime = manifest.read(folder).runtime
    if not runtime:
        from ..targets import load_profile

        runtime = load_profile(target).get("runtime")
    if runtime not in RUNTIMES:
        raise EdgecError(f"{folder}: edgec.json names target {target!r} with unknown runtime {runtime!r}")
    return str(runtime)


def backend_class(folder: str | Path) -> tuple[type[Backend], str]:
    """(backend class, target) for a folder."""
    folder = Path(folder)
    return runtime_class(runtime_of(folder)), target_of(folder)


def config_of(folder: Path) -> GptOssConfig:
    """The model's config without loading it: edgec.json's `config` for an output folder, else the checkpoint's."""
    folder = Path(folder)
    if (folder / "edgec.json").is_file():
        return GptOssConfig.from_dict(load_json(folder / "edgec.json").get("config") or {},
                                      str(folder / "edgec.json"))
    from ..checkpoint import Checkpoint

    return Checkpoint.scan(folder).config


def load_backend(folder: str | Path, max_context: int | None = None, **options: Any) -> Backend:
    """Open a source checkpoint (numpy reference) or a converted folder with the runtime its manifest names.
    `options` (None = not given) are checked against what that backend declares."""
    folder = Path(folder)
    cls, _ = backend_class(folder)
    return cls(folder, max_context=max_context, **cls.check_options(folder, options))
