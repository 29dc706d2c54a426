"""Pipeline-parallel generation on loopback: tok/s for 1, 2 and 3 ranks and the bytes sent per token, beside the
tensor-parallel peer (mlx-lm's `sharded_load`, 2 ranks, on the same slice's HF folder: bench/tp_ranks.py).

    PYTHONPATH=$PWD python bench/bench_pipeline.py MLX_FOLDER [--hf HF_FOLDER] [--tokens 32] [--ranks 1 2 3]
Pipeline: one activation crosses each boundary per token (the ring 0 -> 1 -> ... -> 0: R hops, one round trip).
Tensor parallel: an all_sum after attention and after the experts in every layer (2 per layer, each a round trip
between the ranks), counted while decoding."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgec.runtime.pipeline import launch_command

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("--hf", help="the same model's HF folder, for mlx-lm's tensor-parallel sharded_load")
ap.add_argument("--tokens", type=int, default=32)
ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
a = ap.parse_args()
layers = json.loads((Path(a.folder) / "config.json").read_text())["num_hidden_layers"]
with tempfile.TemporaryDirectory() as d:
    def hosts(n: int) -> Path:
        p = Path(d) / f"h{n}.json"
        p.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * n}))
        return p

    for n in a.ranks:
        if n > layers:
            print(f"pipeline, {n} rank(s): skipped: the model has {layers} layers (`edgec synth --layers {n}`)")
            continue
        cmd = [sys.executable, "-m", "edgec", "generate", a.folder, "--prompt", "hi", "--temperature", "0",
               "--max-tokens", str(a.tokens), "--json"]
        if n > 1:
            cmd += ["--hosts", str(hosts(n))]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
        out = json.loads(r.stdout)
        traffic = (out["memory"] or "").splitlines()[-1] if n > 1 else "per token: 0 bytes"
        print(f"pipeline, {n} rank(s): decode {out['stats']['tok_s']:.2f} tok/s; {traffic}; "
              f"{1 if n > 1 else 0} round trip(s) per token")
    if a.hf:
        cmd = launch_command(hosts(2), "ring", [])[:-3] + ["--", str(Path(__file__).with_name("tp_ranks.py")),
                                                            a.hf, str(a.tokens)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        tp = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
        print(f"tensor parallel (mlx-lm sharded_load), 2 ranks: decode {tp['tok_s']:.2f} tok/s; per token: "
              f"{tp['all_sums_per_token']:g} all_sums of {tp['bytes_per_token']:.0f} bytes in all; "
              f"{tp['all_sums_per_token']:g} round trips per token")
