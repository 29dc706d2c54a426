"""Structured outputs: decode tok/s with a JSON-schema constraint against unconstrained, same prompt, same run.

    .venv/bin/python bench/bench_constrain.py OUT [OUT ...] [--tokens 128] [--rounds 3] [--json out.json]

For each output folder (mlx, onnx-cpu, ...): the one generation loop (edgec/runtime/generate.py) decodes --tokens
tokens at temperature 1 (seeded) unconstrained and then under a JSON schema (an array of --tokens bounded integers,
so the document cannot close before the count), in interleaved rounds (ABBA order); medians are reported with the ratio
constrained / unconstrained (goal >= 0.9x). The mask of step t+1 is computed while the backend runs step t; the
mask's own cost (llguidance, serially, per token) is printed too. For an MLX folder, mlx-lm's own unconstrained decode
on the same folder (bench/bench_mlx.py's runner, greedy) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def measure(folder: Path, tokens: int, rounds: int) -> dict:
    from edgec.harmony.render import render_conversation
    from edgec.harmony.tokenizer import Tokenizer
    from edgec.runtime.base import load_backend, target_of
    from edgec.runtime.constrain import Constraint
    from edgec.runtime.generate import Generator, Sampling

    tok = Tokenizer.from_folder(folder)
    prompt = render_conversation([{"role": "user", "content": "List numbers as a JSON array."}], tok)
    gen = Generator(load_backend(folder, max_context=len(prompt) + 4 * tokens + 64), stop_tokens=())
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
              "minItems": tokens, "maxItems": tokens}
    constraint = Constraint(final={"json_schema": schema}, think_tokens=0)
    sampling = Sampling(temperature=1.0, seed=0, max_tokens=tokens)
    free, held, mask_ms = [], [], []
    gen.generate(prompt, sampling)  # warm-up
    for i in range(rounds):
        for guarded in (False, True) if i % 2 == 0 else (True, False):  # ABBA: neither always runs first
            r = gen.generate(prompt, sampling, guard=constraint.compile(tok) if guarded else None)
            assert r.stats.decode == tokens, r.stats
            (held if guarded else free).append(r.stats.tok_s)
            if guarded:
                ids = r.tokens
        g = constraint.compile(tok)  # the mask's own cost, on this thread, along the same tokens
        t0 = time.perf_counter()
        for t in ids:
            g.mask()
            g.consume(t)
        mask_ms.append((time.perf_counter() - t0) / len(ids) * 1e3)
    out = {"folder": str(folder), "target": target_of(folder), "backend": gen.backend.name, "tokens": tokens,
           "unconstrained_tok_s": statistics.median(free), "constrained_tok_s": statistics.median(held),
           "mask_ms_per_token": statistics.median(mask_ms)}
    out["ratio"] = out["constrained_tok_s"] / out["unconstrained_tok_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="+", help="edgec output folders")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    results = []
    for folder in a.out:
        r = measure(folder, a.tokens, a.rounds)
        if r["target"] == "mlx":
            from bench_mlx import runtime

            r["mlx_lm_tok_s"] = statistics.median(runtime("mlx_lm", folder, 64, a.tokens)["decode_tok_s"]
                                                  for _ in range(a.rounds))
        peer = f"  mlx-lm unconstrained {r['mlx_lm_tok_s']:.1f} tok/s" if "mlx_lm_tok_s" in r else ""
        print(f"{r['target']:>9} ({r['backend']}): unconstrained {r['unconstrained_tok_s']:.1f} tok/s, JSON schema "
              f"{r['constrained_tok_s']:.1f} tok/s, ratio {r['ratio']:.2f}x (goal >= 0.9x); mask "
              f"{r['mask_ms_per_token']:.3f} ms/token{peer}")
        results.append(r)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
