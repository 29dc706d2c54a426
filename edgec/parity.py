"""`edgec parity SRC OUT`: does a converted model compute what the source checkpoint computes?

The numpy reference runs on the source, the target's own runtime on the converted folder, over a prompt set;
per prompt we compare logits at every position (max/mean |diff|, cosine, top-1 agreement, KL) and greedy
continuations. Thresholds come from the target profile for the folder's recipe (overridable by flags).
Exit 0 pass, 1 parity failure, 2 bad input.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import click
import numpy as np

from .errors import EdgecError, ParityFailure
from .runtime.cli import backend_flags, backend_options, with_options
from .spec import load_json

METRICS = ("max_abs", "mean_abs", "min_cosine", "top1", "max_kl", "greedy")
# threshold direction: value must be <= bound ("max") or >= bound ("min")
DIRECTION = {"max_abs": "max", "mean_abs": "max", "min_cosine": "min", "top1": "min", "max_kl": "max", "greedy": "min"}
DEFAULT_THRESHOLDS = {"max_abs": 1e-2, "mean_abs": 1e-3, "min_cosine": 0.9999, "top1": 1.0, "max_kl": 1e-4,
                      "greedy": 1.0}


@dataclass
class PromptResult:
    name: str
    positions: int
    max_abs: float
    mean_abs: float
    min_cosine: float
    top1: float
    max_kl: float
    greedy: float
    greedy_ref: list[int] = field(default_factory=list)
    greedy_target: list[int] = field(default_factory=list)


def compare(ref: np.ndarray, out: np.ndarray, rows: int = 32) -> dict[str, float]:
    """Logit metrics over positions: ref and out are [positions, vocab] (float64 math, in row chunks)."""
    mx_abs, sum_abs, min_cos, top1, max_kl = 0.0, 0.0, 1.0, 0, 0.0
    for s in range(0, ref.shape[0], rows):
        r, o = ref[s : s + rows].astype(np.float64), out[s : s + rows].astype(np.float64)
        d = np.abs(r - o)
        mx_abs, sum_abs = max(mx_abs, float(d.max())), sum_abs + float(d.sum())
        cos = (r * o).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-30)
        min_cos = min(min_cos, float(cos.min()))
        top1 += int((r.argmax(-1) == o.argmax(-1)).sum())
        lp = r - r.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        lq = o - o.max(-1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        max_kl = max(max_kl, float((np.exp(lp) * (lp - lq)).sum(-1).max()))
    return {"max_abs": mx_abs, "mean_abs": sum_abs / ref.size, "min_cosine": min_cos, "top1": top1 / ref.shape[0],
            "max_kl": max(max_kl, 0.0)}


def greedy(backend: Any, ids: list[int], steps: int, first: np.ndarray) -> list[int]:
    """Greedy continuation from a prefilled backend whose last logits are `first` [V]."""
    out: list[int] = []
    logits = first
    for _ in range(steps):
        tok = int(np.argmax(logits))
        out.append(tok)
        if len(out) < steps:
            logits = backend.forward([tok])[-1]
    return out


def builtin_prompts(folder: Path, long_positions: int | None) -> list[dict[str, Any]]:
    """Harmony-rendered prompts (system + developer + user, a tool round trip, multi-turn) and a long sequence."""
    from .harmony import builtin_parity_conversations, render_conversation
    from .harmony.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    prompts = [{"name": name, "ids": render_conversation(conv, tok)} for name, conv in builtin_parity_conversations()]
    rng = np.random.default_rng(1234)
    n = long_positions or 320  # past the 128-token sliding window by default
    prompts.append({"name": f"random-{n}", "ids": [int(t) for t in rng.integers(0, 199998, size=n)]})
    return prompts


def load_prompts(path: Path, folder: Path) -> list[dict[str, Any]]:
    """User prompts: a JSON list of strings (user messages), token-id lists, or {name, ids|text|messages}."""
    from .harmony import conversation_from_json, render_conversation
    from .harmony.tokenizer import Tokenizer

    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EdgecError(f"{path}: cannot read prompts ({e})") from None
    if not isinstance(items, list) or not items:
        raise EdgecError(f"{path}: expected a non-empty JSON list of prompts")
    tok = None
    out = []
    for i, item in enumerate(items):
        name = f"prompt-{i}"
        if isinstance(item, dict):
            name = str(item.get("name", name))
            item = item.get("ids") or item.get("text") or item.get("messages")
        if isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            ids = item
        else:
            tok = tok or Tokenizer.from_folder(folder)
            conv = [{"role": "user", "content": item}] if isinstance(item, str) else item
            try:
                ids = render_conversation(conversation_from_json(conv), tok)
            except (ValueError, TypeError, KeyError) as e:
                raise EdgecError(f"{path}: prompt {i}: not a string, token list or conversation ({e})") from None
        out.append({"name": name, "ids": ids})
    return out


def thresholds_for(profile: dict[str, Any], recipe: dict[str, Any], precision: str | None = None) -> dict[str, float]:
    """Profile thresholds: [parity.default], then [parity.<experts>], then [parity."<dense>+<experts>"], then, for
    an lm_head quantized apart from the dense weights, [parity."<dense>+<experts>+lm_head-<lm_head>"], then for the
    runtime's precision (e.g. mlx's compute and KV dtype) [parity."<dense>+<experts>+<precision>"]."""
    p = profile.get("parity", {})
    t = dict(DEFAULT_THRESHOLDS)
    pair = f"{recipe.get('dense')}+{recipe.get('experts')}"
    for key in ("default", str(recipe.get("experts")), pair, f"{pair}+lm_head-{recipe.get('lm_head')}",
                f"{pair}+{precision}"):
        t.update({k: float(v) for k, v in p.get(key, {}).items() if k in METRICS})
    return t


def run_parity(src: Path, out: Path, prompts_file: Path | None = None, positions: int | None = None,
               tokens: int = 8, overrides: dict[str, float] | None = None,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    from .runtime.base import load_backend, target_of
    from .runtime.reference_backend import ReferenceBackend
    from .targets import load_profile

    target = target_of(out)
    if target == "source":
        raise EdgecError(f"{out}: not an edgec output (no edgec.json); convert it first with `edgec convert`")
    manifest = load_json(out / "edgec.json")
    recipe = manifest.get("recipe", {})
    ref = ReferenceBackend(src)
    if ref.ckpt.config_hash() != manifest.get("source", {}).get("config_sha256"):
        raise EdgecError(f"{out}: was converted from a different config than {src / 'config.json'}")
    prompts = load_prompts(prompts_file, src) if prompts_file else builtin_prompts(src, positions)
    longest = max(len(p["ids"]) for p in prompts) + tokens
    backend = load_backend(out, max_context=max(longest, 256), **(options or {}))
    precision = getattr(backend, "precision", None)
    thresholds = thresholds_for(load_profile(target), recipe, precision)
    thresholds.update({k: v for k, v in (overrides or {}).items() if v is not None})
    results = []
    t0 = time.perf_counter()
    for p in prompts:
        ids = p["ids"]
        ref.reset()
        backend.reset()
        r = ref.forward(ids, all_logits=True)
        o = backend.forward(ids, all_logits=True)
        m = compare(r, o)
        g_ref = greedy(ref, ids, tokens, r[-1])
        g_out = greedy(backend, ids, tokens, o[-1])
        match = next((i for i, (a, b) in enumerate(zip(g_ref, g_out, strict=True)) if a != b), len(g_ref))
        results.append(PromptResult(p["name"], len(ids), greedy=match / max(tokens, 1), greedy_ref=g_ref,
                                    greedy_target=g_out, **m))
    worst = {k: (max if DIRECTION[k] == "max" else min)(getattr(r, k) for r in results) for k in METRICS}
    failures = [f"{k} {worst[k]:.6g} {'>' if DIRECTION[k] == 'max' else '<'} {thresholds[k]:.6g}"
                for k in METRICS if (worst[k] > thresholds[k] if DIRECTION[k] == "max" else worst[k] < thresholds[k])]
    return {"source": str(src), "out": str(out), "target": target, "backend": backend.name, "recipe": recipe,
            "precision": precision,
            "thresholds": thresholds, "worst": worst, "passed": not failures, "failures": failures,
            "seconds": time.perf_counter() - t0, "prompts": [asdict(r) for r in results]}


def junit_xml(report: dict[str, Any]) -> str:
    cases = []
    for r in report["prompts"]:
        bad = [f"{k}={r[k]:.6g} (bound {report['thresholds'][k]:.6g})" for k in METRICS
               if (r[k] > report["thresholds"][k] if DIRECTION[k] == "max" else r[k] < report["thresholds"][k])]
        body = f'<failure message="{escape("; ".join(bad), {chr(34): "&quot;"})}"/>' if bad else ""
        cases.append(f'  <testcase classname="edgec.parity.{escape(report["target"])}" name="{escape(r["name"])}">'
                     f"{body}</testcase>")
    n_fail = sum("<failure" in c for c in cases)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="edgec parity {escape(report["target"])}" '
            f'tests="{len(cases)}" failures="{n_fail}" time="{report["seconds"]:.3f}">\n' + "\n".join(cases)
            + "\n</testsuite>\n")


def render(report: dict[str, Any]) -> None:
    from rich.table import Table

    from .progress import stderr

    recipe = report["recipe"]
    lm = f", lm_head {recipe['lm_head']}" if recipe.get("lm_head", recipe.get("dense")) != recipe.get("dense") else ""
    prec = f", {report['precision']}" if report.get("precision") else ""
    t = Table(title=f"parity {report['target']} ({report['backend']} runtime{prec}): dense {recipe.get('dense')}{lm}, "
                    f"experts {recipe.get('experts')}")
    for col in ("prompt", "positions", "max |diff|", "mean |diff|", "min cos", "top-1", "max KL", "greedy"):
        t.add_column(col, justify="right" if col != "prompt" else "left")
    for r in report["prompts"]:
        t.add_row(r["name"], str(r["positions"]), f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}",
                  f"{r['min_cosine']:.6f}", f"{r['top1']:.1%}", f"{r['max_kl']:.3g}", f"{r['greedy']:.0%}")
    th = report["thresholds"]
    t.add_row("[bold]bound", "", f"<= {th['max_abs']:.3g}", f"<= {th['mean_abs']:.3g}", f">= {th['min_cosine']}",
              f">= {th['top1']:.1%}", f"<= {th['max_kl']:.3g}", f">= {th['greedy']:.0%}")
    stderr.print(t)
    if report["passed"]:
        stderr.print("[bold green]PARITY PASS[/]")
    else:
        stderr.print("[bold red]PARITY FAIL:[/] " + "; ".join(report["failures"]))


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="JSON list of prompts: strings, token-id lists or conversations")
@click.option("--positions", type=int, help="length of the long pseudo-random sequence (default 320)")
@click.option("--tokens", type=int, default=8, show_default=True, help="greedy continuation steps")
@click.option("--max-abs", type=float, help="override: max |diff| of logits")
@click.option("--mean-abs", type=float, help="override: mean |diff|")
@click.option("--min-cosine", type=float, help="override: minimum cosine")
@click.option("--top1", type=float, help="override: minimum top-1 agreement (0..1)")
@click.option("--max-kl", type=float, help="override: maximum KL divergence")
@click.option("--greedy", "greedy_min", type=float, help="override: minimum greedy-continuation match (0..1)")
@click.option("--json", "json_file", type=click.Path(path_type=Path), help="write the report as JSON ('-': stdout)")
@click.option("--junit", "junit_file", type=click.Path(path_type=Path), help="write a JUnit XML report")
@with_options(backend_flags())
def parity(src: Path, out: Path, prompts_file, positions, tokens, max_abs, mean_abs, min_cosine, top1, max_kl,
           greedy_min, json_file, junit_file, **runtime) -> None:
    """Check that OUT (an edgec output) computes what SRC (the source checkpoint) computes. Exit 1 on failure."""
    overrides = {"max_abs": max_abs, "mean_abs": mean_abs, "min_cosine": min_cosine, "top1": top1, "max_kl": max_kl,
                 "greedy": greedy_min}
    report = run_parity(src, out, prompts_file, positions, tokens, overrides, backend_options(**runtime))
    if json_file:
        text = json.dumps(report, indent=2)
        click.echo(text) if str(json_file) == "-" else Path(json_file).write_text(text + "\n")
    if junit_file:
        Path(junit_file).write_text(junit_xml(report))
    render(report)
    if not report["passed"]:
        raise ParityFailure(f"{out}: parity failed against {src}: " + "; ".join(report["failures"]))


COMMANDS = [parity]
