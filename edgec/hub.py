"""Hugging Face ids as model arguments (`edgec chat openai/gpt-oss-20b`), and edgec's own cache folder.

An id is looked up in the local Hugging Face cache, as `huggingface_hub` lays it out: `$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `~/.cache/huggingface/hub`, holding `models--ORG--NAME/refs/main` (a commit hash) and
`models--ORG--NAME/snapshots/COMMIT/` (the files). edgec never downloads: when the id is not there, the error names the
one command that does. With a target, the snapshot is converted once into
`CACHE/models/ORG--NAME/COMMIT/TARGET` (CACHE: `$EDGEC_CACHE_DIR`, else the platform's user cache folder) and later
runs open that folder directly.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import EdgecError

# ORG/NAME, optionally /original (OpenAI's layout in the same repository), optionally @REVISION (a branch, tag or
# commit; last, since a revision such as refs/pr/1 holds slashes)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:/(?P<sub>original))?"
                    r"(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
TARGET_PREFERENCE = ("mlx", "onnx-cpu")  # which earlier conversion a run without --target opens first


def cache_dir() -> Path:
    """edgec's cache: `$EDGEC_CACHE_DIR`, else `%LOCALAPPDATA%\\edgec\\Cache` (Windows), `~/Library/Caches/edgec`
    (macOS), `$XDG_CACHE_HOME/edgec` or `~/.cache/edgec` (elsewhere)."""
    if env := os.environ.get("EDGEC_CACHE_DIR"):
        return Path(env).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "edgec" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "edgec"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgec"


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories (its own resolution order)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env := os.environ.get(var):
            return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def is_hub_id(arg: str) -> bool:
    return bool(HUB_ID.match(arg)) and not Path(arg).exists()


def download_command(repo: str, sub: str | None = None) -> str:
    """The command that puts `repo` into the Hugging Face cache: the HF layout (not original/ nor metal/), or the
    one folder `sub` of it."""
    if sub:
        return f'hf download {repo} --include "{sub}/*"'
    return f'hf download {repo} --exclude "original/*" --exclude "metal/*"'


def parse_id(hub_id: str) -> tuple[str, str | None, str | None]:
    """(ORG/NAME, folder or None, revision or None) of a Hugging Face id."""
    m = HUB_ID.match(hub_id)
    if not m:
        raise EdgecError(f"{hub_id}: not a Hugging Face id (ORG/NAME, ORG/NAME/original, ORG/NAME@REVISION)")
    return m["repo"], m["sub"], m["rev"]


def snapshot(hub_id: str) -> tuple[Path, str]:
    """(checkpoint folder, commit) of `ORG/NAME[/FOLDER][@REVISION]` in the local Hugging Face cache: the snapshot,
    or its FOLDER (`original`); else a one-line EdgecError naming the download command."""
    repo, sub, revision = parse_id(hub_id)
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    what = f"{repo}/{sub}" if sub else repo
    missing = EdgecError(f"{what} is not in the Hugging Face cache ({hf_cache_dir()}); download it with: "
                         f"{download_command(repo, sub)}" + (f" --revision {revision}" if revision else ""))
    snaps = root / "snapshots"
    ref = root / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif revision:
        commit = revision  # a commit hash
    else:  # downloaded at a pinned revision only: one snapshot is unambiguous
        found = sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []
        if len(found) != 1:
            if found:
                raise EdgecError(f"{repo}: the Hugging Face cache holds {len(found)} snapshots and no refs/main; "
                                 f"name one: {repo}@{found[0]}")
            raise missing
        commit = found[0]
    folder = snaps / commit / sub if sub else snaps / commit
    if not (folder / "config.json").is_file():
        raise missing
    return folder, commit


def model_name(path: str | Path) -> str:
    """A checkpoint's own name: the repository's NAME for a Hugging Face snapshot
    (`.../models--ORG--NAME/snapshots/COMMIT[/original]`), else its folder's name (the parent's for original/)."""
    path = Path(path).resolve()
    if path.name == "original":
        path = path.parent
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def source_path(arg: str | Path) -> Path:
    """A checkpoint argument as convert, inspect, parity and logits take it: a folder, else a Hugging Face id read
    from the local cache (never downloaded)."""
    path = Path(arg).expanduser()
    if path.exists() or not HUB_ID.match(str(arg)):
        return path
    return snapshot(str(arg))[0]


def converted_folder(repo: str, commit: str, target: str) -> Path:
    return cache_dir() / "models" / repo.replace("/", "--") / commit / target


def resolve_model(arg: str, target: str | None = None, announce=None) -> Path:
    """MODEL as chat and generate take it: a folder (a checkpoint or an edgec output), or a Hugging Face id.

    For an id: with `target`, its conversion in edgec's cache, made on the first run (`announce(text)` says so);
    without, an earlier conversion if there is one, else the snapshot itself (the source checkpoint)."""
    from .runtime.base import target_of

    path = Path(arg).expanduser()
    if path.exists() or not HUB_ID.match(arg):
        if not path.is_dir():
            raise EdgecError(f"{arg}: no such folder (a gpt-oss checkpoint, an edgec output, or a Hugging Face id "
                             f"such as openai/gpt-oss-20b)")
        have = target_of(path)
        if target and have != target:
            if have == "source":
                raise EdgecError(f"--target {target} converts a Hugging Face id; for the folder {arg} run "
                                 f"`edgec convert {arg} --target {target} -o OUT` and chat with OUT")
            raise EdgecError(f"--target {target}: {arg} is an edgec output for {have}")
        return path
    snap, commit = snapshot(arg)
    repo, sub, _ = parse_id(arg)
    repo = f"{repo}/{sub}" if sub else repo  # original/ converts apart from the HF layout
    if target is None:
        done = [t for t in TARGET_PREFERENCE if (converted_folder(repo, commit, t) / "edgec.json").is_file()]
        return converted_folder(repo, commit, done[0]) if done else snap
    out = converted_folder(repo, commit, target)
    if not (out / "edgec.json").is_file():
        from .convert import run_convert
        from .targets import load_profile

        load_profile(target)  # an unknown target is refused before anything is said or written
        if announce:
            announce(f"first run of {arg} for {target}: converting the Hugging Face snapshot {commit[:12]} into "
                     f"{out} (once; later runs open it directly)")
        run_convert(snap, target, out)
    return out


__all__ = ["cache_dir", "converted_folder", "download_command", "hf_cache_dir", "is_hub_id", "model_name", "parse_id",
           "resolve_model", "snapshot", "source_path"]
