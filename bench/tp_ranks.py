"""Run under mlx.launch by bench/bench_pipeline.py: the tensor-parallel peer, mlx-lm's `sharded_load` (its gpt_oss
`shard()`: q/k/v/experts split across ranks, an all_sum after attention and after the experts in every layer) on
an HF folder; greedy decode timed, every all_sum counted (calls and bytes) during the decode steps. Rank 0 prints
one JSON line."""

import json
import sys
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import sharded_load

calls = {"n": 0, "bytes": 0, "on": False}
_all_sum = mx.distributed.all_sum


def counted(x, *a, **k):  # mlx-lm's sharded layers call mx.distributed.all_sum at graph-building time
    if calls["on"]:
        calls["n"] += 1
        calls["bytes"] += x.nbytes
    return _all_sum(x, *a, **k)


mx.distributed.all_sum = counted
folder, tokens = sys.argv[1], int(sys.argv[2])
group = mx.distributed.init(strict=True)
model, tok = sharded_load(folder)
prompt = mx.array(tok.encode("hi"))
steps = generate_step(prompt, model, max_tokens=tokens + 1)
next(steps)  # prefill and the first token
t0 = time.perf_counter()
calls["on"] = True
for _ in range(tokens):
    next(steps)
dt = time.perf_counter() - t0
if group.rank() == 0:
    print(json.dumps({"tok_s": tokens / dt, "all_sums_per_token": calls["n"] / tokens,
                      "bytes_per_token": calls["bytes"] / tokens}))
