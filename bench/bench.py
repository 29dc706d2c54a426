"""`make bench`: one run, same inputs, edgec against the peers; prints side-by-side tables and writes JSON.

    .venv/bin/python bench/bench.py [--work out/bench] [--skip-onnx] [--skip-mlx]

1. KV-cache memory at 4k / 32k / 128k for the 20b and 120b shapes: the arithmetic of the facts file (bf16, 8-bit)
   and what each edgec runtime allocates (from the target profiles, the same numbers `edgec inspect` prints).
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


def kv_table() -> list[dict]:
    """KV GiB per (model, context): the facts-file arithmetic and what edgec's runtimes allocate."""
    from edgec.inspect import kv_bytes, kv_settings
    from edgec.runtime.mlx_backend import kv_cache_bytes as mlx_kv
    from edgec.spec import preset
    from edgec.targets import load_profile

    per, keep, _ = kv_settings(load_profile("onnx-cpu"))
    rows = []
    for name in ("20b", "120b"):
        cfg = preset(name)
        for ctx in (4096, 32768, 131072):
            rows.append({"model": name, "context": ctx,
                         "bf16 (sliding 128)": cfg.kv_cache_bytes(ctx, 2) / GIB,
                         "bf16, every layer full": 2 * cfg.kv_dim * 2 * ctx * cfg.num_hidden_layers / GIB,
                         "edgec mlx fp32 (default)": mlx_kv(cfg, ctx) / GIB,
                         "edgec mlx bf16": mlx_kv(cfg, ctx, kv_dtype="bfloat16") / GIB,
                         "edgec mlx 8-bit full + bf16": mlx_kv(cfg, ctx, kv_bits=8, kv_dtype="bfloat16") / GIB,
                         "edgec onnx-cpu loop (fp32)": kv_bytes(cfg, ctx, per, keep) / GIB})
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
    res: dict = {"kv_gib": kv_table(), "copy_bandwidth_gb_s": copy_bandwidth() / 1e9}

    t = Table(title="KV cache (GiB): facts-file arithmetic vs what edgec's runtimes allocate")
    cols = [k for k in res["kv_gib"][0] if k not in ("model", "context")]
    t.add_column("model")
    t.add_column("context", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    for row in res["kv_gib"]:
        t.add_row(row["model"], str(row["context"]), *[f"{row[c]:.2f}" for c in cols])
    con.print(t)

    if not a.skip_mlx:
        out = a.work / "mlx.json"
        if run_json([PY, str(HERE / "bench_mlx.py"), "--src", str(src), "--json", str(out)], a.work / "mlx.log"):
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
        measured += [("edgec mlx (fp32 dense in memory)", 4, res["mlx"]["run_edgec"]["decode_tok_s"]),
                     ("mlx-lm (bf16)", 2, res["mlx"]["run_mlx_lm"]["decode_tok_s"])]
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
