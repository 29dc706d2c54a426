"""Every exit code of the README's table, from the command a user runs (real processes, real signals)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

from conftest import REPO

EDGEC = [sys.executable, "-m", "edgec"]
BLOCK = "import sys; [sys.modules.__setitem__(m, None) for m in {mods}]; "


def ctrl_c_on() -> None:
    """In the child: SIGINT as a terminal delivers it (a suite started in the background inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def edgec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEC, *args], capture_output=True, text=True, timeout=600)


def one_line(r: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_the_readme_table_is_the_one_tested_here():
    """0, 1, 2, 3 and 130 below; SIGTERM mid-conversion (130 too) in test_outputs.py."""
    text = (REPO / "README.md").read_text()
    paragraph = text[text.index("Exit codes:"):].split("\n\n")[0]
    assert [int(c) for c in re.findall(r"\b(\d+) ", paragraph)] == [0, 1, 2, 3, 130]


def test_0_ok(tiny):
    assert edgec("inspect", str(tiny)).returncode == 0


def test_1_parity_failure(tiny, tiny_mlx, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([[200006, 17360, 200008]]))
    r = edgec("parity", str(tiny), str(tiny_mlx), "--prompts", str(tmp_path / "p.json"), "--tokens", "1",
              "--max-abs", "0")
    assert r.returncode == 1 and "parity failed" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr


def test_2_bad_input(tmp_path):
    one_line(edgec("convert", str(tmp_path / "nope"), "-t", "mlx", "-o", str(tmp_path / "o")), 2,
             "no such checkpoint folder")


def test_3_missing_backend(tiny_mlx, tmp_path):
    args = ["logits", str(tiny_mlx), "--ids", "1,2", "--out", str(tmp_path / "l.npy")]
    r = subprocess.run([sys.executable, "-c", BLOCK.format(mods=["mlx", "mlx.core"])
                        + f"from edgec.__main__ import run; sys.argv = ['edgec', *{args!r}]; run()"],
                       capture_output=True, text=True)
    one_line(r, 3, "pip install 'edgec[mlx]'")


def test_3_missing_execution_provider(tiny_onnx, tmp_path):
    """An onnx-dml folder on a machine whose onnxruntime has no DirectML."""
    import onnxruntime

    assert "DmlExecutionProvider" not in onnxruntime.get_available_providers()
    out = tmp_path / "dml"
    out.mkdir()
    for p in tiny_onnx.iterdir():
        if p.name != "edgec.json":
            (out / p.name).symlink_to(p)
    m = json.loads((tiny_onnx / "edgec.json").read_text())
    m["recipe"]["execution_provider"] = "DmlExecutionProvider"
    (out / "edgec.json").write_text(json.dumps({**m, "target": "onnx-dml"}))
    one_line(edgec("logits", str(out), "--ids", "1,2", "--out", str(tmp_path / "l.npy")), 3,
             "needs onnxruntime's DmlExecutionProvider, which this onnxruntime build lacks")


def test_130_ctrl_c_in_synth(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.Popen([*EDGEC, "synth", str(out), "--preset", "20b", "--layers", "3", "--vocab", "32000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_on)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".m.edgec-tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "synth ended before it could be interrupted"  # ~2.5 GB to write: it is mid-way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; no partial output was left behind" in err, err
    assert list(tmp_path.iterdir()) == []


def test_130_ctrl_c_in_generate(tiny_mlx):
    """Ctrl-C while tokens stream: what was generated stays on screen, the exit code says it was cut."""
    proc = subprocess.Popen([*EDGEC, "generate", str(tiny_mlx), "--prompt", "hi", "--max-tokens", "100000",
                             "--show-analysis"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ctrl_c_on)
    os.set_blocking(proc.stdout.fileno(), False)
    deadline, got = time.monotonic() + 120, b""
    while not got and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        got = proc.stdout.read(64) or b""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert got and proc.returncode == 130, err
    assert "stop=interrupted" in err.decode() and "Traceback" not in err.decode()


def test_130_ctrl_c_while_the_cli_loads():
    """A KeyboardInterrupt inside the imports of `edgec`: one line, 130 (it was a traceback)."""
    code = ("import sys\n"
            "class Boom:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'rich':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Boom())\n"
            "from edgec.__main__ import run\n"
            "sys.argv = ['edgec', '--help']\n"
            "run()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (130, "interrupted\n")
    assert entry_points(group="console_scripts")["edgec"].value == "edgec.__main__:run"
