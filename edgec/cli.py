"""The `edgec` command line. Commands stay thin; the work lives in the modules they call.

Importing this module never imports a backend (mlx, onnxruntime): those load inside the commands that need
them, and a missing one is reported as a one-line install hint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.markup import escape

from . import __version__
from .errors import EdgecError
from .progress import stderr
from .runtime.cli import backend_flags, backend_options, with_options


class EdgecGroup(click.Group):
    """Turns EdgecError into one red line and its exit code, and Ctrl-C into exit 130, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgecError as e:
            if e.exit_code == 130:
                _quiet_exit()
            stderr.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            _quiet_exit()
            stderr.print("[bold red]interrupted[/]")
            sys.exit(130)


def _quiet_exit() -> None:
    """Leaving after Ctrl-C: a second Ctrl-C (or one still pending) must not turn exit 130 into death by SIGINT."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


@click.group(cls=EdgecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgec")
def main() -> None:
    """edgec: convert gpt-oss checkpoints for the edge (MLX, ONNX Runtime), prove parity, and chat."""


def emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def force_options(f):
    """--force (replace an earlier edgec output) and --force-foreign (replace any folder that is not the source)."""
    f = click.option("--force-foreign", is_flag=True,
                     help="replace OUT even if edgec did not write it (its files are lost; never the source)")(f)
    return click.option("--force", is_flag=True, help="replace OUT if it is an earlier edgec output")(f)


def force_mode(force: bool, force_foreign: bool) -> bool | str:
    return "foreign" if force_foreign else force


# ---- foundation ----------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "20b", "120b"]))
@click.option("--layers", type=int, help="number of layers (overrides the preset)")
@click.option("--hidden", type=int, help="hidden size (multiple of 32)")
@click.option("--intermediate", type=int, help="expert intermediate size (multiple of 32)")
@click.option("--head-dim", type=int)
@click.option("--heads", type=int, help="query heads")
@click.option("--kv-heads", type=int, help="key/value heads")
@click.option("--experts", type=int)
@click.option("--top-k", type=int, help="experts per token")
@click.option("--vocab", type=int, help="vocabulary rows (Harmony needs 201088)")
@click.option("--shards", type=int, help="number of safetensors shards")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale-spread", type=click.IntRange(0, 40), default=8, show_default=True, metavar="BINADES",
              help="binades spanned by the MXFP4 block scales of an expert row, plus rare outliers (0: one scale)")
@click.option("--layout", type=click.Choice(["hf", "original", "both"]), default="hf", show_default=True)
@click.option("--experts-dtype", type=click.Choice(["mxfp4", "bf16", "fp16", "fp32"]), default="mxfp4",
              show_default=True, help="dense 16-bit experts as a fine-tune saves them (the MXFP4 values, dequantized)")
@force_options
def synth(out: Path, preset: str, layers, hidden, intermediate, head_dim, heads, kv_heads, experts, top_k, vocab,
          shards, seed, scale_spread, layout, experts_dtype, force, force_foreign) -> None:
    """Write a synthetic gpt-oss checkpoint that follows the published layout to the byte."""
    from .progress import byte_progress
    from .spec import preset as make
    from .synth import synthesize, total_bytes

    xd = {"mxfp4": "mxfp4", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}[experts_dtype]
    if xd != "mxfp4" and layout != "hf":
        raise EdgecError("--experts-dtype other than mxfp4 writes the Hugging Face layout only (--layout hf)")
    cfg = make(preset, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
               head_dim=head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
               num_local_experts=experts, num_experts_per_tok=top_k, vocab_size=vocab)
    with byte_progress(total_bytes(cfg, layout, xd), f"synth {preset}") as advance:
        synthesize(cfg, out, seed=seed, shards=shards, layout=layout, force=force_mode(force, force_foreign),
                   progress=advance, scale_spread=scale_spread, experts_dtype=xd)
    stderr.print(f"wrote {out} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                 f"{cfg.num_local_experts} experts, {total_bytes(cfg, layout, xd) / 1e9:.2f} GB)")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--context", type=int, default=None, help="context length for the memory plan (default: model max)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--strict", is_flag=True, help="non-finite weights (NaN/Inf) are a problem, not a warning")
@click.option("--hosts", type=click.Path(path_type=Path), default=None,
              help="the pipeline split over these hosts (mlx.launch's hostfile), without launching: per host, the "
                   "file's \"memory_budget\" or, for this machine, the budget measured here")
def inspect(src: Path, context: int | None, as_json: bool, strict: bool, hosts: Path | None) -> None:
    """Architecture, parameters, tensor inventory check and a memory plan per target. SRC: a checkpoint folder or a
    Hugging Face id from the local cache (openai/gpt-oss-20b, ORG/NAME/original, ORG/NAME@REVISION)."""
    from .hub import source_path
    from .report import inspect_report, render_report

    src = source_path(src)
    if hosts is not None:
        return inspect_hosts(src, hosts, context, as_json)
    report = inspect_report(src, context, strict=strict)
    if as_json:
        emit_json(report)
    else:
        render_report(report)
    if not strict:
        from .checkpoint import nonfinite_line

        for name, n in report.get("nonfinite", {}).items():
            warn(nonfinite_line(src, name, n) + "; --strict makes this an error")
    if problems := report.get("problems"):
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        stderr.print(f"[bold red]error:[/] {escape(problems[0] + more)}", highlight=False, soft_wrap=True)
        sys.exit(2)


def inspect_hosts(src: Path, hosts_file: Path, context: int | None, as_json: bool) -> None:
    """`inspect --hosts`: the per-rank split `chat/generate/serve --hosts` would make (the same `pipeline.plan`),
    at --context (default 4096, as the launch's)."""
    from .runtime.pipeline import describe, plan, planned_budgets, read_hosts

    hosts = read_hosts(hosts_file)
    budgets = planned_budgets(hosts, hosts_file)
    p = plan(src, [b for b, _ in budgets], context or 4096)
    for r, (_, source) in zip(p["ranks"], budgets, strict=True):
        r["budget_source"] = source
    p["context"] = context or 4096
    if as_json:
        emit_json(p)
    else:
        click.echo(f"context {p['context']}\n" + describe(p, hosts))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ids", help="comma-separated token ids")
@click.option("--ids-file", type=click.Path(exists=True, path_type=Path), help="JSON list of token ids")
@click.option("--last", type=click.IntRange(min=1), help="only the last N positions")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="output .npy file")
def logits(model: Path, ids: str | None, ids_file: Path | None, last: int | None, out: Path) -> None:
    """float32 logits [positions, vocab] of MODEL (a source checkpoint or an edgec output) for token ids."""
    import numpy as np

    from .hub import source_path
    from .runtime.base import load_backend
    from .spec import check_token_ids

    model = source_path(model)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise EdgecError(f"{out}: is a symbolic link or not a regular file; edgec will not replace it")
    if out.exists() and model.resolve() in out.resolve().parents:
        raise EdgecError(f"{out}: is a file of the model folder {model}; edgec will not replace it")
    tokens = parse_ids(ids, ids_file)
    backend = load_backend(model, max_context=len(tokens))
    check_token_ids(tokens, backend.config.vocab_size)
    n = len(tokens) if last is None else max(1, min(last, len(tokens)))
    with np.errstate(all="ignore"):  # non-finite logits are counted and reported below, once
        result = backend.forward(tokens, all_logits=True)[-n:]
    tmp = out.with_name(f".{out.name}.edgec-tmp-{os.getpid()}")
    try:  # written beside, then renamed over: a link at `out` is replaced, never written through
        with open(tmp, "wb") as f:
            np.save(f, result.astype(np.float32))  # to a file object: the name stays as given (no .npy added)
        os.replace(tmp, out)
    except OSError as e:
        raise EdgecError(f"{out}: cannot write ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    stderr.print(f"{backend.name}: wrote {out} {list(result.shape)} float32")
    if bad := int(np.count_nonzero(~np.isfinite(result))):
        pos = int(np.argwhere(~np.isfinite(result))[0][0]) + len(tokens) - n
        warn(f"{out}: {bad} of {result.size} logits are not finite (NaN/Inf), first at position {pos}; "
             f"`edgec inspect {model}` looks for non-finite weights")


def parse_ids(ids: str | None, ids_file: Path | None) -> list[int]:
    if (ids is None) == (ids_file is None):
        raise EdgecError("give exactly one of --ids or --ids-file")
    if ids_file is not None:
        from .jsonio import read_json

        tokens = read_json(ids_file)
    else:
        try:
            tokens = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError as e:
            raise EdgecError(f"could not read token ids ({e})") from None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        raise EdgecError("token ids must be a non-empty list of integers")
    return tokens


# ---- conversion --------------------------------------------------------------------------------------------
@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--target", "-t", required=True, help="target profile name (see `edgec targets`)")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="output folder")
@click.option("--dense", help="format of the non-expert weights (profile default if omitted)")
@click.option("--experts", help="format of the expert weights (profile default if omitted)")
@click.option("--lm-head", help="format of lm_head where the target quantizes it apart (onnx-cpu; default: as dense)")
@force_options
@click.option("--strict", is_flag=True, help="refuse a source with non-finite weights (NaN/Inf) instead of warning")
@click.option("--keep-16bit", is_flag=True, help="16-bit source experts stay dense (targets with --experts decomposed) "
              "instead of being quantized to MXFP4")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="a PEFT LoRA adapter folder merged into the weights (float32, before any quantization); repeatable")
