"""edgec.json, the manifest of an output folder: the one place that reads it and checks the folder against it.

The manifest records the target, the recipe, the source, the model config (with its own sha256, so an edit is
seen) and the size and sha256 of every file written. `verify` is cheap by default (sizes, safetensors headers,
sha256 of files up to SMALL_FILE) and reads everything with `full=True`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgecError
from .fsutil import sha256_file
from .jsonio import load_json, regular_file
from .spec import GptOssConfig

NAME = "edgec.json"
SMALL_FILE = 64 << 20  # files up to this size are hashed on every load; bigger ones only with full=True


def config_sha256(config: dict[str, Any]) -> str:
    """Digest of the config block as recorded (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    folder: Path
    target: str
    runtime: str | None
    recipe: dict[str, Any]
    source: dict[str, Any]
    config: GptOssConfig
    files: dict[str, dict[str, Any]]  # name -> {"sha256": hex, "bytes": int}
    edgec_version: str | None
    adapters: tuple[dict[str, Any], ...] = ()  # LoRA adapters merged: name, path, sha256, config_sha256, scale


WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data")  # what a runtime loads: each must be in `files`


def read(folder: str | Path) -> Manifest:
    """The folder's edgec.json, every field type-checked (one-line EdgecError naming the file)."""
    folder = Path(folder)
    path = folder / NAME
    m = load_json(path)
    where = str(path)
    if not isinstance(m.get("target"), str) or not m["target"]:
        raise EdgecError(f"{where}: no target name")
    for key in ("recipe", "source", "files", "config"):
        if not isinstance(m.get(key, {}), dict):
            raise EdgecError(f"{where}: {key!r} must be a JSON object, got {type(m[key]).__name__}")
    if not isinstance(m.get("config"), dict) or not isinstance(m.get("files"), dict):
        raise EdgecError(f"{where}: not an edgec manifest (no config / files)")
    if m.get("runtime") is not None and not isinstance(m["runtime"], str):
        raise EdgecError(f"{where}: 'runtime' must be a string, got {type(m['runtime']).__name__}")
    if "config_sha256" in m and m["config_sha256"] != config_sha256(m["config"]):
        raise EdgecError(f"{where}: its config was edited after conversion (convert again rather than edit it)")
    files = m["files"]
    for name, info in files.items():
        if Path(name).name != name or name in (".", ".."):
            raise EdgecError(f"{where}: file name {name!r} escapes the folder")
        if not isinstance(info, dict) or type(info.get("bytes")) is not int or not isinstance(info.get("sha256"),
                                                                                             str):
            raise EdgecError(f"{where}: file {name}: needs an integer 'bytes' and a 'sha256' string")
    adapters = m.get("adapters", [])
    if not isinstance(adapters, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("path"), str)
            and isinstance(a.get("sha256"), str) and isinstance(a.get("scale"), (int, float)) for a in adapters):
        raise EdgecError(f"{where}: 'adapters' must be a list of objects with name, path, sha256 and a number scale")
    return Manifest(folder, m["target"], m.get("runtime") if isinstance(m.get("runtime"), str) else None,
                    m.get("recipe", {}), m.get("source", {}), GptOssConfig.from_dict(m["config"], where), files,
                    m.get("edgec_version"), tuple(adapters))


def problems(m: Manifest, full: bool = False) -> list[str]:
    """Every file of the folder that differs from the manifest: missing, another size, a damaged safetensors
    header, another sha256 (files up to SMALL_FILE, or all with full=True); then a config.json / genai_config.json
    that says another model than the manifest."""
    from .safetensors_io import SafetensorsFile

    out = [f"{p}: not recorded in edgec.json (a weights file the runtime would load unchecked)"
           for p in sorted(m.folder.iterdir()) if p.name not in m.files and p.suffix in WEIGHT_SUFFIXES]
    for name, info in sorted(m.files.items()):
        p = m.folder / name
        try:
            size = regular_file(p).st_size
            if size != info["bytes"]:
                out.append(f"{p}: {size} bytes, edgec.json records {info['bytes']}")
                continue
            if name.endswith(".safetensors"):
                SafetensorsFile(p).close()
        except EdgecError as e:
            out.append(str(e).replace("file not found", "missing (recorded in edgec.json)"))
            continue
        if (full or size <= SMALL_FILE) and sha256_file(p) != info["sha256"]:
            out.append(f"{p}: sha256 differs from edgec.json (the file was changed after conversion)")
    return out or _config_problems(m)


def _config_problems(m: Manifest) -> list[str]:
    """The runtime reads the model from config.json (mlx) or genai_config.json (onnx): it must be the manifest's."""
    c = m.config
    try:
        if "config.json" in m.files:
            p = m.folder / "config.json"
            same = GptOssConfig.from_hf(load_json(p), str(p)) == c
        elif "genai_config.json" in m.files:
            p = m.folder / "genai_config.json"
            g = load_json(p).get("model")
            dec = g.get("decoder") if isinstance(g, dict) else None
            same = isinstance(dec, dict) and g.get("vocab_size") == c.vocab_size and all(dec.get(k) == v for k, v in (
                ("num_hidden_layers", c.num_hidden_layers), ("head_size", c.head_dim), ("hidden_size", c.hidden_size),
                ("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.num_key_value_heads)))
        else:
            return []
    except EdgecError as e:
        return [str(e)]
    return [] if same else [f"{p}: describes another model than edgec.json records"]


def verify(folder: str | Path, full: bool = False) -> Manifest:
    """Read the manifest and check the folder against it; the first problem is raised as one line."""
    m = read(folder)
    if bad := problems(m, full):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise EdgecError(bad[0] + more)
    return m
