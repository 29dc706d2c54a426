"""Decode tokens/s of ONNX folders under onnxruntime-genai (and edgec's own loop), interleaved so each folder sees
the same machine load: round 1 runs every folder once, round 2 again, and so on.

    .venv/bin/python bench/decode_onnx.py FOLDER [FOLDER ...] [--rounds 3] [--new-tokens 64] [--own-loop]

Greedy, a 64-token random prompt, then --new-tokens tokens; prints per-round figures and the median per folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_onnx import decode_edgec, decode_genai


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--own-loop", action="store_true", help="also time edgec's own loop on edgec folders")
    a = ap.parse_args()
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=64)]
    runs: dict[str, list[float]] = {}
    for r in range(a.rounds):
        for f in a.folders:
            jobs = [("genai", decode_genai)]
            if a.own_loop and (f / "edgec.json").is_file():
                jobs.append(("edgec loop", decode_edgec))
            for label, fn in jobs:
                tps = fn(f, prompt, a.new_tokens)
                runs.setdefault(f"{f.name} ({label})", []).append(tps)
                print(f"round {r + 1}  {f.name:12s} {label:10s} {tps:7.2f} tok/s", flush=True)
    for k, v in runs.items():
        print(f"median  {k:28s} {statistics.median(v):7.2f} tok/s  ({', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    main()
