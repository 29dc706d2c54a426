"""`edgec chat` and `edgec generate`: Harmony chat on a converted model (or a source checkpoint, numpy reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from ..errors import EdgecError
from ..progress import stderr

MAX_TOOL_ROUNDS = 8  # tool calls answered in a row before the turn is handed back to the user


def sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", type=int, default=512, show_default=True, help="tokens to generate at most"),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy"),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off"),
        click.option("--seed", type=int, default=None, help="makes sampling reproducible"),
        click.option("--max-context", type=int, default=None,
                     help="context length to plan the KV cache for (default: the model's, 131072)"),
        click.option("--kv-bits", type=click.Choice(["16", "8"]), default="16", show_default=True,
                     help="8 = 8-bit K/V in the full-attention layers (mlx target); 16 = unquantized (--kv-dtype)"),
        click.option("--kv-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="KV cache dtype (mlx target; default: the target profile's, float32)"),
        click.option("--reasoning", type=click.Choice(["low", "medium", "high"]), default="medium",
                     show_default=True),
        click.option("--system", "system", help="model identity line of the system message"),
        click.option("--developer", help="developer instructions"),
        click.option("--tools", "tools_file", type=click.Path(path_type=Path),
                     help='JSON list of functions [{"name", "description", "parameters", "mock"?}]'),
        click.option("--show-analysis", is_flag=True, help="show the model's reasoning (dimmed)"),
    ]):
        f = opt(f)
    return f


def open_session(model: Path, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                 max_context: int | None, kv_bits: str, reasoning: str, system: str | None, developer: str | None,
                 tools_file: Path | None, kv_dtype: str | None = None):
    """Plan memory, load the backend and the tokenizer, and start a ChatSession."""
    from ..harmony.tokenizer import Tokenizer
    from .base import load_backend, target_of
    from .generate import Sampling
    from .session import ChatSession, plan_memory, read_tools

    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens)
    tools, mocks = read_tools(tools_file) if tools_file else ([], {})
    target = target_of(model)
    cfg = _config_of(model)
    context = max_context or cfg.max_position_embeddings
    if not 2 <= context <= cfg.max_position_embeddings:
        raise EdgecError(f"--max-context must be between 2 and the model's {cfg.max_position_embeddings} "
                         f"(got {context})")
    kw: dict = {}
    if target == "source":
        if kv_bits == "8" or kv_dtype:
            stderr.print("[yellow]warning:[/] the numpy reference keeps no KV cache; --kv-bits/--kv-dtype are ignored")
    elif target == "mlx":
        kw = {"kv_bits": 8 if kv_bits == "8" else None, **({"kv_dtype": kv_dtype} if kv_dtype else {})}
    elif kv_bits == "8":
        raise EdgecError(f"--kv-bits 8: only the mlx target has an 8-bit KV cache (this folder is {target})")
    plan = plan_memory(model, cfg, context, int(kv_bits), kv_dtype)
    plan.check(lambda m: stderr.print(f"[yellow]warning:[/] {escape(m)}"))
    backend = load_backend(model, max_context=context, **kw)
    held = getattr(getattr(backend, "dtype", None), "__name__", None)  # ONNX: the KV dtype its graph was built with
    if kv_dtype and target not in ("source", "mlx") and held != kv_dtype:
        raise EdgecError(f"--kv-dtype {kv_dtype}: the {backend.name} runtime of this {target} folder keeps its KV "
                         f"cache in {held or 'the dtype of its graph'} (drop the option)")
    tok = Tokenizer.from_folder(model)
    return ChatSession(backend, tok, reasoning=reasoning, system=system, developer=developer, tools=tools,
                       sampling=sampling, max_context=context, mocks=mocks)


def _config_of(model: Path):
    """The model's config without loading it: edgec.json's `config` for an output folder, else the checkpoint's."""
    from ..checkpoint import Checkpoint
    from ..spec import GptOssConfig, Yarn, load_json

    if (model / "edgec.json").is_file():
        d = load_json(model / "edgec.json").get("config")
        try:
            return GptOssConfig(**{**d, "layer_types": tuple(d["layer_types"]), "yarn": Yarn(**d["yarn"])})
        except (TypeError, KeyError) as e:
            raise EdgecError(f"{model / 'edgec.json'}: unreadable model config ({e})") from None
    return Checkpoint.open(model).config


class Printer:
    """Streams Harmony events to the terminal: analysis dimmed (or hidden), final answer plain, tool calls shown."""

    def __init__(self, show_analysis: bool):
        from rich.console import Console

        self.out = Console(highlight=False, soft_wrap=True)
        self.show_analysis = show_analysis
        self.channel: str | None = None
        self.recipient: str | None = None
        self.open = False

    def __call__(self, e: Any) -> None:
        """Handle one event of `edgec.harmony.parser.StreamParser`."""
        if e.kind == "start":
            self._newline()
            self.channel, self.recipient = e.channel, e.recipient
            if self.recipient:
                self.out.print(f"→ {self.recipient} ", style="cyan", end="", markup=False)
                self.open = True
        elif e.kind == "delta":
            if self.recipient:
                self.out.print(e.text, style="cyan", end="", markup=False)
            elif self.channel == "analysis":
                if not self.show_analysis:
                    return
                self.out.print(e.text, style="dim", end="", markup=False)
            else:
                self.out.print(e.text, end="", markup=False)
            self.open = True
        elif e.kind == "done":
            self._newline()

    def _newline(self) -> None:
        if self.open:
            self.out.print()
            self.open = False


