"""MLX target benchmark: edgec vs mlx-lm, each measured in its own subprocess in the same run.

Conversion: wall time and peak RSS (/usr/bin/time -v) of `edgec convert -t mlx` and `python -m mlx_lm convert`.
Runtime: prefill tok/s, time to first token, decode tok/s (greedy) and peak RSS of edgec's MLX runtime and of
mlx-lm's own generation loop (`mlx_lm.generate.generate_step`, what `mlx_lm generate` runs) on the same folder.

    .venv/bin/python bench/bench_mlx.py [--src /tmp/s20] [--prompt 128] [--tokens 16] [--json out.json]

The source defaults to a 2-layer slice of the 20b shape (`edgec synth /tmp/s20 --preset 20b --layers 2`), made
if missing. The machine may be shared: figures are wall-clock and include other jobs' contention.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
EDGEC = str(Path(PY).with_name("edgec"))

RUNTIME = r"""
import json, resource, sys, time
import numpy as np
kind, folder, prompt, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=prompt)]
t0 = time.perf_counter()
if kind == "edgec":
    from edgec.runtime.base import load_backend
    b = load_backend(folder)
    t1 = time.perf_counter()
    nxt = int(b.forward(ids)[0].argmax())
    t2 = time.perf_counter()
    out = [nxt]
    for _ in range(tokens - 1):
        nxt = int(b.forward([nxt])[0].argmax())
        out.append(nxt)
    t3 = time.perf_counter()
else:
    import mlx.core as mx
    from pathlib import Path
    from mlx_lm.utils import load_model
    from mlx_lm.generate import generate_step
    model = load_model(Path(folder))[0]
    t1 = time.perf_counter()
    gen = generate_step(mx.array(ids), model, max_tokens=tokens)
    out = [int(next(gen)[0])]
    t2 = time.perf_counter()
    out += [int(t) for t, _ in gen]
    t3 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": t1 - t0, "ttft_s": t2 - t1, "prefill_tok_s": prompt / (t2 - t1),
                  "decode_tok_s": (len(out) - 1) / (t3 - t2), "peak_rss_bytes": rss, "tokens": out}))
"""


def warm(src: Path) -> None:
    """Read the source once so each tool starts from the page cache: this VM pages out idle file pages, and the
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


def runtime(kind: str, folder: Path, prompt: int, tokens: int) -> dict:
    r = subprocess.run([PY, "-c", RUNTIME, kind, str(folder), str(prompt), str(tokens)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} runtime failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/tmp/s20"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder beside --src)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--skip-mlx-lm-convert", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not a.src.exists():
        subprocess.run([EDGEC, "synth", str(a.src), "--preset", "20b", "--layers", "2"], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-mlx-", dir=a.work or a.src.parent))
    res: dict = {"src": str(a.src), "src_bytes": sum(p.stat().st_size for p in a.src.glob("*.safetensors"))}
    try:
        ours, theirs = work / "edgec", work / "mlx_lm"
        warm(a.src)
        res["convert_edgec"] = timed([EDGEC, "convert", str(a.src), "-t", "mlx", "-o", str(ours)])
        if not a.skip_mlx_lm_convert:
            warm(a.src)
            res["convert_mlx_lm"] = timed([PY, "-m", "mlx_lm", "convert", "--hf-path", str(a.src),
                                           "--mlx-path", str(theirs)])
            shutil.rmtree(theirs, ignore_errors=True)
        res["run_edgec"] = runtime("edgec", ours, a.prompt, a.tokens)
        res["run_mlx_lm"] = runtime("mlx_lm", ours, a.prompt, a.tokens)
        res["same_greedy_tokens"] = res["run_edgec"].pop("tokens") == res["run_mlx_lm"].pop("tokens")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    show(res, a.prompt, a.tokens)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


def show(res: dict, prompt: int, tokens: int) -> None:
    from rich.console import Console
    from rich.table import Table

    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    t = Table(title=f"MLX target, {res['src']} ({gb(res['src_bytes'])}); shared machine, wall-clock figures")
    for c in ("measure", "edgec", "mlx-lm", "edgec / mlx-lm"):
        t.add_column(c)
    ce, cm = res["convert_edgec"], res.get("convert_mlx_lm")
    t.add_row("convert wall", f"{ce['wall_s']:.1f} s", f"{cm['wall_s']:.1f} s" if cm else "-",
              f"{ce['wall_s'] / cm['wall_s']:.2f}x" if cm else "-")
    t.add_row("convert peak RSS", gb(ce["peak_rss_bytes"]), gb(cm["peak_rss_bytes"]) if cm else "-",
              f"{ce['peak_rss_bytes'] / cm['peak_rss_bytes']:.2f}x" if cm else "-")
    re_, rm = res["run_edgec"], res["run_mlx_lm"]
    for key, label, fmt in (("prefill_tok_s", f"prefill tok/s ({prompt})", "{:.1f}"),
                            ("ttft_s", "time to first token", "{:.2f} s"),
                            ("decode_tok_s", f"decode tok/s ({tokens})", "{:.2f}"),
                            ("load_s", "load", "{:.2f} s")):
        t.add_row(label, fmt.format(re_[key]), fmt.format(rm[key]), f"{re_[key] / rm[key]:.2f}x")
    t.add_row("runtime peak RSS", gb(re_["peak_rss_bytes"]), gb(rm["peak_rss_bytes"]),
              f"{re_['peak_rss_bytes'] / rm['peak_rss_bytes']:.2f}x")
    Console().print(t)
    print(f"same greedy tokens: {res['same_greedy_tokens']}")


if __name__ == "__main__":
    main()
