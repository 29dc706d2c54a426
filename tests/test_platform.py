"""Importing edgec and `edgec --help` need no backend; a missing backend is a one-line install hint (exit 3)."""

from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys; [sys.modules.__setitem__(m, None) for m in {mods}]; "


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_and_help_load_no_backend():
    code = ("import sys, edgec.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(edgec.cli.main, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('mlx', 'onnx', 'onnxruntime', 'onnxruntime_genai', 'torch', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_backend_is_a_one_line_hint(tiny, tiny_mlx, tmp_path):
    out = tiny_mlx
    logits = ["logits", str(out), "--ids", "1,2", "--out", str(tmp_path / "l.npy")]
    for mods, args, extra in ((["mlx", "mlx.core"], logits, "mlx"),
                              (["onnx", "onnxruntime", "onnxruntime_genai"],
                               ["convert", str(tiny), "-t", "onnx-cpu", "-o", str(tmp_path / "o")], "onnx")):
        r = run_py(BLOCK.format(mods=mods) + f"from edgec.cli import main; main({args!r})")
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pip install 'edgec[{extra}]'" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
