"""MLX target benchmark: edgec vs mlx-lm, each measured in its own subprocess in the same run.

Conversion: wall time and peak RSS (/usr/bin/time -v) of `edgec convert -t mlx` and `python -m mlx_lm convert`.
Runtime: for each of edgec's compute policies (`--compute`, the MLX runtime's precision choices) and for mlx-lm's own
generation loop (`mlx_lm.generate.generate_step`, what `mlx_lm generate` runs) on the same folder: prefill tok/s,
time to first token, decode tok/s (greedy), the weights each holds after loading (MLX's active memory) and peak RSS,
in interleaved rounds (round 1 runs every candidate once, round 2 again, ...; medians reported), so each sees the
same machine load. This is how the CPU default of targets/mlx.toml was chosen: the fastest policy whose held weights
do not exceed the folder's bytes.

    .venv/bin/python bench/bench_mlx.py [--src /tmp/s20] [--prompt 128] [--tokens 16] [--rounds 3]
        [--compute float32,float32-upcast,float16,bfloat16] [--skip-convert] [--json out.json]

The source defaults to a 2-layer slice of the 20b shape (`edgec synth /tmp/s20 --preset 20b --layers 2`), made
if missing. The machine may be shared: figures are wall-clock and include other jobs' contention.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
EDGEC = str(Path(PY).with_name("edgec"))

RUNTIME = r"""
import json, sys, time
import numpy as np
kind, folder, prompt, tokens, compute = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=prompt)]
import mlx.core as mx
from edgec.memory import peak_rss_bytes
t0 = time.perf_counter()
if kind == "edgec":
    from edgec.runtime.base import load_backend
    b = load_backend(folder, max_context=prompt + tokens, compute=compute)
    held = b.held_bytes()
    t1 = time.perf_counter()
    nxt = int(b.forward(ids)[0].argmax())
    t2 = time.perf_counter()
    out = [nxt]
    for _ in range(tokens - 1):
        nxt = int(b.forward([nxt])[0].argmax())
        out.append(nxt)
    t3 = time.perf_counter()
    plan = b.memory_plan().as_dict()
else:
    from pathlib import Path
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model
    from mlx_lm.generate import generate_step
    model = load_model(Path(folder))[0]
    mx.eval(model.parameters())
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    t1 = time.perf_counter()
    gen = generate_step(mx.array(ids), model, max_tokens=tokens)
    out = [int(next(gen)[0])]
    t2 = time.perf_counter()
    out += [int(t) for t, _ in gen]
    t3 = time.perf_counter()
    plan = None
print(json.dumps({"load_s": t1 - t0, "ttft_s": t2 - t1, "prefill_tok_s": prompt / (t2 - t1),
                  "decode_tok_s": (len(out) - 1) / (t3 - t2), "held_weights_bytes": held,
                  "peak_rss_bytes": peak_rss_bytes(), "plan": plan, "tokens": out}))
