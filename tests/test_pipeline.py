"""Pipeline-parallel MLX (edgec/runtime/pipeline.py) on loopback ranks started by mlx.launch (ring backend).

Exactness: the logits of 2 and 3 ranks equal the single-process MlxBackend's bit for bit (np.array_equal, no
tolerance): each layer runs the same MLX ops on the same chunks; only the process differs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")  # the MLX extra: installed in CI (mlx[cpu])

from edgec.runtime.mlx_backend import MlxBackend
from edgec.runtime.pipeline import launch_command, split_layers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from pipeline_ranks import drive  # noqa: E402


def hostfile(tmp: Path, n: int) -> Path:
    p = tmp / f"hosts{n}.json"
    p.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * n}))
    return p


def launch(tmp: Path, folder: Path, n: int, port: int, timeout: float = 240, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    hosts = hostfile(tmp, n)
    cmd = launch_command(hosts, "ring", [])[:-3]  # mlx.launch ... -- ; then the rank script
    cmd += ["--starting-port", str(port), "--", str(HERE / "pipeline_ranks.py"), str(folder),
            str(tmp / f"p{n}.npz"), str(hosts)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(HERE.parent), **(env or {})))


def single(folder: Path) -> list[np.ndarray]:
    b = MlxBackend(folder, max_context=1024, compute="float32", kv_dtype="float32")
    b.PREFILL_CHUNK = 64
    ids = [int(v) for v in np.random.default_rng(0).integers(0, b.config.vocab_size, 600)]
    return drive(b, ids)


@pytest.mark.parametrize("ranks,port", [(2, 35100), (3, 35200)])
def test_pipeline_logits_bit_identical(tiny_mlx, tmp_path, ranks, port):
    r = launch(tmp_path, tiny_mlx, ranks, port)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.load(tmp_path / f"p{ranks}.npz")
    layers = got["layers"]
    assert len(layers) == ranks and layers[0][0] == 0 and layers[-1][1] == 3  # every layer placed, in order
    want = single(tiny_mlx)
    assert len(got.files) - 1 == len(want)
    for i, w in enumerate(want):
        assert np.array_equal(got[f"arr_{i}"], w), f"step {i}: logits differ"


def test_split_by_memory():
    # rank 0 holds the 10-byte head: with equal budgets it takes fewer layers
    assert split_layers([10] * 6, 20, [100, 100]) == [range(0, 2), range(2, 6)]
    # a host with twice the budget takes about twice the layers
    assert split_layers([10] * 9, 0, [100, 50]) == [range(0, 6), range(6, 9)]
    with pytest.raises(Exception, match="does not fit"):
        split_layers([60] * 4, 0, [100, 100])


def test_killed_rank_is_one_line_on_rank_0(tiny_mlx, tmp_path):
    """Rank 1 dies (SIGKILL): mlx.launch ends rank 0, which says so in one line instead of hanging."""
    r = launch(tmp_path, tiny_mlx, 2, 35300, timeout=60, env={"EDGEC_TEST_DIE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: rank 0 (127.0.0.1) stopped: another rank of the pipeline exited (mlx.launch's [WARN] "
                     "line names it)"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_silent_rank_times_out_naming_the_host(tiny_mlx, tmp_path):
    """Rank 1 is alive but never answers (sleeps): rank 0's watchdog ends the wait in one line."""
    r = launch(tmp_path, tiny_mlx, 2, 35400, timeout=60, env={"EDGEC_TEST_HANG": "1", "EDGEC_PIPELINE_TIMEOUT": "3"})
    assert "error: rank 1 (127.0.0.1) did not answer within 3 s; is it running and reachable?" in r.stderr, \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_generate_cli_same_tokens(tiny_mlx, tmp_path):
    """`edgec generate --hosts` (re-run under mlx.launch) gives the single process's tokens, greedy."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    args = [sys.executable, "-m", "edgec", "generate", str(tiny_mlx), "--prompt", "hi", "--temperature", "0",
            "--max-tokens", "6", "--json", "--compute", "float32"]
    one = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run(args + ["--hosts", str(hostfile(tmp_path, 2))], capture_output=True, text=True,
                         timeout=120, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 6
    assert "per token: 2 hops" in b["memory"]
