"""The one JSON reader: regular files only, a size cap and a nesting limit, one-line errors naming the file.

Every JSON edgec reads from the user (config.json, index, edgec.json, conversations, tools, safetensors headers)
goes through `loads` / `read_json`, so /dev/zero, a FIFO or a 200,000-deep nest is refused, never a hang, a
MemoryError or a RecursionError.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import EdgecError

MAX_JSON_BYTES = 64 << 20  # config, index, manifest, conversation files (tokenizer.json is ~27 MB)
MAX_DEPTH = 64  # gpt-oss files nest at most 6 deep; conversations a few more


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """stat() of `path` (symlinks followed), refusing anything but a regular file (a FIFO, /dev/zero, a folder)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise EdgecError(f"{path}: {what} not found") from None
    except OSError as e:
        raise EdgecError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
        raise EdgecError(f"{path}: is {kind}, not a regular {what}")
    return st


def loads(text: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text (bytes: UTF-8); deeper nesting than `max_depth` is refused (checked without recursion)."""
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except RecursionError:
        raise EdgecError(f"{where}: JSON nested too deeply (limit {max_depth})") from None
    except UnicodeDecodeError:
        raise EdgecError(f"{where}: cannot read (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise EdgecError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from None
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > max_depth:
                raise EdgecError(f"{where}: JSON nested too deeply (limit {max_depth})")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Any JSON value from a regular file of at most `max_bytes`, or a one-line EdgecError naming the file."""
    st = regular_file(path)
    if st.st_size > max_bytes:
        raise EdgecError(f"{path}: {st.st_size} bytes, more than the {max_bytes >> 20} MiB edgec reads as JSON")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise EdgecError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise EdgecError(f"{path}: more than the {max_bytes >> 20} MiB edgec reads as JSON")
    return loads(data, str(path))


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file (config.json, index, manifest), or a one-line EdgecError."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise EdgecError(f"{path}: expected a JSON object")
    return d
