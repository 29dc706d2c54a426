"""Conversion entry point: a target profile picks the converter; every converter streams tensor by tensor."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import EdgecError
from ..fsutil import peak_rss_bytes
from ..targets import load_profile


def run_convert(src: str | Path, target: str, out: str | Path, dense: str | None = None,
                experts: str | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Validate SRC, convert it for `target` into OUT atomically, return a summary (also in edgec.json)."""
    profile = load_profile(target)
    out = Path(out)
    if out.exists() and not force:
        raise EdgecError(f"{out}: output folder exists (use --force to replace it)")
    experts = resolve_format(profile, "experts", experts)
    # a profile may pair an expert format with its own dense default (onnx-cpu: int4 experts -> int8 dense)
    dense = resolve_format(profile, "dense", dense or profile.get("dense", {}).get("default_with_experts", {}).get(
        experts))
    ckpt = Checkpoint.open(src)
    module = importlib.import_module(f".{profile['converter']}", __package__)
    t0 = time.perf_counter()
    summary = module.convert(ckpt, profile, out, dense=dense, experts=experts, force=force, progress=progress)
    summary.update(target=target, source=str(src), out=str(out), dense=dense, experts=experts,
                   seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes())
    return summary


def resolve_format(profile: dict[str, Any], cls: str, requested: str | None) -> str:
    """The profile's default for a tensor class, or the requested format if the target supports it."""
    spec = profile.get(cls, {})
    supported = list(spec.get("supported", []))
    choice = requested or spec.get("default")
    if choice not in supported:
        raise EdgecError(f"target {profile['name']} cannot use --{cls} {choice}; supported: {', '.join(supported)}"
                         + (f" ({spec['why']})" if spec.get("why") else ""))
    return choice