@click.option("--adapter-scale", "adapter_scales", multiple=True, type=float,
              help="scale of each --adapter, in order (default: its lora_alpha / r)")
@click.option("--max-buffer", metavar="SIZE",
              help="the largest initializer (bytes, or 128MiB, 1GiB), in place of the target's max_buffer_bytes "
                   "(onnx-webgpu: 256MiB; a WebGPU adapter guarantees a 128MiB binding): the embedding and lm_head "
                   "are sharded under it, QMoE's experts split into groups, each token then running its top-k in "
                   "every group (20b at 128MiB: 2 groups, 2x the expert work at decode)")
@click.option("--json", "as_json", is_flag=True, help="print the conversion summary as JSON")
def convert(src: Path, target: str, out: Path, dense: str | None, experts: str | None, lm_head: str | None,
            force: bool, force_foreign: bool, strict: bool, keep_16bit: bool, adapters: tuple[Path, ...],
            adapter_scales: tuple[float, ...], max_buffer: str | None, as_json: bool) -> None:
    """Convert a gpt-oss checkpoint for a deployment target. SRC: a checkpoint folder or a Hugging Face id from the
    local cache (openai/gpt-oss-20b, ORG/NAME/original, ORG/NAME@REVISION); edgec never downloads."""
    from .convert import run_convert
    from .hub import source_path
    from .memory import parse_size

    src = source_path(src)
    cap = None if max_buffer is None else parse_size(max_buffer, "--max-buffer")
    summary = run_convert(src, target, out, dense=dense, experts=experts, force=force_mode(force, force_foreign),
                          lm_head=lm_head, strict=strict, keep_16bit=keep_16bit, adapters=adapters,
                          adapter_scales=adapter_scales, max_buffer=cap, warn=warn)
    if as_json:
        emit_json(summary)
    else:
        lm = f", lm_head {summary['lm_head']}" if summary.get("lm_head", summary["dense"]) != summary["dense"] else ""
        lossy = summary.get("lossy", [])
        for w in lossy:  # every step that did not keep the checkpoint's values, loudly
            stderr.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
        for a in summary.get("adapters", []):
            stderr.print(f"merged adapter {escape(a['name'])} (scale {a['scale']:g}, {a['modules']} modules, sha256 "
                         f"{a['sha256'][:12]})", highlight=False, soft_wrap=True)
        recipe = summary.get("recipe") or {}
        if recipe.get("expert_groups", 1) > 1:  # QMoE split under the buffer cap: say so, and what it costs
            stderr.print(f"experts in {recipe['expert_groups']} QMoE groups per layer (no expert tensor over "
                         f"--max-buffer {recipe['max_buffer_bytes']} bytes): each token runs its top-k in every group",
                         highlight=False, soft_wrap=True)
        stderr.print(f"[green]converted[/] {src} -> {out} ({target}: experts {summary['experts']}, dense "
                     f"{summary['dense']}{lm}; {'LOSSY' if lossy else 'exact weights'}) in "
                     f"{summary.get('seconds', 0):.1f}s, peak RSS {summary.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json: bool) -> None:
    """List the deployment target profiles."""
    from rich.table import Table

    from .targets import list_targets, load_profile

    profs = [load_profile(n) for n in list_targets()]
    if as_json:
        emit_json(profs)
        return
    t = Table("target", "runtime", "provider", "--experts", "--dense", "--lm-head", "notes",
              caption="the formats each target accepts, its default first")
    for p in profs:
        t.add_row(p["name"], p.get("runtime", ""), p.get("execution_provider", ""),
                  *(_formats(p.get(cls)) for cls in ("experts", "dense", "lm_head")), p.get("summary", ""))
    stderr.print(t)


def _formats(spec: dict | None) -> str:
    """The formats a tensor class accepts, the default first and in bold ('-': the class has no option here)."""
    if not spec:
        return "-"
    default, others = spec.get("default"), [f for f in spec.get("supported", []) if f != spec.get("default")]
    return ", ".join([f"[bold]{default}[/]"] * bool(default) + others)


@main.command()
@click.argument("out", type=click.Path(exists=True, path_type=Path))
@click.option("--prompt", type=int, default=128, show_default=True, help="prompt tokens")
@click.option("--tokens", type=int, default=16, show_default=True, help="decoded tokens")
@click.option("--no-peers", is_flag=True, help="skip mlx-lm")
@with_options(backend_flags())
@click.option("--json", "as_json", is_flag=True)
def bench(out: Path, prompt: int, tokens: int, no_peers: bool, as_json: bool, **runtime) -> None:
    """Prefill/decode tok/s, time to first token, memory (measured and planned) on OUT, and mlx-lm's on the same
    folder."""
    from rich.table import Table

    from .bench import run_bench

    res = run_bench(out, prompt, tokens, peers=not no_peers, options=backend_options(**runtime))
    if as_json:
        emit_json(res)
        return
    runs = {k: v for k, v in res.items() if k in ("edgec", "mlx_lm")}
    t = Table(title=f"{out} ({res['target']}): prompt {prompt}, decode {tokens}")
    t.add_column("measure")
    for k in runs:
        t.add_column(k.replace("_", "-"), justify="right")
    mib = lambda v: f"{v / 2**20:.0f} MiB"
    for key, label, fmt in (("load_s", "load", "{:.2f} s"), ("ttft_s", "time to first token", "{:.2f} s"),
                            ("prefill_tok_s", "prefill tok/s", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.2f}"),
                            ("rss_after_load_bytes", "RSS after load", None), ("peak_rss_bytes", "peak RSS", None)):
        cells = []
        for r in runs.values():
            v = r.get(key)
            cells.append(r.get("error", "-") if v is None else mib(v) if fmt is None else fmt.format(v))
        t.add_row(label, *cells)
    plan = res["edgec"].get("plan")
    if plan:
        t.add_row("plan (weights + KV + per step)", mib(plan["total_bytes"]), *[""] * (len(runs) - 1))
    stderr.print(t)


# ---- parity ---------------------------------------------------------------------------------------------------
@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="JSON list of prompts: strings, token-id lists or conversations")
@click.option("--positions", type=click.IntRange(min=1), help="length of the long pseudo-random sequence (default 320)")
@click.option("--tokens", type=click.IntRange(min=0), default=8, show_default=True, help="greedy continuation steps")
@click.option("--max-abs", type=float, help="override: max |diff| of logits")
@click.option("--mean-abs", type=float, help="override: mean |diff|")
@click.option("--min-cosine", type=float, help="override: minimum cosine")
@click.option("--top1", type=float, help="override: minimum top-1 agreement (0..1)")
@click.option("--max-kl", type=float, help="override: maximum KL divergence")
@click.option("--greedy", "greedy_min", type=float, help="override: minimum greedy-continuation match (0..1)")
@click.option("--verify-hashes", is_flag=True,
              help="check the sha256 of every file OUT's edgec.json records (default: sizes, headers, small files)")
