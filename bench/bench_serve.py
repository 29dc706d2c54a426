"""`edgec serve` under load, beside mlx_lm.server on the same MLX folder, in the same run.

    .venv/bin/python bench/bench_serve.py [--clients 4] [--requests 4] [--max-tokens 64] [--work /tmp/serve-bench]
                                          [--only edgec|mlx_lm] [FOLDER ...]

Without FOLDERs it synthesizes the tiny preset and a 2-layer slice of the 20b shape (`edgec synth --preset 20b
--layers 2`) and converts both with `edgec convert -t mlx`. Each server runs alone: started, warmed up with one
request, then N clients at once each send M streamed chat completions (distinct prompts, greedy, `max_tokens`,
`stream_options.include_usage`), then stopped. Reported per server: requests ok and lost, p50/p95 latency, p50/p95
time to first token, aggregate tok/s (completion tokens / wall time) and the p50 of each request's decode tok/s.
mlx_lm.server gets a chat template that renders the same Harmony system message as edgec, so both prefill the same
prompt. Numbers are printed (and written to WORK/bench_serve.json), never asserted.

Time to first token: mlx_lm.server streams every token as text; edgec streams Harmony message text, and random
weights never write a message header, so its parser holds their tokens (up to 64) before it can tell text from
markup. edgec's TTFT is therefore taken as the request's wall time less the decode time the server reports
(`timings.decode_s`): the time until the first token was sampled, as seen by the client. Decode tok/s per request is
(completion tokens - 1) / (wall time - TTFT) for both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

EDGEC = [sys.executable, "-m", "edgec"]
# the Harmony prompt edgec renders (system message with today's date and medium effort, then the turns)
TEMPLATE = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: "
            "2024-06\nCurrent date: " + datetime.date.today().isoformat() + "\n\nReasoning: medium\n\n# Valid "
            "channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
            "{%- for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endfor %}"
            "<|start|>assistant")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path) -> list[Path]:
    out = []
    for name, args in (("tiny", ["--preset", "tiny"]), ("s20", ["--preset", "20b", "--layers", "2"])):
        src, mlx = work / name, work / f"{name}-mlx"
        if not (mlx / "edgec.json").is_file():
            subprocess.run([*EDGEC, "synth", str(src), *args, "--force"], check=True)
            subprocess.run([*EDGEC, "convert", str(src), "-t", "mlx", "-o", str(mlx)], check=True)
        out.append(mlx)
    return out


def start(kind: str, folder: Path, port: int) -> subprocess.Popen:
    if kind == "edgec":
        cmd = [*EDGEC, "serve", str(folder), "--port", str(port), "--temperature", "0", "--max-context", "8192",
               "--max-queue", "256"]
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port), "--temp", "0",
               "--chat-template", TEMPLATE, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while time.time() - t < 600:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"{kind} did not start")


def one(url: str, model: str, text: str, max_tokens: int) -> dict:
    """One streamed chat completion: latency, time to first token, completion tokens (from usage)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, usage, chunks, timings = None, None, 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            usage = c.get("usage") or usage
            timings = c.get("timings") or timings
            for ch in c.get("choices") or []:
                d = ch.get("delta") or {}
                if d.get("content") or d.get("reasoning_content") or d.get("reasoning") or d.get("tool_calls"):
                    chunks += 1
                    first = first or time.perf_counter()
    t1 = time.perf_counter()
    n = usage["completion_tokens"] if usage else chunks
    ttft = (first or t1) - t0
    if timings:  # edgec: the first token's time as the server saw it (see the module docstring)
        ttft = t1 - t0 - timings["decode_s"]
    return {"latency": t1 - t0, "ttft": ttft, "tokens": n, "prompt": usage["prompt_tokens"] if usage else None,
            "decode_tok_s": (n - 1) / (t1 - t0 - ttft) if n > 1 and t1 - t0 > ttft else 0.0}


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results, lost = [], []
    gate = threading.Barrier(clients)

    def client(i: int) -> None:
        gate.wait()
        for j in range(requests):
            try:
                results.append(one(url, model, f"Client {i}, request {j}: tell me a long story about the sea.",
                                   max_tokens))
            except Exception as e:
                lost.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([r["latency"] for r in results]) if results else np.zeros(1)
    ttft = np.array([r["ttft"] for r in results]) if results else np.zeros(1)
    toks = sum(r["tokens"] for r in results)
    return {"ok": len(results), "lost": len(lost), "lost_errors": lost[:3], "wall_s": round(wall, 2),
            "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
            "p95_latency_s": round(float(np.percentile(lat, 95)), 3),
            "p50_ttft_s": round(float(np.percentile(ttft, 50)), 3),
            "p95_ttft_s": round(float(np.percentile(ttft, 95)), 3),
            "agg_tok_s": round(toks / wall, 1), "completion_tokens": toks,
            "p50_decode_tok_s": round(float(np.median([r["decode_tok_s"] for r in results])), 1) if results else 0,
            "prompt_tokens": sorted({r["prompt"] for r in results if r["prompt"] is not None})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve-bench"))
    ap.add_argument("--only", choices=["edgec", "mlx_lm"])
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(Path(__file__).resolve().parents[1].parent / "shared/data"))
    folders = a.folders or prepare(a.work)
    report = {"clients": a.clients, "requests": a.requests, "max_tokens": a.max_tokens, "runs": []}
    for folder in folders:
        for kind in [a.only] if a.only else ["edgec", "mlx_lm"]:
            port = free_port()
            proc = start(kind, folder, port)
            url = f"http://127.0.0.1:{port}"
            try:
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"] if kind == "edgec" else str(folder)
                one(url, model, "warm up", 8)
                row = {"model": folder.name, "server": kind, **load(url, model, a.clients, a.requests, a.max_tokens)}
            finally:
                proc.terminate()
                proc.wait(60)
            report["runs"].append(row)
            print(f"{row['model']:>10} {kind:>6}: {row['ok']}/{a.clients * a.requests} ok, {row['lost']} lost, "
                  f"latency p50 {row['p50_latency_s']:.2f} s p95 {row['p95_latency_s']:.2f} s, TTFT p50 "
                  f"{row['p50_ttft_s']:.3f} s p95 {row['p95_ttft_s']:.3f} s, {row['agg_tok_s']:.1f} tok/s aggregate, "
                  f"{row['p50_decode_tok_s']:.1f} tok/s per request (prompt {row['prompt_tokens']})", flush=True)
    (a.work / "bench_serve.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {a.work / 'bench_serve.json'}")


if __name__ == "__main__":
    main()
