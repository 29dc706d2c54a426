"""`edgec bench OUT`: prefill and decode speed, time to first token and peak memory of edgec's runtime on a
converted folder, and (for an MLX folder, when mlx-lm is installed) mlx-lm's own generation loop on the same folder
in the same run, each in its own process so their memory figures do not mix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from .errors import EdgecError

# one measurement, run in a fresh interpreter: prints a JSON line
PROBE = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
kind, folder, prompt, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=prompt)]
t0 = time.perf_counter()
if kind == "edgec":
    from edgec.runtime.base import load_backend
    b = load_backend(folder, max_context=prompt + tokens)
    t1 = time.perf_counter()
    nxt = int(b.forward(ids)[0].argmax())
    t2 = time.perf_counter()
    for _ in range(tokens - 1):
        nxt = int(b.forward([nxt])[0].argmax())
else:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    model, _ = load_model(Path(folder))
    t1 = time.perf_counter()
    steps = generate_step(mx.array(ids), model, max_tokens=tokens)
    next(steps)
    t2 = time.perf_counter()
    for _ in steps:
        pass
t3 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"load_s": t1 - t0, "ttft_s": t2 - t1, "prefill_tok_s": prompt / (t2 - t1),
                  "decode_tok_s": (tokens - 1) / (t3 - t2), "peak_rss_bytes": rss}))
"""


def measure(kind: str, folder: Path, prompt: int, tokens: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", PROBE, kind, str(folder), str(prompt), str(tokens)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{kind} failed (exit {r.returncode}): {last}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(folder: Path, prompt: int = 128, tokens: int = 16, peers: bool = True) -> dict[str, Any]:
    from .runtime.base import target_of

    target = target_of(folder)
    if tokens < 2 or prompt < 1:
        raise EdgecError("--prompt must be >= 1 and --tokens >= 2")
    res: dict[str, Any] = {"folder": str(folder), "target": target, "prompt": prompt, "tokens": tokens,
                           "edgec": measure("edgec", folder, prompt, tokens)}
    if "error" in res["edgec"]:
        raise EdgecError(f"{folder}: {res['edgec']['error']}")
    if peers and target == "mlx":
        import importlib.util

        res["mlx_lm"] = (measure("mlx_lm", folder, prompt, tokens) if importlib.util.find_spec("mlx_lm")
                         else {"error": "mlx-lm is not installed"})
    return res


@click.command()
@click.argument("out", type=click.Path(exists=True, path_type=Path))
@click.option("--prompt", type=int, default=128, show_default=True, help="prompt tokens")
@click.option("--tokens", type=int, default=16, show_default=True, help="decoded tokens")
@click.option("--no-peers", is_flag=True, help="skip mlx-lm")
@click.option("--json", "as_json", is_flag=True)
def bench(out: Path, prompt: int, tokens: int, no_peers: bool, as_json: bool) -> None:
    """Prefill/decode tok/s, time to first token and peak memory on OUT (and mlx-lm's on the same folder)."""
    from rich.table import Table

    from .progress import stderr

    res = run_bench(out, prompt, tokens, peers=not no_peers)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    runs = {k: v for k, v in res.items() if k in ("edgec", "mlx_lm")}
    t = Table(title=f"{out} ({res['target']}): prompt {prompt}, decode {tokens}")
    t.add_column("measure")
    for k in runs:
        t.add_column(k.replace("_", "-"), justify="right")
    for key, label, fmt in (("load_s", "load", "{:.2f} s"), ("ttft_s", "time to first token", "{:.2f} s"),
                            ("prefill_tok_s", "prefill tok/s", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.2f}"),
                            ("peak_rss_bytes", "peak RSS", "{:.0f}")):
        cells = []
        for r in runs.values():
            v = r.get(key)
            cells.append(r.get("error", "-") if v is None else
                         (f"{v / 2**20:.0f} MiB" if key == "peak_rss_bytes" else fmt.format(v)))
        t.add_row(label, *cells)
    stderr.print(t)


COMMANDS = [bench]
