"""Run under mlx.launch by tests/test_pipeline.py: every rank opens the pipeline; rank 0 drives the cache through
a prompt longer than the sliding window (chunked prefill), decode steps, a chat-style rollback (truncate) and
re-prefill, and a reset, and saves every logits array to argv[2] (npz)."""

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from edgec.runtime.pipeline import PipelineBackend, read_hosts


def drive(backend, ids: list[int], cut: int = 300, back: int = 100) -> list[np.ndarray]:
    """The sequence of cache operations chat makes; the same on a single-process backend. `cut` (the first
    prompt's length) must pass the sliding window, `back` (a rollback) must fall before the kept sliding history."""
    out = [backend.forward(ids[:cut], all_logits=False)]
    for t in ids[cut:cut + 4]:
        out.append(backend.forward([t]))
    backend.truncate(cut - 10)  # prompt reuse: the next prompt shares cut - 10 tokens
    out.append(backend.forward(ids[400:420], all_logits=True))
    backend.truncate(back)  # rolled back past the kept sliding history: recomputed
    out.append(backend.forward(ids[500:505]))
    backend.reset()
    out.append(backend.forward(ids[:7], all_logits=True))
    return out


if __name__ == "__main__":
    folder, dest, hosts = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cut, back = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (300, 100)
    b = PipelineBackend(folder, read_hosts(hosts), max_context=1024, compute="float32", kv_dtype="float32")
    b.PREFILL_CHUNK = 64  # several chunks per prompt, the same on the single-process side
    if b.rank != 0:
        if os.environ.get("EDGEC_TEST_DIE") == str(b.rank):  # the fault test: this rank dies before serving
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("EDGEC_TEST_HANG") == str(b.rank):  # alive but silent (an unreachable host)
            time.sleep(40)
        b.serve_stage()
        sys.exit(0)
    ids = [int(v) for v in np.random.default_rng(0).integers(0, b.config.vocab_size, 600)]
    logits = drive(b, ids, cut, back)
    b.close()
    np.savez(dest, *logits, layers=np.array([r["layers"] for r in b.plan_["ranks"]]))
