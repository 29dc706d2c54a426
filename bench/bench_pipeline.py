"""Pipeline-parallel generation on loopback: tok/s for 1, 2 and 3 ranks and the bytes sent per token.

    PYTHONPATH=$PWD python bench/bench_pipeline.py MLX_FOLDER [--tokens 32]
(Tensor-parallel peer figure not measured yet.)"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("--tokens", type=int, default=32)
a = ap.parse_args()
with tempfile.TemporaryDirectory() as d:
    for n in (1, 2, 3):
        cmd = [sys.executable, "-m", "edgec", "generate", a.folder, "--prompt", "hi", "--temperature", "0",
               "--max-tokens", str(a.tokens), "--json"]
        if n > 1:
            hosts = Path(d) / f"h{n}.json"
            hosts.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * n}))
            cmd += ["--hosts", str(hosts)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
        out = json.loads(r.stdout)
        traffic = (out["memory"] or "").splitlines()[-1] if n > 1 else "per token: 0 bytes"
        print(f"{n} rank(s): decode {out['stats']['tok_s']:.1f} tok/s; {traffic}")
