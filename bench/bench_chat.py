"""Chat-loop figures: KV bytes at 128k, second-turn prefill with prompt reuse vs a full re-prefill, decode tok/s.

    .venv/bin/python bench/bench_chat.py [--preset small] [--layers N] [--contexts 1024,16384] [--work DIR]

Synthesizes a checkpoint (default: the `small` preset, real vocabulary), converts it to MLX, and measures edgec's
MLX runtime through the one generation loop (`edgec.runtime.generate.Generator`); mlx-lm runs the same HF checkpoint
in the same run as the peer (decode tok/s at the same contexts). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

GIB = 2**30


def kv_figures() -> dict:
    """KV GiB at 128k: the textbook figure and what edgec's runtimes allocate (their own plans)."""
    from edgec.memory import facts_kv_bytes, recipe_weights
    from edgec.runtime.mlx_backend import MlxBackend
    from edgec.runtime.onnx_backend import OnnxBackend
    from edgec.spec import preset

    out = {}
    for name in ("20b", "120b"):
        cfg = preset(name)
        w = recipe_weights(cfg, "bf16", "mxfp4")
        mlx = lambda cfg=cfg, w=w, **kw: MlxBackend.plan(cfg, 131072, w, **kw).kv / GIB
        out[name] = {"bf16_textbook_GiB": facts_kv_bytes(cfg, 131072) / GIB, "mlx_fp16_GiB": mlx(kv_dtype="float16"),
                     "mlx_kv8_GiB": mlx(kv_bits=8, kv_dtype="float16"), "mlx_fp32_GiB": mlx(kv_dtype="float32"),
                     "onnx_cpu_loop_GiB": OnnxBackend.plan(cfg, 131072, w, recipe={"dense": "fp32"}).kv / GIB,
                     "all_layers_full_bf16_GiB": 2 * cfg.kv_dim * 2 * 131072 * cfg.num_hidden_layers / GIB}
    return out


def second_turn(folder: Path, tok, first_user_tokens: int) -> dict:
    """A first turn with a long user message and an analysis+final reply, then a second question: reuse vs fresh."""
    from edgec.harmony.conversation import Message
    from edgec.runtime.base import load_backend
    from edgec.runtime.generate import Sampling
    from edgec.runtime.session import ChatSession

    ctx = first_user_tokens + 1024
    s = ChatSession(load_backend(folder, max_context=ctx), tok, date="2025-01-01",
                    sampling=Sampling(temperature=0, max_tokens=32))
    words = " ".join(f"w{i}" for i in range(first_user_tokens // 2))
    s.history = [Message("user", words),
                 Message("assistant", "Thinking about it. " * 20, channel="analysis")]
    s.respond()
    s.history[2:] = [Message("assistant", "Done.", channel="final"), Message("user", "And then?")]
    prompt, _ = s.fit_prompt()
    t = time.perf_counter()
    s.gen.prefill(prompt)
    reuse_s = time.perf_counter() - t
    st = s.gen.stats
    fresh = load_backend(folder, max_context=ctx)
    fresh.forward(prompt[:8])  # warm-up compile
    fresh.reset()
    t = time.perf_counter()
    fresh.forward(prompt)
    full_s = time.perf_counter() - t
    return {"prompt": len(prompt), "reused": st.reused, "prefilled": st.prefill, "reuse_s": round(reuse_s, 4),
            "full_prefill_s": round(full_s, 4), "speedup": round(full_s / reuse_s, 1)}


def decode_edgec(folder: Path, context: int, n: int) -> float:
    from edgec.runtime.base import load_backend
    from edgec.runtime.generate import Generator, Sampling

    ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, context)]
    g = Generator(load_backend(folder, max_context=context + n + 8))
    res = g.generate(ids, Sampling(temperature=0, max_tokens=n))
    return res.stats.tok_s


def decode_mlx_lm(src: Path, context: int, n: int) -> float:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(src))
    ids = mx.array(np.random.default_rng(0).integers(0, 199998, context))
    t0, count = None, 0
    for _tok, _ in generate_step(ids, model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        count += 1
        if t0 is None:
            t0 = time.perf_counter()
    return (count - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--contexts", default="1024,16384")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--first-turn-tokens", type=int, default=2000)
    ap.add_argument("--targets", default="mlx", help="comma-separated: mlx, onnx-cpu")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-peer", action="store_true", help="skip mlx-lm")
    a = ap.parse_args()

    from edgec.convert import run_convert
    from edgec.harmony.tokenizer import Tokenizer
    from edgec.spec import preset
    from edgec.synth import synthesize

    work = a.work or Path(tempfile.mkdtemp(prefix="edgec-bench-chat-"))
    src = work / "src"
    cfg = preset(a.preset, num_hidden_layers=a.layers)
    if not src.exists():
        synthesize(cfg, src, seed=0, layout="hf")
    outs = {}
    for t in a.targets.split(","):
        outs[t] = work / t
        if not outs[t].exists():
            run_convert(src, t, outs[t], progress=False)
    result = {"model": {"preset": a.preset, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size},
              "kv_at_131072": kv_figures(), "second_turn": {}, "decode_tok_s": {}}
    for t, folder in outs.items():
        result["second_turn"][t] = second_turn(folder, Tokenizer.from_folder(folder), a.first_turn_tokens)
        print(f"second turn {t}: {result['second_turn'][t]}", flush=True)
    for ctx in (int(c) for c in a.contexts.split(",")):
        row = {f"edgec_{t}": round(decode_edgec(folder, ctx, a.decode_tokens), 2) for t, folder in outs.items()}
        if not a.no_peer:
            row["mlx_lm"] = round(decode_mlx_lm(src, ctx, a.decode_tokens), 2)
        result["decode_tok_s"][str(ctx)] = row
        print(f"context {ctx}: {row}", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
