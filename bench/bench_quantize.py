"""16-bit experts -> MXFP4 at convert time: the quantizer's speed and the streamed convert's peak RSS, 20b shape.

1. In process, on one 20b expert of each kind (gate_up [5760, 2880], down [2880, 2880], Gaussian): edgec's
   quantizer (convert/quantize.py: best of the OCP scale and one up, per block) beside the single-candidate
   ceil(log2(amax/6)) rule (`edgec.mxfp4.encode`, the rule of triton_kernels' downcast used by transformers) and
   the error measurement; values/s, relative error, and the time extrapolated to all 20b experts.
2. In subprocesses (/usr/bin/time -v): `edgec convert -t mlx` of a 16-bit 20b slice (`edgec synth --preset 20b
   --layers N --experts-dtype bf16`) beside the same slice with MXFP4 experts: wall time and peak RSS.

    .venv/bin/python bench/bench_quantize.py [--layers 1] [--workdir /tmp/bq] [--skip-convert] [--json out.json]

The machine may be shared: figures are wall-clock and include other jobs' contention.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PY = sys.executable


def timed(cmd: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x or 0) for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    return {"seconds": h * 3600 + m * 60 + s, "peak_rss_bytes": rss}


def quantizer() -> dict:
    from edgec import mxfp4
    from edgec.convert.quantize import quantize_mxfp4, relative_error
    from edgec.spec import preset

    cfg = preset("20b")
    H, inter, E, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers
    rng = np.random.default_rng(0)
    out = {}
    for kind, shape in (("gate_up_proj", (2 * inter, H)), ("down_proj", (H, inter))):
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        row = {}
        for name, fn in (("edgec", quantize_mxfp4), ("ceil_rule", mxfp4.encode)):
            t0 = time.perf_counter()
            b, s = fn(w)
            dt = time.perf_counter() - t0
            t1 = time.perf_counter()
            err = float(relative_error(w, b, s))
            row[name] = {"seconds": dt, "mvalues_per_s": w.size / dt / 1e6, "relative_error": err,
                         "error_seconds": time.perf_counter() - t1}
        out[kind] = row
    per_layer = {n: E * sum(out[k][n]["seconds"] + out[k][n]["error_seconds"] for k in out)
                 for n in ("edgec", "ceil_rule")}
    out["all_20b_experts_seconds"] = {n: v * L for n, v in per_layer.items()}
    return out


def convert(layers: int, work: Path) -> dict:
    edgec = [PY, "-m", "edgec"]
    res = {}
    for name, extra in (("bf16_source", ["--experts-dtype", "bf16"]), ("mxfp4_source", [])):
        src, dst = work / f"s20-{name}-{layers}", work / f"m20-{name}-{layers}"
        if not (src / "config.json").exists():
            subprocess.run([*edgec, "synth", str(src), "--preset", "20b", "--layers", str(layers), *extra],
                           check=True, capture_output=True)
        shutil.rmtree(dst, ignore_errors=True)
        res[name] = timed([*edgec, "convert", str(src), "-t", "mlx", "-o", str(dst), "--json"])
        res[name]["source_bytes"] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        shutil.rmtree(dst, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bq"))
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    q = quantizer()
    print("quantizer, one 20b expert (Gaussian), edgec vs the single-candidate ceil rule:")
    for kind in ("gate_up_proj", "down_proj"):
        e, c = q[kind]["edgec"], q[kind]["ceil_rule"]
        print(f"  {kind:13s} edgec {e['mvalues_per_s']:6.1f} Mvalues/s rel.err {e['relative_error']:.4%} | ceil rule "
              f"{c['mvalues_per_s']:6.1f} Mvalues/s rel.err {c['relative_error']:.4%} | speed ratio "
              f"{e['mvalues_per_s'] / c['mvalues_per_s']:.2f}x, "
              f"error ratio {e['relative_error'] / c['relative_error']:.3f}"
              f" | error measurement {e['error_seconds']:.2f}s")
    t = q["all_20b_experts_seconds"]
    print(f"  all 20b experts (24 layers x 32 x 2, quantize + error): edgec {t['edgec'] / 60:.1f} min, "
          f"ceil rule {t['ceil_rule'] / 60:.1f} min")
    report = {"quantizer": q}
    if not a.skip_convert:
        a.workdir.mkdir(parents=True, exist_ok=True)
        c = convert(a.layers, a.workdir)
        report["convert"] = c
        print(f"edgec convert -t mlx, 20b shape with {a.layers} layer(s):")
        for name, r in c.items():
            print(f"  {name:13s} source {r['source_bytes'] / 2**30:.2f} GiB: {r['seconds']:.1f}s, "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
        print(f"  ratio bf16/mxfp4 source: time {c['bf16_source']['seconds'] / c['mxfp4_source']['seconds']:.2f}x, "
              f"peak RSS {c['bf16_source']['peak_rss_bytes'] / c['mxfp4_source']['peak_rss_bytes']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
