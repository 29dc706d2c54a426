"""One memory model: what each backend plans is what it allocates and holds; the registry; the device's budget and the
context chosen from it; portable process memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_ckpt

from edgec.cli import main
from edgec.errors import EdgecError
from edgec.memory import (
    GIB,
    MIN_CONTEXT,
    Budget,
    Plan,
    device_budget,
    facts_kv_bytes,
    fit_context,
    largest_context,
    parse_size,
    peak_rss_bytes,
    plan_folder,
    recipe_weights,
    rss_bytes,
)
from edgec.spec import hf_tensors, preset


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


# ---- arithmetic -------------------------------------------------------------------------------------------------
def test_textbook_kv_arithmetic():
    """The facts file's figure: bf16, full layers every position, sliding layers their 128-position window."""
    cfg = preset("20b")
    sliding = 12 * 128 * 2048  # 12 sliding layers keep 128 positions of 2 KiB
    assert facts_kv_bytes(cfg, 131072) == 3 * 2**30 + sliding  # 24 KiB/token over 12 full layers
    assert facts_kv_bytes(cfg, 1) == 24 * 2048
    assert facts_kv_bytes(cfg, 131072, 1) == (3 * 2**30 + sliding) // 2
    assert facts_kv_bytes(preset("120b"), 131072) == int(4.5 * 2**30) + 18 * 128 * 2048


def test_recipe_weights_break_down_the_stored_bytes():
    cfg = preset("20b")
    w = recipe_weights(cfg, "bf16", "mxfp4")
    assert w.total == sum(t.nbytes for t in hf_tensors(cfg))  # mxfp4 at 4.25 bits is exactly blocks + scales
    assert w.embedding == cfg.vocab_size * cfg.hidden_size * 2
    mats = sum(t.nbytes for t in hf_tensors(cfg) if t.kind in ("attn", "router", "lm_head"))
    assert w.matrices == mats and 0 < w.vectors < 2**20 * 4 and w.experts > 0.7 * w.total
    assert recipe_weights(cfg, "q8", "mxfp4").matrices == 0  # quantized matrices are never widened
    assert recipe_weights(cfg, "bf16", "nope") is None


# ---- plans equal allocations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"kv_dtype": "bfloat16"}, {"kv_dtype": "float32"}, {"kv_bits": 8},
                                  {"compute": "float16"}, {"compute": "float32-upcast", "kv_dtype": "float32"}])
def test_mlx_holds_exactly_its_plan(tiny_mlx, opts):
    """Weights held == the plan's weights (the folder's bytes; float32-upcast: + the dense matrices again) and the KV
    cache at a full context == the plan's KV, for each option."""
    import mlx.core as mx

    from edgec.runtime.base import load_backend

    b = load_backend(tiny_mlx, max_context=131072, **opts)
    plan = b.memory_plan()
    stored = b.held_weights(tiny_mlx)
    assert b.held_bytes() == plan.weights
    extra = stored.matrices if opts.get("compute") == "float32-upcast" else 0
    assert plan.weights == stored.total + extra == sum(p.stat().st_size - _header(p) for p in
                                                        tiny_mlx.glob("model*.safetensors")) + extra
    c = b.config
    for i in range(c.num_hidden_layers):  # one token at the last position: each layer allocates its full plan
        z = mx.zeros((c.num_key_value_heads, 1, c.head_dim))
        b._store(i, z, z, 0 if c.is_sliding(i) else 131071)
    assert b.kv_bytes() == plan.kv
    assert plan_folder(tiny_mlx, 131072, **opts).kv == plan.kv  # what inspect and chat's plan use


def _header(p: Path) -> int:
    return 8 + int.from_bytes(p.read_bytes()[:8], "little")


def test_onnx_holds_its_plan(tiny_onnx, ids300):
    from edgec.runtime.base import load_backend

    b = load_backend(tiny_onnx, max_context=300)
    b.forward(ids300)
    assert b.kv_bytes() == b.memory_plan(300).kv == plan_folder(tiny_onnx, 300).kv
    b = load_backend(tiny_onnx, max_context=131072)
    b._grow_full(131072)
    assert b.kv_bytes() == plan_folder(tiny_onnx, 131072).kv


