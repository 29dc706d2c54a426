"""Conversion entry point: a target profile picks the converter; every converter streams tensor by tensor."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, nonfinite_line
from ..errors import EdgecError
from ..fsutil import check_output
from ..memory import peak_rss_bytes
from ..targets import list_targets, load_profile
from .adapter import load_adapters


def run_convert(src: str | Path, target: str, out: str | Path, dense: str | None = None,
                experts: str | None = None, force: bool | str = False, progress: bool = True,
                lm_head: str | None = None, strict: bool = False, keep_16bit: bool = False,
                adapters: list[str | Path] = (), adapter_scales: list[float] = (), max_buffer: int | None = None,
                warn: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Validate SRC, convert it for `target` into OUT atomically, return a summary (also in edgec.json).

    force: True replaces an earlier edgec output, "foreign" any folder (never the source). Non-finite weights
    and a missing tokenizer.json go to `warn` before the work starts and into the summary's `warnings`; with
    `strict` non-finite weights are an error. `keep_16bit`: a source with dense 16-bit experts keeps them as dense
    matrices (the `decomposed` expert format, priced at the dense format's bytes by memory.py) instead of MXFP4.
    `adapters`: PEFT LoRA folders merged into the weights as they are read (convert.adapter), `adapter_scales` none
    or one each. `max_buffer` (bytes): the largest initializer, in place of the profile's max_buffer_bytes (targets
    that have one: onnx-webgpu)."""
    profile = with_max_buffer(load_profile(target), max_buffer)
    out = Path(out)
    check_output(out, force, [Path(src)])  # fail fast; atomic_dir checks again, with every source file
    if keep_16bit:
        experts = keep_16bit_format(profile, experts)
    formats = resolve_formats(profile, dense, experts, lm_head)
    ckpt = Checkpoint.open(src)
    if keep_16bit and ckpt.experts_layout == "mxfp4":
        raise EdgecError(f"{src}: --keep-16bit: the source's experts are MXFP4 already (no 16-bit experts to keep)")
    ckpt.adapters = load_adapters(list(adapters), ckpt.config, list(adapter_scales))  # refused before any work
    warnings = checkpoint_warnings(ckpt, strict)
    for w in warnings:
        warn(w)
    module = importlib.import_module(f".{profile['converter']}", __package__)
    t0 = time.perf_counter()
    summary = module.convert(ckpt, profile, out, **formats, force=force, progress=progress)
    summary.update(target=target, source=str(src), out=str(out), **formats, seconds=time.perf_counter() - t0,
                   peak_rss_bytes=peak_rss_bytes(), warnings=warnings)
    if ckpt.adapters:
        summary["adapters"] = [ad.record() for ad in ckpt.adapters]
    if ckpt.quant_error:
        summary["quantization"] = q = ckpt.quant_summary()
        summary.setdefault("lossy", []).append(quant_line(ckpt.experts_layout, q))
    return summary


def with_max_buffer(profile: dict[str, Any], max_buffer: int | None) -> dict[str, Any]:
    """The profile with its device-buffer cap set to `max_buffer` bytes (None: its own); refused in one line for a
    target without one (its runtime allocates no buffer per initializer)."""
    if max_buffer is None:
        return profile
    if "max_buffer_bytes" not in profile:
        capped = [n for n in list_targets() if "max_buffer_bytes" in load_profile(n)]
        raise EdgecError(f"target {profile['name']} has no device-buffer cap: --max-buffer applies to targets with "
                         f"max_buffer_bytes ({', '.join(capped)})")
    if max_buffer <= 0:
        raise EdgecError(f"--max-buffer {max_buffer}: expected a size in bytes over 0 (such as 128MiB)")
    return {**profile, "max_buffer_bytes": int(max_buffer)}


def keep_16bit_format(profile: dict[str, Any], experts: str | None) -> str:
    """The expert format that runs 16-bit experts as they are on this target, or one line saying there is none."""
    supported = (profile.get("experts") or {}).get("supported", [])
    if "decomposed" not in supported or experts not in (None, "decomposed"):
        raise EdgecError(f"target {profile['name']} cannot keep 16-bit experts (--keep-16bit needs --experts "
                         f"decomposed, dense MatMuls; supported here: {', '.join(supported)})")
    return "decomposed"


def quant_line(layout: str, q: dict[str, dict[str, float]]) -> str:
    """The one line `convert` prints for dense experts it quantized: relative error per tensor kind."""
    parts = [f"{k} mean {v['mean']:.4%} worst {v['worst']:.4%} ({v['matrices']} matrices)" for k, v in q.items()]
    what = "adapted experts requantized" if layout == "mxfp4" else f"experts quantized from {layout.lower()}"
    return f"{what} to MXFP4, relative error ||W-Q(W)||/||W||: " + "; ".join(parts)


def checkpoint_warnings(ckpt: Checkpoint, strict: bool = False) -> list[str]:
    """What a conversion would carry over silently: non-finite weights (an error with `strict`), no tokenizer."""
    out = [nonfinite_line(ckpt.path, name, n) for name, n in ckpt.nonfinite().items()]
    if out and strict:
        raise EdgecError(out[0] + (f" (and {len(out) - 1} more tensors)" if len(out) > 1 else "") + "; --strict")
    if problem := ckpt.tokenizer_problem():
        out.append(problem + "; copy it into the output")
    return out


def resolve_formats(profile: dict[str, Any], dense: str | None, experts: str | None,
                    lm_head: str | None) -> dict[str, str]:
    """The formats of every tensor class for a conversion. A profile may pair an expert format with dense and
    lm_head defaults (`default_with_experts`, onnx-cpu: int4 experts -> int8 attention + int4 lm_head) used when
    neither --dense nor --lm-head is given; otherwise lm_head follows --dense. Only profiles with an [lm_head]
    table (onnx-cpu) take a separate --lm-head."""
    experts = resolve_format(profile, "experts", experts)
    paired = dense is None and lm_head is None
    pair = lambda cls: profile.get(cls, {}).get("default_with_experts", {}).get(experts) if paired else None
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
