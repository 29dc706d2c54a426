"""The CLI without the POSIX-only pieces Windows lacks: `resource`, `fcntl`, `os.posix_fallocate`,
`os.copy_file_range`, `os.sysconf`, `mmap.MADV_DONTNEED` and libc's `sync_file_range` (which safetensors_io looks up
through ctypes). A subprocess removes them before edgec is imported, then runs synth, inspect, convert (mlx and
onnx-cpu) and generate on both outputs; everything must work and give the same bytes as with them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

PRELUDE = """
import ctypes, mmap, os, sys
for m in ("resource", "fcntl"):
    sys.modules[m] = None  # import raises ImportError (ModuleNotFoundError), as on Windows
for a in ("posix_fallocate", "copy_file_range", "sysconf"):
    if hasattr(os, a):
        delattr(os, a)
if hasattr(mmap, "MADV_DONTNEED"):
    del mmap.MADV_DONTNEED

class CDLL(ctypes.CDLL):  # a C library without sync_file_range, as Windows' is
    def __getattr__(self, name):
        if name == "sync_file_range":
            raise AttributeError(name)
        return super().__getattr__(name)

ctypes.CDLL = CDLL
"""

SCRIPT = PRELUDE + """
import json
from click.testing import CliRunner
from edgec.cli import main
import edgec.safetensors_io as io
for m in ("resource", "fcntl"):
    try:
        __import__(m)
        raise SystemExit(m + " is still importable")
    except ImportError:
        pass
assert io._sync_file_range is None and not hasattr(os, "copy_file_range") and not hasattr(os, "posix_fallocate")
root = sys.argv[1]
results = {}
for name, args in [
        ("synth", ["synth", root + "/src", "--preset", "tiny", "--layers", "2"]),
        ("inspect", ["inspect", root + "/src", "--context", "4096"]),
        ("mlx", ["convert", root + "/src", "-t", "mlx", "-o", root + "/mlx"]),
        ("onnx", ["convert", root + "/src", "-t", "onnx-cpu", "-o", root + "/onnx"]),
        ("gen-mlx", ["generate", root + "/mlx", "--prompt", "hi", "--json", "--max-tokens", "3", "--temp", "0",
                     "--max-context", "512"]),
        ("gen-onnx", ["generate", root + "/onnx", "--prompt", "hi", "--json", "--max-tokens", "3", "--temp", "0",
                      "--max-context", "512"])]:
    r = CliRunner().invoke(main, args)
    results[name] = {"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                     "error": None if r.exception is None or isinstance(r.exception, SystemExit)
                     else f"{type(r.exception).__name__}: {r.exception}"}
print(json.dumps(results))
"""


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "edgec.json"}


def test_cli_runs_without_the_posix_only_modules(tmp_path):
    from edgec.convert import run_convert

    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    failed = {k: (v["code"], v["error"], v["stderr"][-400:]) for k, v in res.items() if v["code"] != 0}
    assert not failed, failed
    for k in ("gen-mlx", "gen-onnx"):
        assert json.loads(res[k]["stdout"])["stats"]["decode"] == 3
    # the same bytes as a conversion with every POSIX fast path available
    for target, name in (("mlx", "mlx"), ("onnx-cpu", "onnx")):
        ref = Path(run_convert(tmp_path / "src", target, tmp_path / f"ref-{name}", progress=False)["out"])
        assert _tree_hashes(tmp_path / name) == _tree_hashes(ref), target
