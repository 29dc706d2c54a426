"""`edgec parity SRC OUT`: does a converted model compute what the source checkpoint computes?

The numpy reference runs on the source, the target's own runtime on the converted folder, over a prompt set;
per prompt we compare logits at every position (max/mean |diff|, cosine, top-1 agreement, KL) and greedy
continuations. Thresholds come from the target profile for the folder's recipe (overridable by flags).
Exit 0 pass, 1 parity failure, 2 bad input.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from .errors import EdgecError
from .jsonio import read_json
from .spec import check_token_ids

METRICS = ("max_abs", "mean_abs", "min_cosine", "top1", "max_kl", "greedy")
# threshold direction: value must be <= bound ("max") or >= bound ("min")
DIRECTION = {"max_abs": "max", "mean_abs": "max", "min_cosine": "min", "top1": "min", "max_kl": "max", "greedy": "min"}
DEFAULT_THRESHOLDS = {"max_abs": 1e-2, "mean_abs": 1e-3, "min_cosine": 0.9999, "top1": 1.0, "max_kl": 1e-4,
                      "greedy": 1.0}


def breach(metric: str, value: float, bound: float) -> bool:
    """Whether `value` is outside `bound` (a NaN value always is)."""
    return not (value <= bound if DIRECTION[metric] == "max" else value >= bound)


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
    nonfinite: dict[str, list[int]] = field(default_factory=dict)  # "source"/"target": [count, first position]


def compare(ref: np.ndarray, out: np.ndarray, rows: int = 32) -> dict[str, float]:
    """Logit metrics over positions: ref and out are [positions, vocab] (float64 math, in row chunks). A
    non-finite logit makes the metrics NaN, never a clean-looking 0 or 1."""
    mx_abs, sum_abs, min_cos, top1, max_kl = [], 0.0, [], 0, []
    with np.errstate(invalid="ignore", over="ignore"):
        for s in range(0, ref.shape[0], rows):
            r, o = ref[s : s + rows].astype(np.float64), out[s : s + rows].astype(np.float64)
            d = np.abs(r - o)
            mx_abs.append(d.max())
            sum_abs += float(d.sum())
            cos = (r * o).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-30)
            min_cos.append(cos.min())
            top1 += int((r.argmax(-1) == o.argmax(-1)).sum())
            lp = r - r.max(-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
            lq = o - o.max(-1, keepdims=True)
            lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
            max_kl.append((np.exp(lp) * (lp - lq)).sum(-1).max())
    return {"max_abs": float(np.max(mx_abs)), "mean_abs": sum_abs / ref.size, "min_cosine": float(np.min(min_cos)),
            "top1": top1 / ref.shape[0], "max_kl": float(np.maximum(np.max(max_kl), 0.0))}


def nonfinite(logits: np.ndarray) -> list[int] | None:
    """[count, first position] of the non-finite logits, or None when all are finite."""
    bad = ~np.isfinite(logits)
    return [int(bad.sum()), int(np.argmax(bad.any(-1)))] if bad.any() else None


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

    items = read_json(path)
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
    runtime's precision (e.g. mlx's compute and KV dtype) [parity."<dense>+<experts>+<precision>"]; for experts
    quantized at convert time from a 16-bit source, per metric the looser of that and [parity."<experts>-from-16bit"]
    (the quantizer's error adds to the recipe's)."""
    p = profile.get("parity", {})
    t = dict(DEFAULT_THRESHOLDS)
    pair = f"{recipe.get('dense')}+{recipe.get('experts')}"
    for key in ("default", str(recipe.get("experts")), pair, f"{pair}+lm_head-{recipe.get('lm_head')}",
                f"{pair}+{precision}"):
        t.update({k: float(v) for k, v in p.get(key, {}).items() if k in METRICS})
    if recipe.get("experts_from"):  # experts quantized from a 16-bit source: the looser of the two, per metric
        for k, v in p.get(f"{recipe.get('experts')}-from-16bit", {}).items():
            if k in METRICS:
                t[k] = max(t[k], float(v)) if DIRECTION[k] == "max" else min(t[k], float(v))
    return t


