"""ONNX targets benchmark: conversion wall time / peak RSS and decode tokens/s, edgec vs the onnxruntime-genai builder.

    .venv/bin/python bench/bench_onnx.py [--src /tmp/s20o] [--work /tmp/bench_onnx] [--no-builder]

With --no-builder, an earlier builder output in WORK/b_int4 is still decoded in the same run.

The source defaults to a 2-layer slice of the gpt-oss-20b shape (`edgec synth /tmp/s20o --preset 20b --layers 2`).
Every conversion runs in its own subprocess; its peak RSS comes from wait4(). The builder needs torch and
transformers (test-time peers here, never edgec dependencies) and a tokenizer.json: when the source has none, a
one-word tokenizer is written beside it so the builder can run (it does not affect the weights).
Decode: greedy, 64-token random prompt then 64 new tokens, under onnxruntime-genai, plus edgec's own loop.
Numbers depend on the machine's load: other jobs may share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PY = sys.executable


def run_measured(cmd: list[str], log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    return {"cmd": " ".join(cmd), "rc": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
            "peak_rss_mib": round(ru.ru_maxrss / 1024), "log": str(log)}


def ensure_tokenizer(src: Path) -> None:
    if (src / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(src))


def decode_genai(folder: Path, prompt: list[int], new: int) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    gen.generate_next_token()
    t0 = time.perf_counter()
    for _ in range(new - 1):
        gen.generate_next_token()
    return (new - 1) / (time.perf_counter() - t0)


def decode_edgec(folder: Path, prompt: list[int], new: int) -> float:
    from edgec.runtime.base import load_backend

    be = load_backend(folder)
    nxt = int(be.forward(prompt)[0].argmax())
    t0 = time.perf_counter()
    for _ in range(new - 1):
        nxt = int(be.forward([nxt])[0].argmax())
    return (new - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=Path("/tmp/s20o"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_onnx"))
    ap.add_argument("--no-builder", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if not (a.src / "config.json").is_file():
        subprocess.run([PY, "-m", "edgec", "synth", str(a.src), "--preset", "20b", "--layers", "2"], check=True)
    edgec = [PY, "-m", "edgec", "convert", str(a.src), "--target", "onnx-cpu", "--force"]
    jobs = {
        "edgec exact (fp32 dense)": (edgec + ["-o", str(a.work / "e_exact")], a.work / "e_exact"),
        "edgec --experts int4 (int8 attn, int4 lm_head)": (edgec + ["--experts", "int4", "-o",
                                                                   str(a.work / "e_int4")], a.work / "e_int4"),
        "edgec int4 experts, int8 dense": (edgec + ["--experts", "int4", "--dense", "int8", "-o",
                                                    str(a.work / "e_int4i8")], a.work / "e_int4i8"),
        "edgec int4 experts, int4 dense": (edgec + ["--experts", "int4", "--dense", "int4", "-o",
                                                    str(a.work / "e_int4d")], a.work / "e_int4d"),
        "edgec int4 experts, fp32 dense": (edgec + ["--experts", "int4", "--dense", "fp32", "-o",
                                                    str(a.work / "e_int4f")], a.work / "e_int4f"),
    }
    if not a.no_builder:
        ensure_tokenizer(a.src)
        shutil.rmtree(a.work / "b_int4", ignore_errors=True)
        jobs["builder -p int4 -e cpu"] = ([PY, "-m", "onnxruntime_genai.models.builder", "-i", str(a.src), "-o",
                                           str(a.work / "b_int4"), "-p", "int4", "-e", "cpu", "-c",
                                           str(a.work / "cache")], a.work / "b_int4")
    results = {}
    reuse = {}
    if a.no_builder and (a.work / "b_int4" / "genai_config.json").is_file():  # decode-only comparison
        reuse["builder -p int4 -e cpu (earlier output)"] = ([], a.work / "b_int4")
        results.update({k: {"rc": 0} for k in reuse})
    for name, (cmd, out) in jobs.items():
        r = run_measured(cmd, a.work / (out.name + ".log"))
        r["output_gib"] = round(sum(p.stat().st_size for p in out.iterdir()) / 2**30, 2) if out.is_dir() else None
        results[name] = r
        print(f"convert  {name:46s} rc={r['rc']} wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mib']:6d} MiB  "
              f"output {r['output_gib']} GiB", flush=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=64)]
    for name, (_, out) in {**jobs, **reuse}.items():
        if results[name]["rc"] != 0 or name.startswith("edgec exact"):
            continue
        tps = decode_genai(out, prompt, a.new_tokens)
        results[name]["genai_decode_tok_s"] = round(tps, 2)
        print(f"decode   {name:46s} onnxruntime-genai {tps:7.2f} tok/s", flush=True)
        if name.startswith("edgec"):
            tps = decode_edgec(out, prompt, a.new_tokens)
            results[name]["edgec_runtime_decode_tok_s"] = round(tps, 2)
            print(f"decode   {name:46s} edgec OnnxBackend {tps:7.2f} tok/s", flush=True)
    print(json.dumps(results, indent=2))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