"""


def warm(src: Path) -> None:
    """Read the files once so each tool starts from the page cache: this VM pages out idle file pages, and the
    tool measured first would otherwise pay the disk reads that the second one then gets for free."""
    for p in src.glob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def timed(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time -v: wall seconds and peak RSS."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return {"wall_s": wall, "peak_rss_bytes": rss}


def runtime(kind: str, folder: Path, prompt: int, tokens: int, compute: str = "-") -> dict:
    r = subprocess.run([PY, "-c", RUNTIME, kind, str(folder), str(prompt), str(tokens), compute],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} {compute} runtime failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/tmp/s20"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder beside --src)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compute", default="float32,float32-upcast,float16,bfloat16",
                    help="edgec compute policies to measure (the first is reported against mlx-lm)")
    ap.add_argument("--skip-convert", action="store_true", help="skip the conversion comparison")
    ap.add_argument("--full", type=Path, default=None,
                    help="also convert the full 20b shape at this path (synthesized there first if missing, ~13 GB): "
                         "its peak RSS is printed beside the slice's figures, so a regression shows")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not a.src.exists():
        subprocess.run([EDGEC, "synth", str(a.src), "--preset", "20b", "--layers", "2"], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-mlx-", dir=a.work or a.src.parent))
    res: dict = {"src": str(a.src), "src_bytes": sum(p.stat().st_size for p in a.src.glob("*.safetensors"))}
    policies = a.compute.split(",")
    try:
        ours, theirs = work / "edgec", work / "mlx_lm"
        warm(a.src)
        res["convert_edgec"] = timed([EDGEC, "convert", str(a.src), "-t", "mlx", "-o", str(ours)])
        res["folder_bytes"] = sum(p.stat().st_size for p in ours.glob("*.safetensors"))
        if not a.skip_convert:
            warm(a.src)
            res["convert_mlx_lm"] = timed([PY, "-m", "mlx_lm", "convert", "--hf-path", str(a.src),
                                           "--mlx-path", str(theirs)])
            shutil.rmtree(theirs, ignore_errors=True)
        if a.full:
            if not a.full.exists():
                subprocess.run([EDGEC, "synth", str(a.full), "--preset", "20b"], check=True)
            warm(a.full)
            res["full_src"], res["full_src_bytes"] = str(a.full), sum(p.stat().st_size
                                                                     for p in a.full.glob("*.safetensors"))
            res["convert_edgec_full"] = timed([EDGEC, "convert", str(a.full), "-t", "mlx", "-o", str(work / "full")])
            shutil.rmtree(work / "full", ignore_errors=True)
        rounds: dict[str, list[dict]] = {}
        for _ in range(a.rounds):
            warm(ours)
            for c in policies:
                rounds.setdefault(f"edgec {c}", []).append(runtime("edgec", ours, a.prompt, a.tokens, c))
            rounds.setdefault("mlx-lm", []).append(runtime("mlx_lm", ours, a.prompt, a.tokens))
        res["runs"] = rounds
        res["median"] = {k: {m: statistics.median(r[m] for r in v) for m in
                             ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
                              "held_weights_bytes")} for k, v in rounds.items()}
        first = rounds[f"edgec {policies[0]}"][0]
        res["same_greedy_tokens"] = first["tokens"] == rounds["mlx-lm"][0]["tokens"]
        res["plan"] = {c: rounds[f"edgec {c}"][0]["plan"] for c in policies}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    show(res, a.prompt, a.tokens, policies[0])
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


def show(res: dict, prompt: int, tokens: int, default: str) -> None:
    from rich.console import Console
    from rich.table import Table

    gb = lambda b: f"{b / 1e9:.2f} GB"
    con = Console(width=160)
    if "convert_mlx_lm" in res:
        t = Table(title=f"MLX conversion, {res['src']} ({gb(res['src_bytes'])})")
        for c in ("measure", "edgec", "mlx-lm", "edgec / mlx-lm"):
            t.add_column(c)
        ce, cm = res["convert_edgec"], res["convert_mlx_lm"]
        t.add_row("wall", f"{ce['wall_s']:.1f} s", f"{cm['wall_s']:.1f} s", f"{ce['wall_s'] / cm['wall_s']:.2f}x")
        t.add_row("peak RSS", gb(ce["peak_rss_bytes"]), gb(cm["peak_rss_bytes"]),
                  f"{ce['peak_rss_bytes'] / cm['peak_rss_bytes']:.2f}x")
        if full := res.get("convert_edgec_full"):  # edgec on the whole 20b shape beside mlx-lm's slice figure
            t.add_row(f"full 20b shape ({gb(res['full_src_bytes'])}): wall", f"{full['wall_s']:.1f} s", "", "")
            t.add_row("full 20b shape: peak RSS", gb(full["peak_rss_bytes"]), f"(slice) {gb(cm['peak_rss_bytes'])}",
                      f"{full['peak_rss_bytes'] / cm['peak_rss_bytes']:.2f}x")
        con.print(t)
    med = res["median"]
    peer = med["mlx-lm"]
    t = Table(title=f"MLX runtime on the CPU, prompt {prompt}, decode {tokens}; medians of "
                    f"{len(res['runs']['mlx-lm'])} interleaved rounds; folder {gb(res['folder_bytes'])} of weights")
    for c in ("runtime", "held weights", "vs folder", "peak RSS", "prefill tok/s", "decode tok/s",
              "decode vs mlx-lm", "load"):
        t.add_column(c, justify="left" if c == "runtime" else "right")
    for k, m in med.items():
        label = k + (" (default)" if k == f"edgec {default}" else "")
        t.add_row(label, gb(m["held_weights_bytes"]), f"{m['held_weights_bytes'] / res['folder_bytes']:.2f}x",
                  gb(m["peak_rss_bytes"]), f"{m['prefill_tok_s']:.1f}", f"{m['decode_tok_s']:.2f}",
                  f"{m['decode_tok_s'] / peer['decode_tok_s']:.2f}x", f"{m['load_s']:.1f} s")
    con.print(t)
    print(f"same greedy tokens (edgec {default} vs mlx-lm): {res['same_greedy_tokens']}")


if __name__ == "__main__":
    main()