def run_parity(src: Path, out: Path, prompts_file: Path | None = None, positions: int | None = None,
               tokens: int = 8, overrides: dict[str, float] | None = None, full_verify: bool = False,
               progress: bool = False, options: dict[str, Any] | None = None, browser: bool = False,
               adapters: list[Path] | None = None, no_adapters: bool = False) -> dict[str, Any]:
    """Compare OUT's runtime with the numpy reference on SRC (either layout of the same model) over the prompts;
    `browser`: OUT's onnx-webgpu graph in headless Chromium (edgec/web/runner.py) instead of its runtime.
    The reference is the model OUT was made from: SRC with the LoRA adapters OUT's manifest lists merged, read
    again from their recorded paths (or `adapters`, in the same order) and checked by sha256; `no_adapters`: SRC
    as it is (how far the adapters moved the model)."""
    from . import manifest as mf
    from .convert.adapter import recorded_adapters
    from .runtime.base import load_backend
    from .runtime.reference_backend import ReferenceBackend

    if not (Path(out) / mf.NAME).is_file():
        raise EdgecError(f"{out}: not an edgec output (no edgec.json); convert it first with `edgec convert`")
    m = mf.verify(out, full=full_verify)
    ref = ReferenceBackend(src)
    if ref.config != m.config:
        theirs = m.config.as_dict()
        diff = [f"{k} {v} vs {theirs[k]}" for k, v in ref.config.as_dict().items() if v != theirs[k]]
        raise EdgecError(f"{out}: was converted from another model than {src} ({', '.join(diff)})")
    if adapters and not m.adapters:
        raise EdgecError(f"{out}: merged no adapter (its edgec.json lists none), --adapter has nothing to check")
    if m.adapters and not no_adapters:
        ref.ckpt.adapters = recorded_adapters(list(m.adapters), ref.config, str(Path(out) / mf.NAME), adapters)
    tok_folder = ref.ckpt.tokenizer_folder() or out  # beside the weights, above original/, or the copy in OUT
    prompts = load_prompts(prompts_file, tok_folder) if prompts_file else builtin_prompts(tok_folder, positions)
    for p in prompts:
        try:
            check_token_ids(p["ids"], m.config.vocab_size)
        except EdgecError as e:
            raise EdgecError(f"{prompts_file}: prompt {p['name']}: {e}") from None
    longest = max(len(p["ids"]) for p in prompts) + tokens
    with contextlib.ExitStack() as stack:
        if browser:
            from .web.runner import open_browser

            backend = stack.enter_context(open_browser(out, m, max(longest, 256)))
        else:
            backend = load_backend(out, max_context=max(longest, 256), **(options or {}))
        report = _run(ref, backend, m, prompts, tokens, overrides, progress)
    report = {"source": str(src), "out": str(out), "adapters": [str(a.path) for a in ref.ckpt.adapters], **report}
    if browser:
        from .web.runner import placement_failures

        info = backend.info
        report.update(runtime="onnxruntime-web", variant=backend.precision or info["variant"], adapter=info["adapter"],
                      nodes_total=info["nodesTotal"], nodes_on_webgpu=info["nodesOnWebgpu"])
        report["failures"] += placement_failures(info["placement"])
        report["passed"] = not report["failures"]
    return report


def _run(ref: Any, backend: Any, m: Any, prompts: list[dict[str, Any]], tokens: int,
         overrides: dict[str, float] | None, progress: bool) -> dict[str, Any]:
    from .targets import load_profile

    precision = getattr(backend, "precision", None)
    thresholds = thresholds_for(load_profile(m.target), m.recipe, precision)
    thresholds.update({k: v for k, v in (overrides or {}).items() if v is not None})
    results = []
    t0 = time.perf_counter()
    with prompt_progress(len(prompts), progress) as step:
        for p in prompts:
            step(p["name"], len(p["ids"]))
            results.append(compare_prompt(ref, backend, p, tokens))
    worst = {k: float((np.max if DIRECTION[k] == "max" else np.min)([getattr(r, k) for r in results]))
             for k in METRICS}
    failures = [f"{k} {worst[k]:.6g} {'>' if DIRECTION[k] == 'max' else '<'} {thresholds[k]:.6g}"
                for k in METRICS if breach(k, worst[k], thresholds[k])]
    failures += [f"prompt {r.name}: {n} non-finite logits from the {side} (first at position {pos})"
                 for r in results for side, (n, pos) in r.nonfinite.items()]
    return {"target": m.target, "backend": backend.name, "recipe": m.recipe,
            "precision": precision,
            "thresholds": thresholds, "worst": worst, "passed": not failures, "failures": failures,
            "seconds": time.perf_counter() - t0, "prompts": [asdict(r) for r in results]}


