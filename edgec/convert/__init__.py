"""Conversion entry point: a target profile picks the converter; every converter streams tensor by tensor."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import EdgecError
from ..memory import peak_rss_bytes
from ..targets import load_profile


def run_convert(src: str | Path, target: str, out: str | Path, dense: str | None = None,
                experts: str | None = None, force: bool = False, progress: bool = True,
                lm_head: str | None = None) -> dict[str, Any]:
    """Validate SRC, convert it for `target` into OUT atomically, return a summary (also in edgec.json)."""
    profile = load_profile(target)
    out = Path(out)
    if out.exists() and not force:
        raise EdgecError(f"{out}: output folder exists (use --force to replace it)")
    formats = resolve_formats(profile, dense, experts, lm_head)
    ckpt = Checkpoint.open(src)
    module = importlib.import_module(f".{profile['converter']}", __package__)
    t0 = time.perf_counter()
    summary = module.convert(ckpt, profile, out, **formats, force=force, progress=progress)
    summary.update(target=target, source=str(src), out=str(out), **formats, seconds=time.perf_counter() - t0,
                   peak_rss_bytes=peak_rss_bytes())
    return summary


def resolve_formats(profile: dict[str, Any], dense: str | None, experts: str | None,
                    lm_head: str | None) -> dict[str, str]:
    """The formats of every tensor class for a conversion. A profile may pair an expert format with dense and
    lm_head defaults (`default_with_experts`, onnx-cpu: int4 experts -> int8 attention + int4 lm_head) used when
    neither --dense nor --lm-head is given; otherwise lm_head follows --dense. Only profiles with an [lm_head]
    table (onnx-cpu) take a separate --lm-head."""
    experts = resolve_format(profile, "experts", experts)
    paired = dense is None and lm_head is None
    pair = lambda cls: profile.get(cls, {}).get("default_with_experts", {}).get(experts) if paired else None  # noqa
    dense = resolve_format(profile, "dense", dense or pair("dense"))
    if "lm_head" not in profile:
        if lm_head not in (None, dense):
            raise EdgecError(f"target {profile['name']} has no separate --lm-head format: lm_head follows --dense")
        return {"dense": dense, "experts": experts}
    return {"dense": dense, "experts": experts, "lm_head": resolve_format(profile, "lm_head", lm_head or pair(
        "lm_head") or dense)}


def resolve_format(profile: dict[str, Any], cls: str, requested: str | None) -> str:
    """The profile's default for a tensor class, or the requested format if the target supports it."""
    spec = profile.get(cls, {})
    supported = list(spec.get("supported", []))
    choice = requested or spec.get("default")
    if choice not in supported:
        raise EdgecError(f"target {profile['name']} cannot use --{cls.replace('_', '-')} {choice}; supported: "
                         f"{', '.join(supported)}" + (f" ({spec['why']})" if spec.get("why") else ""))
    return choice
