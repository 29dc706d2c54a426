"""`edgec inspect`: what a checkpoint (or an edgec output folder) is, whether it is intact, and what it costs.

`inspect_report(path, context)` builds a plain dict (the `--json` output); `render_report(report)` prints it as
rich tables. The memory plan asks each target's runtime what it will hold (`edgec.memory`: one memory model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, nonfinite_line
from .errors import EdgecError
from .memory import facts_kv_bytes, format_bits, plan_folder, plan_recipe
from .spec import GptOssConfig, hf_tensors


def _plan_row(target: str, runtime: str, dense: str, experts: str, plan: Any) -> dict[str, Any]:
    return {"target": target, "runtime": runtime, "dense": dense, "experts": experts, "kv_dtype": plan.kv_label,
            "weights_bytes": plan.weights, "mapped_bytes": plan.mapped, "kv_bytes": plan.kv,
            "transient_bytes": plan.transient,
            "total_bytes": plan.total, "compute": plan.weights_label, "note": ""}


def memory_plan(cfg: GptOssConfig, context: int) -> dict[str, Any]:
    """Weights + KV cache + per-step temporaries per target profile at `context` tokens, each as its runtime's
    `plan` states it for the profile's default recipe on the target's device; and the source as published with the
    textbook KV figure (bf16, sliding layers = window)."""
    from .targets import list_targets, load_profile

    rows: list[dict[str, Any]] = []
    stored = sum(t.nbytes for t in hf_tensors(cfg))
    kv_src = facts_kv_bytes(cfg, context)
    rows.append({"target": "source", "runtime": "as published (textbook bf16 KV)", "dense": "bf16",
                 "experts": "mxfp4", "kv_dtype": "bf16", "weights_bytes": stored, "kv_bytes": kv_src,
                 "transient_bytes": 0, "total_bytes": stored + kv_src, "note": ""})
    try:
        names = list_targets()
    except OSError:
        names = []
    for name in names:
        try:
            prof = load_profile(name)
            dense = str((prof.get("dense") or {}).get("default", "bf16"))
            experts = str((prof.get("experts") or {}).get("default", "mxfp4"))
            plan = plan_recipe(prof, cfg, context)
        except EdgecError as e:
            rows.append({"target": name, "note": f"unreadable profile: {e}"})
            continue
        runtime = str(prof.get("runtime", "")) + (f" ({prof['execution_provider']})"
                                                  if prof.get("execution_provider") else "")
        if plan is None:
            unknown = [f for f in (dense, experts) if format_bits(f, dense) is None]
            rows.append({"target": name, "runtime": runtime, "dense": dense, "experts": experts, "kv_dtype": "",
                         "weights_bytes": None, "kv_bytes": None, "transient_bytes": None, "total_bytes": None,
                         "note": f"unknown format {', '.join(unknown)}: add it to edgec.memory.BITS_PER_WEIGHT"})
            continue
        rows.append(_plan_row(name, runtime, dense, experts, plan))
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
    from . import manifest

    m = manifest.read(folder)
    cfg = m.config
    ctx = context or cfg.max_position_embeddings
    problems = manifest.problems(m)
    if not (folder / "tokenizer.json").is_file():
        problems.append(f"{folder}: no tokenizer.json (chat, generate and parity need it)")
    files = [{"name": n, "bytes": (folder / n).stat().st_size} for n in sorted(m.files) if (folder / n).is_file()]
    total = sum(f["bytes"] for f in files)
    recipe = m.recipe
    dense, experts = str(recipe.get("dense", "")), str(recipe.get("experts", ""))
    try:  # as `edgec chat` would hold it here, with its defaults on this machine
        row = _plan_row(m.target, m.runtime or "", dense, experts, plan_folder(folder, ctx))
        row["note"] = ("weights as the runtime holds them (sizes, headers and files up to 64 MiB checked against "
                       "edgec.json; `edgec parity --verify-hashes` reads them all)")
    except EdgecError as e:  # unreadable weights or no backend here: the files' bytes, and why
        row = {"target": m.target, "runtime": m.runtime or "", "dense": dense,
               "experts": experts, "kv_dtype": "?", "weights_bytes": total, "kv_bytes": None,
               "transient_bytes": None, "total_bytes": None, "note": f"no runtime plan: {e}"}
    return {
        "path": str(folder), "kind": "edgec output", "target": m.target, "runtime": m.runtime,
        "edgec_version": m.edgec_version, "recipe": recipe, "source": m.source, "adapters": list(m.adapters),
        "architecture": _architecture(cfg), "params": _params(cfg),
        "files": files, "bytes_on_disk": total, "problems": problems,
        "memory_plan": {"context": ctx, "targets": [row]},
    }


EXPERTS_SHOWN = {"mxfp4": "mxfp4 (_blocks + _scales)", "BF16": "bf16 dense (16-bit fine-tune layout)",
                 "F16": "fp16 dense (16-bit fine-tune layout)", "F32": "fp32 dense (fine-tune layout)"}


def inspect_report(path: str | Path, context: int | None = None, strict: bool = False) -> dict[str, Any]:
    """Everything `edgec inspect` shows, as a JSON-able dict. Problems are listed, not raised; a folder that
    cannot be read at all (no config, unreadable JSON, not gpt-oss, unreadable shard header) raises EdgecError.
    Non-finite weights are counted per tensor (`nonfinite`), and are problems too with `strict`."""
    path = Path(path)
    if context is not None and context < 1:
        raise EdgecError(f"--context must be a positive number of tokens, got {context}")
    if path.is_dir() and (path / "edgec.json").is_file():
        return _inspect_output(path, context)
    ckpt = Checkpoint.scan(path)
    try:
        cfg = ckpt.config
        problems = ckpt.problems()
        nonfinite = ckpt.nonfinite() if not problems else {}  # only a checkpoint whose tensors all fit the spec
        if strict:
            problems += [nonfinite_line(path, t, n) for t, n in nonfinite.items()]
        if problem := ckpt.tokenizer_problem():
            problems.append(problem)
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
        "experts": EXPERTS_SHOWN[ckpt.experts_layout],
        "architecture": _architecture(cfg),
        "params": _params(cfg),
        "source_bytes": src_bytes,
        "shards": shards,
        "tokenizer_files": tokenizer,
        "nonfinite": nonfinite,
        "tensors": {"expected": len(expected), "found": len(ckpt.location), "problems": len(problems)},
        "problems": problems,
        "memory_plan": memory_plan(cfg, ctx),
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
        t.add_row("recipe", ", ".join(f"{k}={v}" + (f" ({human_bytes(v)})" if k.endswith("_bytes") else "")
                                      for k, v in (report.get("recipe") or {}).items() if v is not None) or "-")
        src = report.get("source") or {}
        t.add_row("converted from", f"{src.get('path', '?')} ({src.get('layout', '?')} layout), "
                                    f"edgec {report.get('edgec_version')}")
        for ad in report.get("adapters", []):
            t.add_row("adapter merged", f"{ad['name']} (scale {ad['scale']:g}, sha256 {ad['sha256'][:12]}) from "
                                        f"{ad['path']}")
        t.add_row("files", f"{len(report['files'])} files, {human_bytes(report['bytes_on_disk'])}")
    else:
        t.add_row("layout", report["layout"] + (" (+ original/)" if report.get("has_original") else ""))
        t.add_row("experts", report.get("experts", "?"))
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
    sizes = ("weights", "KV cache", "per step", "total")
    for col in ("target", "experts", "dense", "KV dtype", *sizes):
        mt.add_column(col, justify="right" if col in sizes else "left", no_wrap=True)
    for r in plan["targets"]:
        if "weights_bytes" not in r:
            mt.add_row(r["target"], f"[red]{r['note']}[/]", "", "", "", "", "", "")
            continue
        mt.add_row(r["target"], r["experts"], r["dense"], r["kv_dtype"], human_bytes(r["weights_bytes"]),
                   human_bytes(r["kv_bytes"]), human_bytes(r.get("transient_bytes")), human_bytes(r["total_bytes"]))
    con.print(mt)
    notes = [r["note"] for r in plan["targets"] if r.get("note") and "weights_bytes" in r]
    if plan.get("note"):
        notes.append(plan["note"])
    if "kv_all_full_bytes" in plan:
        notes.append(f"KV as each runtime allocates it (sliding layers: window {a['sliding_window']} + rollback "
                     f"margin + prefill chunk); treating every layer as full would need "
                     f"{human_bytes(plan['kv_all_full_bytes'])} in bf16. 'per step': the largest temporaries of a "
                     f"step (prefill at the end of the context)")
    for n in dict.fromkeys(notes):
        con.print(f"[dim]{n}[/]")
    if report["problems"]:
        pt = Table(title=f"{len(report['problems'])} problem(s)", title_justify="left", title_style="bold red",
                   show_header=False)
        pt.add_column(style="red", overflow="fold")
        for line in report["problems"]:
            pt.add_row(line)
        con.print(pt)
