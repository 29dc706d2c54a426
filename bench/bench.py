"""`make bench`: one run, same inputs, edgec against the peers; prints side-by-side tables and writes JSON.

    .venv/bin/python bench/bench.py [--work out/bench] [--skip-onnx] [--skip-mlx]

1. Memory per target for the 20b shape at 8k / 32k / 128k against 16 GB: weights as each runtime holds them + its KV
   cache + a step's temporaries, from the one memory model (`edgec.memory.plan_recipe`: the numbers `edgec inspect`
   and chat's start-up plan print), beside the facts file's textbook KV figure.
2. Memory bandwidth (numpy copy) and, for each measured decode speed, the ratio to the bandwidth bound
   (bytes of weights read per token / copy bandwidth).
3. `bench_mlx.py` (edgec convert/runtime vs `mlx_lm convert` / mlx-lm generation) and `bench_onnx.py` (edgec
   onnx-cpu vs the onnxruntime-genai builder, decode under onnxruntime-genai) on a 2-layer slice of the 20b shape.
Peers that fail are reported as failed, never hidden. Figures are wall-clock on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PY = sys.executable
GIB = 2**30


def memory_table(model: str = "20b", contexts: tuple[int, ...] = (8192, 32768, 131072)) -> list[dict]:
    """GiB per target (default recipe, its runtime's defaults on the target's device) and context: weights + KV +
    per-step temporaries, and whether the total fits 16 GB."""
    from edgec.memory import facts_kv_bytes, plan_recipe
    from edgec.spec import hf_tensors, preset
    from edgec.targets import list_targets, load_profile

    cfg = preset(model)
    rows = [{"target": "textbook (bf16 weights as published, bf16 KV, sliding = window)", "context": c,
             "weights": sum(t.nbytes for t in hf_tensors(cfg)) / GIB,
             "kv": facts_kv_bytes(cfg, c) / GIB, "per_step": 0.0} for c in contexts]
    for name in list_targets():
        prof = load_profile(name)
        for c in contexts:
            p = plan_recipe(prof, cfg, c)
            rows.append({"target": f"{name} ({prof['dense']['default']} dense, {prof['experts']['default']} experts, "
                                   f"{p.kv_label} KV)", "context": c, "weights": p.weights / GIB, "kv": p.kv / GIB,
                         "per_step": p.transient / GIB})
    for r in rows:
        r["total"] = r["weights"] + r["kv"] + r["per_step"]
        r["fits_16GB"] = r["total"] * GIB <= 16e9
    return rows


def copy_bandwidth(nbytes: int = 1 << 30, repeat: int = 3) -> float:
    """Bytes/s of a large numpy copy (read + write counted once each, as a decode reads weights once)."""
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def bytes_per_token(cfg, dense_bytes: float) -> float:
    """Weights a decode step reads: attention + router + norms (dense), top-k experts (MXFP4, 4.25 bits), lm_head."""
    from edgec.spec import hf_tensors

    dense = expert = 0.0
    for t in hf_tensors(cfg):
        if t.kind == "embed":
            continue  # one row gathered
        n = t.params
        if t.kind.startswith("expert"):
            expert += (t.nbytes if t.kind != "expert_bias" else n * 2) * cfg.num_experts_per_tok / cfg.num_local_experts
        else:
            dense += n * dense_bytes
    return dense + expert


def run_json(cmd: list[str], log: Path) -> dict | None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(f"  failed (exit {r.returncode}); log: {log}")
        return None
    return {"rc": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench"))
    ap.add_argument("--skip-mlx", action="store_true")
    ap.add_argument("--skip-onnx", action="store_true")
    a = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from edgec.spec import preset

    con = Console(width=160)
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.work / "s20-2layers"
    if not (src / "config.json").is_file():
        subprocess.run([PY, "-m", "edgec", "synth", str(src), "--preset", "20b", "--layers", "2"], check=True)
    res: dict = {"memory_20b_gib": memory_table(), "copy_bandwidth_gb_s": copy_bandwidth() / 1e9}

    t = Table(title="gpt-oss-20b: weights + KV + per-step temporaries (GiB) per target, against 16 GB")
    for c in ("target", "context", "weights", "KV", "per step", "total", "fits 16 GB"):
        t.add_column(c, justify="left" if c == "target" else "right")
    for row in res["memory_20b_gib"]:
        t.add_row(row["target"], str(row["context"]), f"{row['weights']:.2f}", f"{row['kv']:.2f}",
                  f"{row['per_step']:.2f}", f"{row['total']:.2f}", "yes" if row["fits_16GB"] else "no")
    con.print(t)

    if not a.skip_mlx:
        out = a.work / "mlx.json"
        if run_json([PY, str(HERE / "bench_mlx.py"), "--src", str(src), "--rounds", "1", "--json", str(out)],
                    a.work / "mlx.log"):
            res["mlx"] = json.loads(out.read_text())
            print((a.work / "mlx.log").read_text())
        else:
            res["mlx"] = "failed"
    if not a.skip_onnx:
        out = a.work / "onnx.json"
        if run_json([PY, str(HERE / "bench_onnx.py"), "--src", str(src), "--work", str(a.work / "onnx"), "--json",
                     str(out)], a.work / "onnx.log"):
            res["onnx"] = json.loads(out.read_text())
            print((a.work / "onnx.log").read_text())
        else:
            res["onnx"] = "failed"

    cfg = preset("20b", num_hidden_layers=2)
    bw = res["copy_bandwidth_gb_s"] * 1e9
    t = Table(title=f"decode vs memory-bandwidth bound (2-layer 20b slice, copy bandwidth {bw / 1e9:.1f} GB/s)")
    for c in ("runtime", "weights read / token", "bound tok/s", "measured tok/s", "fraction of bound"):
        t.add_column(c, justify="right" if c != "runtime" else "left")
    measured = []
    if isinstance(res.get("mlx"), dict):
        med = res["mlx"]["median"]
        measured += [(f"{k} (bf16 weights read)" if k != "edgec float32-upcast" else f"{k} (fp32 dense read)",
                      4 if k == "edgec float32-upcast" else 2, v["decode_tok_s"]) for k, v in med.items()]
    if isinstance(res.get("onnx"), dict):
        for name, r in res["onnx"].items():
            tps = r.get("genai_decode_tok_s")
            if tps:
                dense = 0.5 if "int4 dense" in name or "builder" in name else 4
                measured.append((f"{name} (onnxruntime-genai)", dense, tps))
    res["bandwidth_ratio"] = []
    for name, dense_bytes, tps in measured:
        bpt = bytes_per_token(cfg, dense_bytes)
        bound = bw / bpt
        res["bandwidth_ratio"].append({"runtime": name, "bytes_per_token": bpt, "bound_tok_s": bound,
                                       "tok_s": tps, "fraction": tps / bound})
        t.add_row(name, f"{bpt / 1e9:.2f} GB", f"{bound:.2f}", f"{tps:.2f}", f"{tps / bound:.0%}")
    con.print(t)
    (a.work / "bench.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    con.print(f"wrote {a.work / 'bench.json'}")


if __name__ == "__main__":
    main()
