"""`edgec bench OUT` (the command lives in edgec/cli.py): prefill and decode speed, time to first token and memory of
edgec's runtime on a converted folder, and (for an MLX folder, when mlx-lm is installed) mlx-lm's own generation
loop on the same folder in the same run, each in its own process so their memory figures do not mix. edgec's run
also reports its memory plan beside the resident memory measured after loading and after decoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import EdgecError

# one measurement, run in a fresh interpreter: prints a JSON line
PROBE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from edgec.memory import peak_rss_bytes, rss_bytes
kind, folder, prompt, tokens, options = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=prompt)]
base = rss_bytes()
t0 = time.perf_counter()
plan = None
if kind == "edgec":
    from edgec.runtime.base import load_backend
    b = load_backend(folder, max_context=prompt + tokens, **json.loads(options))
    t1 = time.perf_counter()
    loaded = rss_bytes()
    nxt = int(b.forward(ids)[0].argmax())
    t2 = time.perf_counter()
    for _ in range(tokens - 1):
        nxt = int(b.forward([nxt])[0].argmax())
    plan = b.memory_plan().as_dict() if hasattr(b, "memory_plan") else None
else:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    model, _ = load_model(Path(folder))
    mx.eval(model.parameters())
    t1 = time.perf_counter()
    loaded = rss_bytes()
    steps = generate_step(mx.array(ids), model, max_tokens=tokens)
    next(steps)
    t2 = time.perf_counter()
    for _ in steps:
        pass
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "ttft_s": t2 - t1, "prefill_tok_s": prompt / (t2 - t1),
                  "decode_tok_s": (tokens - 1) / (t3 - t2), "peak_rss_bytes": peak_rss_bytes(),
                  "rss_before_load_bytes": base, "rss_after_load_bytes": loaded, "rss_after_decode_bytes": rss_bytes(),
                  "plan": plan}))
"""


def measure(kind: str, folder: Path, prompt: int, tokens: int, options: dict | None = None) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", PROBE, kind, str(folder), str(prompt), str(tokens),
                        json.dumps(options or {})], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{kind} failed (exit {r.returncode}): {last}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(folder: Path, prompt: int = 128, tokens: int = 16, peers: bool = True,
              options: dict | None = None) -> dict[str, Any]:
    from .runtime.base import backend_class

    cls, target = backend_class(folder)
    if tokens < 2 or prompt < 1:
        raise EdgecError("--prompt must be >= 1 and --tokens >= 2")
    opts = cls.check_options(folder, options or {})
    res: dict[str, Any] = {"folder": str(folder), "target": target, "prompt": prompt, "tokens": tokens,
                           "options": opts, "edgec": measure("edgec", folder, prompt, tokens, opts)}
    if "error" in res["edgec"]:
        raise EdgecError(f"{folder}: {res['edgec']['error']}")
    if peers and target == "mlx":
        import importlib.util

        res["mlx_lm"] = (measure("mlx_lm", folder, prompt, tokens) if importlib.util.find_spec("mlx_lm")
                         else {"error": "mlx-lm is not installed"})
    return res


# resident memory against the plan: the backend's library is imported first, so the baseline holds the interpreter
# and libraries and the differences are what the backend holds
MEMORY_PROBE = r"""
import importlib, json, sys
import numpy as np
from edgec.memory import mapped_rss_bytes, peak_rss_bytes, rss_bytes
from edgec.runtime.base import RUNTIMES, load_backend, runtime_of
folder, context, tokens, options = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
cls = RUNTIMES[runtime_of(folder)].split(":")
mod = importlib.import_module(cls[0])
importlib.import_module({"mlx_backend": "mlx.core", "onnx_backend": "onnxruntime"}.get(cls[0].rsplit(".", 1)[1],
                                                                                       "numpy"))
base = rss_bytes()
b = load_backend(folder, max_context=context, **options)
loaded, kv_at_load = rss_bytes(), b.kv_bytes()
ids = [int(t) for t in np.random.default_rng(0).integers(0, b.config.vocab_size, size=tokens)]
b.forward(ids)
after = rss_bytes()
rows = None  # onnxruntime's map of the embedding table (read by rows; the plan's `mapped`), where measurable
if hasattr(b, "embedding_range"):
    rows = mapped_rss_bytes(*b.embedding_range())
print(json.dumps({"rss_before_load_bytes": base, "rss_after_load_bytes": loaded, "rss_after_tokens_bytes": after,
                  "rss_mapped_rows_bytes": rows,
                  "peak_rss_bytes": peak_rss_bytes(), "kv_bytes": b.kv_bytes(), "tokens": tokens,
                  "plan": b.memory_plan(context).as_dict(), "kv_at_load_bytes": kv_at_load}))
"""


def measure_memory(folder: Path, context: int, tokens: int, options: dict | None = None) -> dict[str, Any]:
    """RSS (in a fresh process) before loading, after loading and after `tokens` tokens, with the backend's plan
    at `context` (what it holds with `tokens` <= context tokens cached: full layers grown to context) and the KV
    bytes allocated right after loading."""
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(context), str(tokens),
                        json.dumps(options or {})], capture_output=True, text=True)
    if r.returncode != 0:
        raise EdgecError(f"{folder}: memory probe failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