@click.option("--browser", is_flag=True,
              help="run OUT (onnx-webgpu) in headless Chromium on onnxruntime-web's WebGPU EP instead of its runtime")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="where OUT's merged adapters are now, in order (default: the paths its edgec.json records)")
@click.option("--no-adapters", is_flag=True, help="the reference is SRC without OUT's adapters (how far they moved it)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON on stdout")
@click.option("--report", "report_file", type=click.Path(path_type=Path), help="write the JSON report to a file")
@click.option("--junit", "junit_file", type=click.Path(path_type=Path), help="write a JUnit XML report")
@with_options(backend_flags())
def parity(src: Path, out: Path, prompts_file, positions, tokens, max_abs, mean_abs, min_cosine, top1, max_kl,
           greedy_min, verify_hashes, browser, adapters, no_adapters, as_json, report_file, junit_file,
           **runtime) -> None:
    """Check that OUT (an edgec output) computes what SRC (the source checkpoint, HF or original/, a folder or a
    Hugging Face id) computes, with the LoRA adapters OUT merged (edgec.json records them, sha256 checked).
    Exit 1 on failure (a non-finite logit always fails)."""
    from .errors import ParityFailure
    from .hub import source_path
    from .parity import json_safe, junit_xml, render, run_parity

    src = source_path(src)

    overrides = {"max_abs": max_abs, "mean_abs": mean_abs, "min_cosine": min_cosine, "top1": top1, "max_kl": max_kl,
                 "greedy": greedy_min}
    report = run_parity(src, out, prompts_file, positions, tokens, overrides, full_verify=verify_hashes,
                        progress=True, options=backend_options(**runtime), browser=browser,
                        adapters=list(adapters), no_adapters=no_adapters)
    text = json.dumps(json_safe(report), indent=2)
    try:
        if report_file:
            Path(report_file).write_text(text + "\n")
        if junit_file:
            Path(junit_file).write_text(junit_xml(report))
    except OSError as e:
        raise EdgecError(f"{e.filename}: cannot write the report ({e.strerror})") from None
    if as_json:
        click.echo(text)
    render(report)
    if not report["passed"]:
        raise ParityFailure(f"{out}: parity failed against {src}: " + "; ".join(report["failures"]))


def _register_commands() -> None:
    """Commands that live in their own modules (each imports its heavy dependencies lazily)."""
    from .harmony import cli as harmony_cli
    from .runtime import cli as runtime_cli
    from .serve import cli as serve_cli
    from .web import cli as web_cli

    for m in (harmony_cli, runtime_cli, serve_cli, web_cli):
        for cmd in m.COMMANDS:
            main.add_command(cmd)


_register_commands()
