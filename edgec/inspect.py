"""`edgec inspect`: what a checkpoint (or an edgec output folder) is, whether it is intact, and what it costs.

`inspect_report(path, context)` builds a plain dict (the `--json` output); `render_report(report)` prints it as
rich tables. The memory plan prices every target profile in `targets/` from ONE table of bits per weight.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import EdgecError
from .spec import GptOssConfig, hf_tensors, load_json

# Storage cost of each weight format, in bits per weight, block scales included. The one table edgec prices with.
BITS_PER_WEIGHT: dict[str, float] = {
    "mxfp4": 4.25,  # 4-bit E2M1 codes + one 8-bit E8M0 scale per 32
    "int8": 9.0,  # int8 + fp32 scale per block of 32
    "exact": 8.5,  # MXFP4 -> lossless int8 blocks of 32 + an fp16 scale per block (QMoE on the GPU targets)
    "int4": 4.5,  # int4 + fp16 scale per block of 32
    "q8": 8.5,  # MLX affine 8-bit, group 64 (bf16 scale + bias per 64)
    "bf16": 16.0,
    "fp16": 16.0,
    "fp32": 32.0,
}
# KV-cache element sizes (bytes) by the profiles' `kv_dtype`
KV_BYTES: dict[str, float] = {"bf16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "int8": 1, "q8": 1,
                              "fp8": 1, "int4": 0.5}

SMALL_KINDS = ("norm", "attn_bias", "sinks", "expert_bias")  # biases, norms, sinks: never block-quantized


def format_bits(fmt: str, dense: str | None = None) -> float | None:
    """Bits per weight of a format; "decomposed" experts (plain MatMuls) cost what the dense format costs."""
    if fmt == "decomposed" and dense is not None:
        return BITS_PER_WEIGHT.get(dense)
    return BITS_PER_WEIGHT.get(fmt)


def weight_bytes(cfg: GptOssConfig, dense: str, experts: str, expert_bits: float | None = None) -> int | None:
    """Bytes of all weights with expert matrices in `experts` and the other matrices in `dense` format.

    Norms, biases and sinks stay in floating point (fp32 when dense is fp32, else 16-bit). The router weight is
    a dense matrix. `expert_bits` overrides the table (a profile's `[experts] bits_per_weight`). None when a
    format is unknown.
    """
    e_bits = expert_bits if expert_bits is not None else format_bits(experts, dense)
    if dense not in BITS_PER_WEIGHT or e_bits is None:
        return None
    small_bits = 32.0 if dense == "fp32" else 16.0
    bits = 0.0
    for t in hf_tensors(cfg):
        if t.kind == "expert_blocks":
            bits += t.params * e_bits
        elif t.kind == "expert_scales":
            continue  # inside the 4.25 bits of mxfp4 (and replaced by the target format's own scales)
        elif t.kind in SMALL_KINDS:
            bits += t.params * small_bits
        else:
            bits += t.params * BITS_PER_WEIGHT[dense]
    return int(math.ceil(bits / 8))


def kv_settings(profile: dict[str, Any]) -> tuple[float, int | None, str]:
    """(bytes per cached value, positions kept per sliding layer or None for the window, label) of a profile.

    Read from top-level `kv_dtype` / `kv_bits` or a `[kv]` table with `dtype` / `bits` / `sliding_keep`."""
    kv = profile.get("kv") if isinstance(profile.get("kv"), dict) else {}
    bits = profile.get("kv_bits", kv.get("bits"))
    dtype = str(profile.get("kv_dtype", kv.get("dtype", "bf16")))
    keep = kv.get("sliding_keep")
    if bits is not None:
        return float(bits) / 8, keep, f"{bits}-bit"
    return float(KV_BYTES.get(dtype, 2)), keep, dtype if dtype in KV_BYTES else f"{dtype}? (priced as bf16)"


def kv_bytes(cfg: GptOssConfig, context: int, per_value: float, sliding_keep: int | None = None) -> int:
    """KV-cache bytes at `context`: full layers hold every position, sliding layers `sliding_keep` (default: window)."""
    keep = cfg.sliding_window if sliding_keep is None else max(int(sliding_keep), cfg.sliding_window)
    return cfg.with_(sliding_window=keep).kv_cache_bytes(context, per_value)


def memory_plan(cfg: GptOssConfig, context: int, source_bytes: int | None = None) -> dict[str, Any]:
    """Weights + KV cache per target profile at `context` tokens (and for the source as stored)."""
    from .targets import list_targets, load_profile

    rows: list[dict[str, Any]] = []
    kv_bf16 = cfg.kv_cache_bytes(context, 2)
    stored = sum(t.nbytes for t in hf_tensors(cfg))
    rows.append({"target": "source", "runtime": "numpy reference", "dense": "bf16",
                 "experts": "mxfp4", "kv_dtype": "bf16", "sliding_keep": cfg.sliding_window,
                 "weights_bytes": stored, "kv_bytes": kv_bf16,
                 "total_bytes": stored + kv_bf16, "note": ""})
    names: list[str] = []
    try:
        names = list_targets()
    except OSError:
        names = []
    for name in names:
        try:
            prof = load_profile(name)
        except EdgecError as e:
            rows.append({"target": name, "note": f"unreadable profile: {e}"})
            continue
        dense = str((prof.get("dense") or {}).get("default", "bf16"))
        experts = str((prof.get("experts") or {}).get("default", "mxfp4"))
        per_value, keep, kv_label = kv_settings(prof)
        kv = kv_bytes(cfg, context, per_value, keep)
        e_bits = (prof.get("experts") or {}).get("bits_per_weight")
        w = weight_bytes(cfg, dense, experts, None if e_bits is None else float(e_bits))
        unknown = [f for f in (dense, experts) if w is None and format_bits(f, dense) is None]
        rows.append({
            "target": name,
            "runtime": str(prof.get("runtime", "")) + (f" ({prof['execution_provider']})"
                                                       if prof.get("execution_provider") else ""),
            "dense": dense, "experts": experts,
            "kv_dtype": kv_label, "sliding_keep": keep or cfg.sliding_window,
            "weights_bytes": w, "kv_bytes": kv, "total_bytes": None if w is None else w + kv,
            "note": f"unknown format {', '.join(unknown)}: add it to BITS_PER_WEIGHT" if unknown else "",
        })
    return {
        "context": context,
        "kv_all_full_bytes": int(2 * cfg.kv_dim * 2 * context * cfg.num_hidden_layers),
        "targets": rows,
        "profiles_found": len(names),
        "note": "" if names else "no target profiles in targets/ yet: only the source is priced",
    }


def _architecture(cfg: GptOssConfig) -> dict[str, Any]:
    y = cfg.yarn
    return {
        "layers": cfg.num_hidden_layers,
        "sliding_layers": len(cfg.sliding_layers),
        "full_layers": len(cfg.full_layers),
        "sliding_window": cfg.sliding_window,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "experts": cfg.num_local_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "max_context": cfg.max_position_embeddings,
        "initial_context": cfg.initial_context_length,
        "rope_theta": cfg.rope_theta,
        "yarn": {"factor": y.factor, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                 "original_max_position_embeddings": y.original_max_position_embeddings, "truncate": y.truncate},
        "swiglu_limit": cfg.swiglu_limit,
    }


def _params(cfg: GptOssConfig) -> dict[str, int]:
    p = cfg.params()
    return {"total": p["total"], "active": p["active"], "experts": p["experts"],
            "embedding": cfg.vocab_size * cfg.hidden_size, "lm_head": cfg.vocab_size * cfg.hidden_size}


def _inspect_output(folder: Path, context: int | None) -> dict[str, Any]:
    """An edgec output folder: its manifest, files present with the recorded sizes, and the memory it needs."""
    mpath = folder / "edgec.json"
    m = load_json(mpath)
    if not isinstance(m.get("config"), dict) or not isinstance(m.get("files"), dict):
        raise EdgecError(f"{mpath}: not an edgec manifest (no config / files)")
    cfg = GptOssConfig.from_dict(m["config"], str(mpath))
    ctx = context or cfg.max_position_embeddings
    problems, files, total = [], [], 0
    for name, info in sorted(m["files"].items()):
        p = folder / name
        want = int(info.get("bytes", -1)) if isinstance(info, dict) else -1
        if not p.is_file():
            problems.append(f"{p}: missing (recorded in edgec.json)")
            continue
        size = p.stat().st_size
        total += size
        files.append({"name": name, "bytes": size})
        if want >= 0 and size != want:
            problems.append(f"{p}: {size} bytes, edgec.json records {want}")
    recipe = m.get("recipe") or {}
    try:  # the KV cache the target's runtime allocates, as its profile states it
        from .targets import load_profile

        prof = load_profile(str(m.get("target")))
    except EdgecError:
        prof = {}
    per_value, keep, kv_label = kv_settings(prof)
    kv = kv_bytes(cfg, ctx, per_value, keep)
    return {
        "path": str(folder), "kind": "edgec output", "target": m.get("target"), "runtime": m.get("runtime"),
        "edgec_version": m.get("edgec_version"), "recipe": recipe, "source": m.get("source"),
        "architecture": _architecture(cfg), "params": _params(cfg),
        "files": files, "bytes_on_disk": total, "problems": problems,
        "memory_plan": {"context": ctx, "targets": [{
            "target": str(m.get("target")), "runtime": str(m.get("runtime") or ""),
            "dense": str(recipe.get("dense", "")) if isinstance(recipe, dict) else "",
            "experts": str(recipe.get("experts", "")) if isinstance(recipe, dict) else "",
            "kv_dtype": kv_label, "weights_bytes": total, "kv_bytes": kv, "total_bytes": total + kv,
            "note": "weights = files on disk (sha256 not re-verified; `edgec parity` checks numerics)"}]},
    }


def inspect_report(path: str | Path, context: int | None = None) -> dict[str, Any]:
    """Everything `edgec inspect` shows, as a JSON-able dict. Problems are listed, not raised; a folder that
    cannot be read at all (no config, unreadable JSON, not gpt-oss, unreadable shard header) raises EdgecError."""
    path = Path(path)
    if context is not None and context < 1:
        raise EdgecError(f"--context must be a positive number of tokens, got {context}")
    if path.is_dir() and (path / "edgec.json").is_file():
        return _inspect_output(path, context)
    ckpt = Checkpoint.scan(path)
    try:
        cfg = ckpt.config
        problems = ckpt.problems()
        expected = ckpt.expected()
        shards = [{"name": n, "bytes": f.path.stat().st_size, "tensors": len(f.entries)}
                  for n, f in sorted(ckpt.files.items())]
        src_bytes = sum(s["bytes"] for s in shards)
        tokenizer = [p.name for p in ckpt.tokenizer_files()]
    finally:
        ckpt.close()
    ctx = context or cfg.max_position_embeddings
    return {
        "path": str(path),
        "kind": "source checkpoint",
        "layout": ckpt.layout,
        "has_original": ckpt.layout == "hf" and (path / "original" / "config.json").is_file(),
        "architecture": _architecture(cfg),
        "params": _params(cfg),
        "source_bytes": src_bytes,
        "shards": shards,
        "tokenizer_files": tokenizer,
        "tensors": {"expected": len(expected), "found": len(ckpt.location), "problems": len(problems)},
        "problems": problems,
        "memory_plan": memory_plan(cfg, ctx, src_bytes),
    }


# ---- rendering --------------------------------------------------------------------------------------------------
def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_report(report: dict[str, Any]) -> None:
    """Print the report as rich tables on stdout (problems in red)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = Console()
    a, p = report["architecture"], report["params"]
    y = a["yarn"]
    t = Table(title=f"{report['path']} ({report['kind']})", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    if report["kind"] == "edgec output":
        t.add_row("target", f"{report.get('target')} ({report.get('runtime') or '?'})")
        t.add_row("recipe", ", ".join(f"{k}={v}" for k, v in (report.get("recipe") or {}).items()
                                      if v is not None) or "-")
        src = report.get("source") or {}
        t.add_row("converted from", f"{src.get('path', '?')} ({src.get('layout', '?')} layout), "
                                    f"edgec {report.get('edgec_version')}")
        t.add_row("files", f"{len(report['files'])} files, {human_bytes(report['bytes_on_disk'])}")
    else:
        t.add_row("layout", report["layout"] + (" (+ original/)" if report.get("has_original") else ""))
        t.add_row("source on disk", f"{human_bytes(report['source_bytes'])} in {len(report['shards'])} shard(s)")
        t.add_row("tokenizer / generation", ", ".join(report["tokenizer_files"]) or "none")
    t.add_row("layers", f"{a['layers']} ({a['sliding_layers']} sliding, window {a['sliding_window']}; "
                        f"{a['full_layers']} full)")
    t.add_row("hidden / intermediate / head_dim", f"{a['hidden_size']} / {a['intermediate_size']} / {a['head_dim']}")
    t.add_row("heads (q / kv)", f"{a['attention_heads']} / {a['kv_heads']}")
    t.add_row("experts (active)", f"{a['experts']} ({a['experts_per_token']} per token)")
    t.add_row("vocabulary", str(a["vocab_size"]))
    t.add_row("context", f"{a['max_context']} (initial {a['initial_context']})")
    t.add_row("RoPE", f"theta {a['rope_theta']:g}, YaRN x{y['factor']:g} beta {y['beta_fast']:g}/{y['beta_slow']:g}"
                      f" from {y['original_max_position_embeddings']}, truncate {str(y['truncate']).lower()}")
    t.add_row("parameters", f"{human_count(p['total'])} total, {human_count(p['active'])} active per token "
                            f"({human_count(p['experts'])} in experts)")
    if "tensors" in report:
        ts = report["tensors"]
        status = "[green]ok[/]" if not ts["problems"] else f"[red]{ts['problems']} problem(s)[/]"
        t.add_row("tensors", f"{ts['found']} found, {ts['expected']} expected: {status}")
    con.print(t)

    plan = report["memory_plan"]
    mt = Table(title=f"memory plan at {plan['context']} tokens", title_justify="left", box=box.SIMPLE_HEAD,
               pad_edge=False)
    for col in ("target", "experts", "dense", "KV dtype", "weights", "KV cache", "total"):
        mt.add_column(col, justify="right" if col in ("weights", "KV cache", "total") else "left", no_wrap=True)
    for r in plan["targets"]:
        if "weights_bytes" not in r:
            mt.add_row(r["target"], f"[red]{r['note']}[/]", "", "", "", "", "")
            continue
        mt.add_row(r["target"], r["experts"], r["dense"], r["kv_dtype"],
                   human_bytes(r["weights_bytes"]), human_bytes(r["kv_bytes"]), human_bytes(r["total_bytes"]))
    con.print(mt)
    notes = [r["note"] for r in plan["targets"] if r.get("note") and "weights_bytes" in r]
    if plan.get("note"):
        notes.append(plan["note"])
    if "kv_all_full_bytes" in plan:
        keeps = sorted({r.get("sliding_keep") for r in plan["targets"] if r.get("sliding_keep")})
        notes.append(f"KV counts {' or '.join(map(str, keeps)) or a['sliding_window']} positions per sliding layer "
                     f"(window {a['sliding_window']}); treating every layer as full would need "
                     f"{human_bytes(plan['kv_all_full_bytes'])} in bf16")
    for n in dict.fromkeys(notes):
        con.print(f"[dim]{n}[/]")
    if report["problems"]:
        pt = Table(title=f"{len(report['problems'])} problem(s)", title_justify="left", title_style="bold red",
                   show_header=False)
        pt.add_column(style="red", overflow="fold")
        for line in report["problems"]:
            pt.add_row(line)
        con.print(pt)