def compare_prompt(ref: Any, backend: Any, prompt: dict[str, Any], tokens: int) -> PromptResult:
    """Logits of both at every position of the prompt, then both greedy continuations."""
    ids = prompt["ids"]
    ref.reset()
    backend.reset()
    with np.errstate(all="ignore"):  # non-finite weights are reported below, not as numpy warnings
        r = ref.forward(ids, all_logits=True)
        o = backend.forward(ids, all_logits=True)
        g_ref = greedy(ref, ids, tokens, r[-1])
        g_out = greedy(backend, ids, tokens, o[-1])
    match = next((i for i, (a, b) in enumerate(zip(g_ref, g_out, strict=True)) if a != b), len(g_ref))
    bad = {side: nf for side, x in (("source", r), ("target", o)) if (nf := nonfinite(x))}
    return PromptResult(prompt["name"], len(ids), greedy=match / max(tokens, 1), greedy_ref=g_ref,
                        greedy_target=g_out, nonfinite=bad, **compare(r, o))


@contextmanager
def prompt_progress(total: int, enabled: bool) -> Iterator[Callable[[str, int], None]]:
    """`step(name, positions)` per prompt: a rich bar on stderr (the reference takes seconds per prompt)."""
    if not enabled:
        yield lambda name, n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .progress import stderr

    with Progress(TextColumn("[bold]parity[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task("", total=total)
        started = False

        def step(name: str, n: int) -> None:
            nonlocal started
            if started:
                bar.advance(task)
            started = True
            bar.update(task, description=f"{name} ({n} positions)")

        yield step
        bar.advance(task)


def junit_xml(report: dict[str, Any]) -> str:
    cases = []
    for r in report["prompts"]:
        bad = [f"{k}={r[k]:.6g} (bound {report['thresholds'][k]:.6g})" for k in METRICS
               if breach(k, r[k], report["thresholds"][k])]
        bad += [f"{n} non-finite logits from the {side}" for side, (n, _) in r["nonfinite"].items()]
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
    ads = f"; reference + adapters {', '.join(Path(a).name for a in report['adapters'])}" if report.get(
        "adapters") else ""
    t = Table(title=f"parity {report['target']} ({report['backend']} runtime{prec}): dense {recipe.get('dense')}{lm}, "
                    f"experts {recipe.get('experts')}{ads}")
    for col in ("prompt", "positions", "max |diff|", "mean |diff|", "min cos", "top-1", "max KL", "greedy"):
        t.add_column(col, justify="right" if col != "prompt" else "left")
    for r in report["prompts"]:
        name = r["name"] + "".join(f" [red]({n} non-finite in {side})[/]" for side, (n, _) in r["nonfinite"].items())
        t.add_row(name, str(r["positions"]), f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}",
                  f"{r['min_cosine']:.6f}", f"{r['top1']:.1%}", f"{r['max_kl']:.3g}", f"{r['greedy']:.0%}")
    th = report["thresholds"]
    t.add_row("[bold]bound", "", f"<= {th['max_abs']:.3g}", f"<= {th['mean_abs']:.3g}", f">= {th['min_cosine']}",
              f">= {th['top1']:.1%}", f"<= {th['max_kl']:.3g}", f">= {th['greedy']:.0%}")
    stderr.print(t)
    if report.get("runtime") == "onnxruntime-web":
        a = report["adapter"]
        stderr.print(f"WebGPU adapter {a.get('vendor')}/{a.get('architecture')} ({report['variant']} variant): "
                     f"{report['nodes_on_webgpu']} of {report['nodes_total']} nodes on WebGPU", highlight=False)
    if report["passed"]:
        stderr.print("[bold green]PARITY PASS[/]")
    else:
        stderr.print("[bold red]PARITY FAIL:[/] " + "; ".join(report["failures"]))


def json_safe(obj: Any) -> Any:
    """The report with NaN/Inf as null, so `--json` output is standard JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
