"""Deployment target profiles: one declarative TOML file per target in the repository's `targets/` folder."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import EdgecError

_HERE = Path(__file__).resolve().parent
# a checkout (editable install) reads the repository's targets/; a wheel ships the same files as edgec/profiles/
TARGETS_DIR = _HERE.parent / "targets" if (_HERE.parent / "targets").is_dir() else _HERE / "profiles"


def list_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_profile(name: str) -> dict[str, Any]:
    """The profile of target `name` (its `name` key is set); one-line error naming the known targets."""
    path = TARGETS_DIR / f"{name}.toml"
    if name not in list_targets():  # a name, never a path (`../targets/mlx`)
        raise EdgecError(f"unknown target {name!r}; known targets: {', '.join(list_targets()) or 'none'}")
    try:
        prof = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgecError(f"{path}: invalid target profile ({e})") from None
    prof["name"] = name
    return prof