@pytest.mark.parametrize("runtime", ["mlx", "onnx"])
def test_full_layers_grow_amortized_to_exactly_the_plan(runtime, tiny_mlx, tiny_onnx):
    """Capacity >= need at every step, a few reallocations while filling the context (x1.5 growth), and the
    allocation once full equal to the plan."""
    import numpy as np

    from edgec.runtime.base import load_backend

    folder, ctx = (tiny_mlx, 20000) if runtime == "mlx" else (tiny_onnx, 20000)
    b = load_backend(folder, max_context=ctx)
    caps, have = [], 0
    for need in range(1, ctx + 1, 97):
        have = b.full_capacity(need, have, ctx)
        assert need <= have <= ctx
        caps.append(have)
    assert b.full_capacity(ctx, have, ctx) == ctx
    grows = len(set(caps))
    assert grows <= 2 + int(np.log(ctx / b.FULL_CHUNK) / np.log(1.5)) + 1, grows
    assert b.kv_positions(b.config, ctx) == (ctx, b.sliding_positions(b.config, ctx))


# ---- the registry ------------------------------------------------------------------------------------------------
def test_registry_imports_no_backend_until_asked():
    code = ("import sys, edgec.runtime.base as b; "
            "print([m for m in ('edgec.runtime.mlx_backend', 'edgec.runtime.onnx_backend', 'mlx', 'onnxruntime') "
            "if m in sys.modules]); print(b.runtime_class('mlx').__name__, b.runtime_class('onnxruntime-genai')"
            ".__name__, b.runtime_class('reference').__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "MlxBackend OnnxBackend ReferenceBackend"]
    from edgec.runtime.base import runtime_class

    with pytest.raises(EdgecError, match="unknown runtime 'x'; edgec has: mlx, onnxruntime-genai, reference"):
        runtime_class("x")


def test_options_a_backend_cannot_run_are_one_line_errors(tiny_mlx, tiny_onnx, tiny):
    cases = [(tiny_onnx, ["--compute", "bfloat16"], "it can run: float32"),
             (tiny_onnx, ["--kv-dtype", "float16"], "it can run: float32"),
             (tiny_onnx, ["--kv-bits", "8"], "has no such option"),
             (tiny_mlx, ["--device", "gpu"], "it can run: cpu"),
             (tiny_mlx, ["--cpu-moe", "9"], "it can run: 0, 1, 2, 3")]
    for folder, args, msg in cases:
        r = cli("generate", folder, "--prompt", "hi", "--max-tokens", 1, *args)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = cli("generate", tiny, "--prompt", "hi", "--max-tokens", 1, "--compute", "float32")
    assert r.exit_code == 2 and "the reference runtime" in r.output and "has no such option" in r.output


# ---- the budget -------------------------------------------------------------------------------------------------
def test_device_budget_sources():
    assert device_budget({"max_recommended_working_set_size": 11453251584}) == Budget(
        11453251584, "Metal's recommended working set")
    assert device_budget({"free_memory": 8 * GIB, "total_memory": 16 * GIB}) == Budget(8 * GIB, "free GPU memory")
    assert device_budget(None, 5 * GIB) == Budget(5 * GIB, "--memory-budget")
    ram = device_budget({"device_name": "cpu"})
    assert ram.source in ("available RAM", "physical RAM") and ram.bytes > 2**30
    assert [parse_size(s) for s in ("10.7GB", "10GiB", "8000MB", "512M", "4096")] == [
        10_700_000_000, 10 * GIB, 8_000_000_000, 512_000_000, 4096]
    with pytest.raises(EdgecError, match="expected a size"):
        parse_size("lots")


def test_fit_context_chooses_the_largest_that_fits_and_refuses_with_numbers():
    at = lambda c: Plan("x", c, 10 * GIB, c * 64 * 1024, 2**20)
    budget = Budget(12 * GIB, "test")
    best = largest_context(at, budget.bytes, 131072)
    assert at(best).total <= budget.bytes < at(best + 1024).total and best % 1024 == 0 and best == 32768 - 1024
    ctx, line = fit_context(at, budget, 131072, None)
    assert ctx == best and "the largest that fits" in line
    ctx, line = fit_context(at, Budget(40 * GIB, "test"), 131072, None)
    assert ctx == 131072 and "the model's maximum" in line
    assert fit_context(at, budget, 131072, 4096)[0] == 4096
    with pytest.raises(EdgecError, match=f"the largest context that fits is {best} \\(--max-context {best}\\)"):
        fit_context(at, budget, 131072, 65536)
    with pytest.raises(EdgecError, match="will not fit: weights 10.00 GiB .* > 8.00 GiB .*; try this"):
        fit_context(at, Budget(8 * GIB, "test"), 131072, None, lambda: ["try this"])
    assert fit_context(at, Budget(None, "RAM"), 131072, None)[0] == 131072


def test_chat_plans_the_largest_context_that_fits_the_budget(tiny_mlx):
    """No --max-context: the largest context that fits --memory-budget, said on start; a context that cannot fit is
    refused naming the largest that can; weights that cannot fit name the recipes, with numbers."""
    from edgec.runtime.mlx_backend import MlxBackend

    plan = lambda c: MlxBackend.plan_folder(tiny_mlx, c)
    budget = plan(20000).total
    r = cli("generate", tiny_mlx, "--prompt", "hi", "--max-tokens", 2, "--temperature", 0, "--memory-budget", budget)
    assert r.exit_code == 0, r.output
    ctx = int(r.output.split("context ")[1].split()[0])
    assert 19000 <= ctx <= 20000 and "(the largest that fits)" in r.output
    r = cli("generate", tiny_mlx, "--prompt", "hi", "--max-tokens", 2, "--memory-budget", budget,
            "--max-context", 131072)
    assert r.exit_code == 2 and f"the largest context that fits is {ctx}" in r.output
    r = cli("generate", tiny_mlx, "--prompt", "hi", "--max-tokens", 2, "--memory-budget", plan(1024).weights // 2)
    assert r.exit_code == 2 and "will not fit: weights" in r.output and "--dense q8 --experts mxfp4: " in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = cli("generate", tiny_mlx, "--prompt", "hi", "--max-tokens", 2, "--temperature", 0, "--json",
            "--max-context", 4096)
    assert r.exit_code == 0 and json.loads(r.output)["memory"].startswith("context 4096: weights")


def test_inspect_prices_each_target_with_its_runtime_plan(tiny_mlx, tiny):
    from edgec.memory import plan_recipe
    from edgec.report import inspect_report
    from edgec.targets import load_profile

    out = inspect_report(tiny_mlx, 4096)["memory_plan"]["targets"][0]
    want = plan_folder(tiny_mlx, 4096)
    assert (out["weights_bytes"], out["kv_bytes"], out["transient_bytes"]) == (want.weights, want.kv, want.transient)
    rows = {r["target"]: r for r in inspect_report(tiny, 8192)["memory_plan"]["targets"]}
    cfg = preset("tiny", num_hidden_layers=3)
    for name in ("mlx", "onnx-cpu", "onnx-cuda"):
        p = plan_recipe(load_profile(name), cfg, 8192)
        assert (rows[name]["weights_bytes"], rows[name]["kv_bytes"]) == (p.weights, p.kv)
    assert rows["mlx"]["kv_dtype"] == "float16" and rows["onnx-cpu"]["kv_dtype"] == "float32"


# ---- resident memory against the plan -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slice20b(tmp_path_factory) -> Iterator[Path]:
    """A 2-layer slice of the 20b shape (edgec synth --preset 20b --layers 2: 20b's vocabulary, hidden size, heads
    and 32 experts; 1.6 GB)."""
    src = make_ckpt(tmp_path_factory.mktemp("slice20b") / "src", "20b", layout="hf", num_hidden_layers=2)
    yield src
    shutil.rmtree(src)  # disk: removed when the module ends


@pytest.mark.parametrize("target", ["mlx", "onnx-cpu"])
def test_resident_memory_against_the_plan(slice20b, target, tmp_path):
    """On the 20b slice, RSS in a fresh process (less the interpreter and the backend's library, measured before
    loading) after loading and after 1,000 tokens is within 10% of the backend's plan: its weights resident at load
    (+ the KV allocated at load), then everything it plans (weights + KV + per-step temporaries). MLX reads every
    weight at load. onnxruntime maps model.onnx.data: the experts it runs as stored page in as they are routed to
    (the plan's `paged`), and of the embedding table, which the plan prices apart as `mapped`, only the pages of
    tokens seen, which the measurement also reports apart and must stay within the table."""
    from edgec.bench import measure_memory
    from edgec.convert import run_convert

    out = Path(run_convert(slice20b, target, tmp_path / target, progress=False)["out"])
    r = measure_memory(out, 1024, 1000)
    shutil.rmtree(out)
    base, plan = r["rss_before_load_bytes"], r["plan"]
    rows = r["rss_mapped_rows_bytes"] or 0
    loaded = r["rss_after_load_bytes"] - base
    after = r["rss_after_tokens_bytes"] - base - rows
    assert r["kv_bytes"] == plan["kv_bytes"] and rows <= plan["mapped_bytes"], r
    assert abs(loaded / (plan["at_load_bytes"] + r["kv_at_load_bytes"]) - 1) < 0.10, r
    assert abs(after / plan["total_bytes"] - 1) < 0.10, r
    if target == "onnx-cpu":  # the experts are the part that pages in: 2 layers of 20b's MXFP4 blocks
        assert plan["paged_bytes"] == 2 * 32 * 2880 * (5760 + 2880) // 2, r
        assert r["rss_mapped_rows_bytes"] is not None or not sys.platform.startswith("linux")


# ---- this process ----------------------------------------------------------------------------------------------
def test_process_memory_is_measured_without_resource(tiny, tmp_path):
    """`resource` is Unix only (Windows has none): convert and bench measure memory without it."""
    assert 0 < rss_bytes() <= peak_rss_bytes()
    code = ("import sys; sys.modules['resource'] = None; from edgec.cli import main; "
            f"main(['convert', {str(tiny)!r}, '-t', 'mlx', '-o', {str(tmp_path / 'o')!r}, '--json'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["peak_rss_bytes"] > 2**20
    assert MIN_CONTEXT == 1024


def test_cpu_moe_is_planned_off_the_gpu():
    """--cpu-moe N: on the GPU the plan counts the experts of N layers as held off the device (what the budget is
    compared with); on the CPU device nothing moves."""
    from edgec.runtime.mlx_backend import MlxBackend

    cfg = preset("20b")
    w = recipe_weights(cfg, "bf16", "mxfp4")
    gpu = MlxBackend.plan(cfg, 8192, w, compute="float16", kv_dtype="float16", device="gpu", cpu_moe=12)
    assert gpu.offloaded == w.experts // 2 and gpu.device_total == gpu.total - w.experts // 2
    assert MlxBackend.plan(cfg, 8192, w, device="cpu", cpu_moe=12).offloaded == 0


def test_weights_over_a_gpu_budget_suggest_the_cpu_moe_that_fits(tiny_mlx):
    """A Mac whose Metal working set cannot hold the weights: the refusal names the smallest --cpu-moe N whose plan
    leaves the rest on the GPU within the budget (priced by the same plan; forced device gpu on this CPU)."""
    from edgec.memory import MIN_CONTEXT, Budget
    from edgec.runtime.base import config_of
    from edgec.runtime.cli import _recipes
    from edgec.runtime.mlx_backend import MlxBackend

    opts = {**MlxBackend.defaults(tiny_mlx, device="gpu"), "device": "gpu"}
    full = MlxBackend.plan_folder(tiny_mlx, MIN_CONTEXT, **opts).device_total
    one = MlxBackend.plan_folder(tiny_mlx, MIN_CONTEXT, **{**opts, "cpu_moe": 1}).device_total
    cfg = config_of(tiny_mlx)
    lines = _recipes(MlxBackend, tiny_mlx, "mlx", cfg, Budget((full + one) // 2, "test"), opts)
    assert len(lines) == 1 and lines[0].startswith("--cpu-moe 1 "), lines
    lines = _recipes(MlxBackend, tiny_mlx, "mlx", cfg, Budget(one - 1, "test"), opts)
    assert not lines[0].startswith("--cpu-moe 1 "), lines
