"""Pieces every converter shares: tokenizer files, the edgec.json manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import Checkpoint
from ..fsutil import sha256_file
from ..hub import model_name
from ..manifest import NAME, config_sha256
from .quantize import RULE as QUANT_RULE


def copy_tokenizer_files(ckpt: Checkpoint, out: Path) -> list[str]:
    names = []
    for p in ckpt.tokenizer_files():
        shutil.copyfile(p, out / p.name)
        names.append(p.name)
    return names


def experts_from(ckpt: Checkpoint) -> str:
    """What quantized experts were made from: "bf16" (a 16-bit source) or "mxfp4+lora" (MXFP4 plus adapter deltas)."""
    return ckpt.experts_layout.lower() + ("+lora" if ckpt.experts_layout == "mxfp4" else "")


def write_manifest(out: Path, ckpt: Checkpoint, profile: dict[str, Any], recipe: dict[str, Any],
                   known_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """edgec.json: target, recipe, source config hash, edgec version, the config with its sha256, and the sha256 of
    every file written (`known_sha256`: digests a converter already computed while writing, so big files are not
    read twice). `edgec.manifest` reads and verifies it."""
    known = known_sha256 or {}
    files = {p.name: {"sha256": known.get(p.name) or sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(out.iterdir()) if p.is_file() and p.name != NAME}
    config = ckpt.config.as_dict()
    manifest = {
        "edgec_version": __version__,
        "target": profile["name"],
        "runtime": profile.get("runtime"),
        "recipe": recipe,
        "source": {"path": str(ckpt.path), "name": model_name(ckpt.path), "layout": ckpt.layout,
                   "config_sha256": ckpt.config_hash()},
        "config": config,
        "config_sha256": config_sha256(config),
        "files": files,
    }
    manifest["source"]["experts"] = ckpt.experts_layout
    if ckpt.adapters:  # LoRA merged as read (convert.adapter): parity merges the same ones into its reference
        manifest["adapters"] = [ad.record() for ad in ckpt.adapters]
    if ckpt.quant_error:  # experts quantized here (convert.quantize), dense or MXFP4 ones an adapter changed: the
        # error it cost, per tensor kind; parity then also applies the profile's [parity."<experts>-from-16bit"] bounds
        manifest["recipe"] = {**recipe, "experts_from": experts_from(ckpt)}
        manifest["quantization"] = {"experts": "mxfp4", "rule": QUANT_RULE, "relative_error": ckpt.quant_summary()}
    if profile.get("runtime_defaults"):  # the runtime's options per device (e.g. mlx: compute, kv_dtype)
        manifest["runtime_defaults"] = profile["runtime_defaults"]
    (out / NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