def _read_line(prompt: str) -> str | None:
    """One line from stdin (prompted on a terminal), None at EOF."""
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _run_turn(session, user: str | None, printer: Printer, stats: bool) -> None:
    """Ask (or continue after a tool result), answering tool calls from mocks or the user."""
    turn = session.ask(user, printer) if user is not None else session.respond(printer)
    printer._newline()
    for _ in range(MAX_TOOL_ROUNDS):
        if turn.dropped_turns:
            stderr.print(f"[yellow]context full: dropped the {turn.dropped_turns} oldest turn(s)[/]")
        if turn.stats.stop == "interrupted":
            stderr.print("[yellow]stopped[/]")
        if stats:
            click.echo(turn.stats.line())
        call = turn.tool_call
        if call is None:
            return
        recipient = call.recipient
        result = session.mocks.get(recipient.removeprefix("functions."))
        if result is None:
            result = _read_line(f"result of {recipient}> ")
            if result is None:
                return
        else:
            stderr.print(f"[cyan]← {escape(recipient)}[/] {escape(str(result))}", highlight=False)
        turn = session.tool_result(recipient, result, printer)
        printer._newline()


HELP = "commands: /reset  /effort low|medium|high  /save FILE  /load FILE  /stats  /exit"


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@sampling_options
@click.option("--stats", "show_stats", is_flag=True,
              help="after each turn print `prefill=N reused=M decode=K tok/s=X`")
def chat(model: Path, show_analysis: bool, show_stats: bool, **kw) -> None:
    """Chat with MODEL in Harmony format (an edgec output folder or a source checkpoint)."""
    session = open_session(model, **kw)
    printer = Printer(show_analysis)
    if sys.stdin.isatty():
        stderr.print(f"[dim]{session.backend.name} · context {session.max_context} · {HELP}[/]")
    while True:
        try:
            line = _read_line("> ")
        except KeyboardInterrupt:
            stderr.print()
            continue
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _slash(session, line):
                return
            continue
        try:
            _run_turn(session, line, printer, show_stats)
        except KeyboardInterrupt:  # outside the sampling loop (rendering, a tool prompt): the session goes on
            printer._newline()
            stderr.print("[yellow]stopped[/]")
        except EdgecError as e:  # e.g. a turn too long for the context: say so, keep the session
            printer._newline()
            stderr.print(f"[red]{escape(str(e))}[/]", highlight=False)


def _slash(session, line: str) -> bool:
    """Run a slash command; True means exit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if cmd in ("/exit", "/quit"):
            return True
        if cmd == "/reset":
            session.reset()
            stderr.print("[dim]conversation cleared[/]")
        elif cmd == "/effort":
            if arg not in ("low", "medium", "high"):
                raise EdgecError("/effort takes low, medium or high")
            session.reasoning = arg
            stderr.print(f"[dim]reasoning effort {arg}[/]")
        elif cmd == "/save":
            if not arg:
                raise EdgecError("/save needs a file name")
            session.save(Path(arg))
            stderr.print(f"[dim]saved {escape(arg)}[/]")
        elif cmd == "/load":
            if not arg:
                raise EdgecError("/load needs a file name")
            session.load(Path(arg))
            stderr.print(f"[dim]loaded {escape(arg)} ({len(session.history)} messages)[/]")
        elif cmd == "/stats":
            st = session.last.stats if session.last else None
            click.echo(json.dumps({"cached_tokens": len(session.gen.tokens), "kv_bytes": session.backend.kv_bytes(),
                                   "last_turn": st.as_dict() if st else None}))
        else:
            stderr.print(HELP)
    except EdgecError as e:
        stderr.print(f"[red]{escape(str(e))}[/]", highlight=False)
    return False


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", help="the user message")
@click.option("--conversation", type=click.Path(path_type=Path),
              help="conversation JSON: openai-harmony's to_json form, or OpenAI chat messages (a list, or a request "
                   "body with messages, tools, reasoning_effort)")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="print the parsed messages and the statistics as JSON")
def generate(model: Path, prompt: str | None, conversation: Path | None, show_analysis: bool, as_json: bool,
             **kw) -> None:
    """One completion of a prompt or a conversation."""
    from ..harmony.conversation import Message

    if (prompt is None) == (conversation is None):
        raise EdgecError("give exactly one of --prompt or --conversation")
    session = open_session(model, **kw)
    if conversation is not None:
        session.load(conversation)
        if click.get_current_context().get_parameter_source("reasoning") == click.core.ParameterSource.COMMANDLINE:
            session.reasoning = kw["reasoning"]  # an explicit --reasoning wins over the file's system message
    else:
        session.history.append(Message("user", prompt))
    printer = None if as_json else Printer(show_analysis)
    turn = session.respond(printer)
    if as_json:
        click.echo(json.dumps({
            "messages": [{"role": m.role, "channel": m.channel, "recipient": m.recipient,
                          "content_type": m.content_type, "text": m.text} for m in turn.messages],
            "tokens": turn.tokens,
            "stats": turn.stats.as_dict(),
        }, ensure_ascii=False, indent=2))
    else:
        printer._newline()
        stderr.print(f"[dim]{turn.stats.line()} stop={turn.stats.stop}[/]")


COMMANDS = [chat, generate]
