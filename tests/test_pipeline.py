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

from edgec.runtime.mlx_backend import MlxBackend  # noqa: E402
from edgec.runtime.pipeline import launch_command, split_layers  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from pipeline_ranks import drive  # noqa: E402


def hostfile(tmp: Path, n: int) -> Path:
    p = tmp / f"hosts{n}.json"
    p.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * n}))
    return p


def launch(tmp: Path, folder: Path, n: int, port: int, timeout: float = 240) -> subprocess.CompletedProcess:
    hosts = hostfile(tmp, n)
    cmd = launch_command(hosts, "ring", [])[:-3]  # mlx.launch ... -- ; then the rank script
    cmd += ["--starting-port", str(port), "--", str(HERE / "pipeline_ranks.py"), str(folder),
            str(tmp / f"p{n}.npz"), str(hosts)]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


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
