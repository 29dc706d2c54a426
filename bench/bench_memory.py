"""Memory against the plan, and against mlx-lm.

1. Resident memory vs the plan (default, `--slice S`): for each folder (an MLX and an onnx-cpu conversion of S,
   made if missing), RSS in a fresh process before loading (interpreter + the backend's library), after loading and
   after a 1,000-token prompt (less the embedding pages onnxruntime mapped for the tokens seen, reported apart; Linux
   only), beside the backend's own plan (`Backend.plan`, what `edgec inspect` and chat's
   start-up line print) at a 1,024-token context.

       .venv/bin/python bench/bench_memory.py --slice /tmp/s20      # edgec synth /tmp/s20 --preset 20b --layers 2

2. Peak RSS of `edgec generate` against `python -m mlx_lm generate` on the same MLX folder (`--full M`, e.g. the full
   20b shape: `edgec synth S --preset 20b; edgec convert S -t mlx -o M`), each under /usr/bin/time -v, in the same
   run, with edgec's plan for that context; and the plan against the measured peak.

       .venv/bin/python bench/bench_memory.py --full /tmp/m20 --max-context 8192

Needs the memory of the model plus a few GB (the full 20b shape: ~15 GB); run it alone on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PY = sys.executable
EDGEC = str(Path(PY).with_name("edgec"))
GB = 1e9


def resident(folders: list[Path], context: int, tokens: int) -> list[dict]:
    from edgec.bench import measure_memory

    rows = []
    for f in folders:
        r = measure_memory(f, context, tokens)
        base, plan, mapped = r["rss_before_load_bytes"], r["plan"], r["rss_mapped_rows_bytes"] or 0
        rows.append({"folder": str(f), "runtime": plan["runtime"], "base": base, "mapped_rows": mapped,
                     "after_load": r["rss_after_load_bytes"] - base,
                     "after_tokens": r["rss_after_tokens_bytes"] - base - mapped,
                     "peak": r["peak_rss_bytes"] - base, "plan_at_load": plan["at_load_bytes"] + r["kv_at_load_bytes"],
                     "plan": plan["total_bytes"], "plan_held": plan["weights_bytes"] + plan["kv_bytes"],
                     "raw": r})
    return rows


def timed(cmd: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    return {"peak_rss_bytes": rss, "stderr_tail": r.stderr[-600:]}


def full(folder: Path, context: int) -> dict:
    from edgec.memory import plan_folder

    plan = plan_folder(folder, context)
    ours = timed([EDGEC, "generate", str(folder), "--prompt", "hi", "--max-tokens", "2", "--temperature", "0",
                  "--max-context", str(context)])
    theirs = timed([PY, "-m", "mlx_lm", "generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"])
    return {"folder": str(folder), "context": context, "plan": plan.as_dict(), "edgec": ours, "mlx_lm": theirs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice", type=Path, default=None, help="source checkpoint for the resident-memory check")
    ap.add_argument("--full", type=Path, default=None, help="MLX folder for the peak-RSS comparison with mlx-lm")
    ap.add_argument("--max-context", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    res: dict = {}
    if a.slice:
        folders = []
        for target in ("mlx", "onnx-cpu"):
            out = a.slice.with_name(f"{a.slice.name}-{target}")
            if not (out / "edgec.json").is_file():
                subprocess.run([EDGEC, "convert", str(a.slice), "-t", target, "-o", str(out)], check=True)
            folders.append(out)
        res["resident"] = resident(folders, 1024, a.tokens)
        print(f"RSS less the interpreter and library (measured before loading), {a.tokens}-token prompt, "
              f"context 1024; plan = Backend.plan (at load: less the experts onnxruntime pages in as routed to); "
              f"after tokens: less the embedding rows mapped (the plan's `mapped`, shown apart)")
        print(f"{'runtime':8s} {'after load':>11s} {'plan (w+KV)':>12s} {'ratio':>6s} {'after tokens':>13s} "
              f"{'plan':>8s} {'ratio':>6s} {'peak':>8s}")
        for r in res["resident"]:
            print(f"{r['runtime']:8s} {r['after_load'] / GB:9.3f}GB {r['plan_at_load'] / GB:10.3f}GB "
                  f"{r['after_load'] / r['plan_at_load']:6.2f} {r['after_tokens'] / GB:11.3f}GB "
                  f"{r['plan'] / GB:6.3f}GB {r['after_tokens'] / r['plan']:6.2f} {r['peak'] / GB:6.3f}GB  "
                  f"rows mapped {r['mapped_rows'] / GB:.3f}GB")
    if a.full:
        f = res["full"] = full(a.full, a.max_context)
        e, m, p = f["edgec"]["peak_rss_bytes"], f["mlx_lm"]["peak_rss_bytes"], f["plan"]["total_bytes"]
        print(f"{a.full} at --max-context {a.max_context}: edgec generate peak RSS {e / GB:.2f} GB, mlx-lm "
              f"{m / GB:.2f} GB (ratio {e / m:.3f}); edgec's plan {p / GB:.2f} GB (measured / plan {e / p:.3f})")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
