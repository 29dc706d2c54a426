"""`make demo`: the whole edgec story on the embedded default model, printing every command it runs.

Synthesizes the tiny gpt-oss checkpoint, converts it to MLX and onnx-cpu, proves parity of both against the
source, and holds a two-turn chat on each. Every step is a real `edgec` command, run as a user would.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

console = Console()
EDGEC = [sys.executable, "-m", "edgec"]


def step(title: str, args: list[str], stdin: str | None = None) -> None:
    console.print(Rule(f"[bold]{title}"))
    console.print(f"[cyan]$ edgec {' '.join(shlex.quote(a) for a in args)}[/]"
                  + (f"   [dim](stdin: {stdin!r})[/]" if stdin else ""))
    t0 = time.perf_counter()
    r = subprocess.run(EDGEC + args, input=stdin, text=True)
    console.print(f"[dim]exit {r.returncode} in {time.perf_counter() - t0:.1f}s[/]")
    if r.returncode != 0:
        console.print(f"[bold red]demo step failed: {title}[/]")
        sys.exit(r.returncode)


def main(root: Path = Path("out/demo")) -> None:
    src = root / "gpt-oss-tiny"
    step("1. synthesize the embedded default model (real gpt-oss layout, tiny shape)",
         ["synth", str(src), "--preset", "tiny", "--force"])
    step("2. inspect it", ["inspect", str(src), "--context", "131072"])
    targets = ["onnx-cpu"]
    if importlib.util.find_spec("mlx") is not None:
        targets.insert(0, "mlx")
    else:
        console.print("[yellow]mlx is not installed here: skipping the MLX target (pip install 'edgec[mlx]')[/]")
    chat = "Hello! Who are you?\nAnd what is 2 + 2?\n/exit\n"
    for t in targets:
        out = root / t
        step(f"3. convert for {t}", ["convert", str(src), "--target", t, "-o", str(out), "--force"])
        step(f"4. parity of {t} against the source", ["parity", str(src), str(out), "--junit", str(root / f"{t}.xml")])
        step(f"5. a two-turn chat on {t} (random weights: expect gibberish, but real Harmony and prompt reuse)",
             ["chat", str(out), "--max-tokens", "24", "--temperature", "0", "--stats", "--show-analysis"], stdin=chat)
    console.print(Rule("[bold green]demo complete"))
    console.print(f"outputs in {root}/ (source, converted folders, JUnit parity reports)")


if __name__ == "__main__":
    main()
