"""`edgec chat` and `edgec generate`: Harmony chat on a converted model (or a source checkpoint, numpy reference)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from ..errors import EdgecError, Interrupted
from ..progress import stderr

MAX_TOOL_ROUNDS = 8  # tool calls answered in a row before the turn is handed back to the user


def sampling_options(f=None, *, conversation: bool = True):
    """The sampling, runtime and conversation options of chat and generate; serve (`conversation=False`) takes
    neither the instructions nor the tools (a request carries its own) nor --show-analysis."""
    def add(f):
        for opt in reversed([
            click.option("--max-tokens", type=int, default=None,
                         help="tokens to generate at most, reasoning included (default: 2048 at low effort, 8192 at "
                              "medium, 32768 at high; at most half the context)"),
            click.option("--temperature", "--temp", type=float, default=1.0, show_default=True, help="0 = greedy"),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--top-k", type=int, default=0, show_default=True, help="0 = off"),
            click.option("--seed", type=int, default=None, help="makes sampling reproducible"),
            *runtime_options(),
            click.option("--hosts", type=click.Path(path_type=Path), default=None,
                         help="pipeline-parallel over these hosts (mlx.launch's hostfile; MLX folders): edgec "
                              "re-runs itself on every host via mlx.launch, rank 0 talks to you"),
            click.option("--dist-backend", type=click.Choice(["ring", "jaccl", "mpi"]), default="ring",
                         show_default=True, help="mlx.distributed backend for --hosts"),
            click.option("--reasoning", type=click.Choice(["low", "medium", "high"]), default="medium",
                         show_default=True),
            click.option("--identity", "system", help="the model identity line of Harmony's system message "
                                                      "(default: You are ChatGPT, a large language model trained by "
                                                      "OpenAI.)"),
            *([click.option("--developer", "--system", "developer",
                            help="instructions for the model: the developer message, which is where gpt-oss's chat "
                                 "template puts a system prompt"),
               click.option("--tools", "tools_file", type=click.Path(path_type=Path),
                            help='JSON list of functions [{"name", "description", "parameters", "mock"?}]'),
               click.option("--show-analysis", is_flag=True, help="show the model's reasoning (dimmed)")]
              if conversation else []),
        ]):
            f = opt(f)
        return f

    return add(f) if f is not None else add


def runtime_options() -> list:
    """The options of the memory plan and of the runtime (`backend_flags`), shared by chat and generate."""
    return [
        click.option("--max-context", "--max-kv-size", type=int, default=None,
                     help="context length to plan the KV cache for (default: the largest that fits the device's "
                          "memory, up to the model's 131072)"),
        click.option("--memory-budget", default=None,
                     help="memory the model may use, e.g. 10.7GB (default: what the device can give: Metal's "
                          "recommended working set, free GPU memory, or available RAM)"),
        *backend_flags(),
    ]


def backend_flags() -> list:
    """The runtime's own options (chat, generate, bench, parity). Each backend declares which it takes
    (`Backend.options`); one it cannot run is refused naming what it can."""
    return [
        click.option("--compute", type=click.Choice(["float16", "bfloat16", "float32", "float32-upcast"]),
                     default=None, help="mlx: how bf16 matrices are multiplied (default per device in the "
                                        "profile: float16 on a GPU, float32 on the CPU; float32-upcast holds float32 "
                                        "copies, for parity work)"),
        click.option("--device", type=click.Choice(["gpu", "cpu"]), default=None,
                     help="mlx: the device to run on (default: the GPU when MLX has one)"),
        click.option("--kv-bits", type=click.Choice(["16", "8"]), default=None,
                     help="8 = 8-bit K/V in the full-attention layers (mlx); 16 = unquantized (--kv-dtype)"),
        click.option("--kv-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
                     help="KV cache dtype (mlx; default per device in the profile: float16)"),
        click.option("--cpu-moe", type=int, default=None,
                     help="mlx: run the experts of the first N layers on the CPU (llama.cpp's --n-cpu-moe)"),
    ]


def with_options(options: list):
    """Decorator applying click options in order."""
    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


def backend_options(kv_bits: str | None = None, kv_dtype: str | None = None, compute: str | None = None,
                    device: str | None = None, cpu_moe: int | None = None) -> dict:
    """The runtime options a user gave (None: not given), as backends name them."""
    return {"kv_bits": int(kv_bits) if kv_bits else None, "kv_dtype": kv_dtype, "compute": compute,
            "device": device, "cpu_moe": cpu_moe}


def plan_context(model: Path, max_context: int | None, memory_budget: str | None, options: dict,
                 say=None) -> tuple[int, dict]:
    """Check the options against the folder's backend and choose the context from the memory plan: the largest
    that fits the device's budget (up to the model's maximum) unless --max-context; say what was planned."""
    from ..memory import fit_context, parse_size
    from .base import backend_class, config_of

    cls, target = backend_class(model)
    opts = cls.check_options(model, options)
    cfg = config_of(model)
    limit = cfg.max_position_embeddings
    if max_context is not None and not 2 <= max_context <= limit:
        raise EdgecError(f"--max-context must be between 2 and the model's {limit} (got {max_context})")
    budget = cls.budget({**cls.defaults(model), **opts}, parse_size(memory_budget) if memory_budget else None)
    context, line = fit_context(lambda c: cls.plan_folder(model, c, **opts), budget, limit, max_context,
                                lambda: _recipes(cls, model, target, cfg, budget, {**cls.defaults(model), **opts}))
    (say or (lambda m: stderr.print(f"[dim]{escape(m)}[/]", highlight=False)))(line)
    return context, opts


def _recipes(cls, model: Path, target: str, cfg, budget, opts: dict) -> list[str]:
    """What would fit when the folder's weights do not: the experts of N layers on the CPU (mlx on a GPU, unified
    memory), else the target's other recipes, priced the same way."""
    from ..jsonio import load_json
    from ..memory import MIN_CONTEXT, gib, plan_recipe
    from ..targets import load_profile

    if target == "source":
        return []
    if opts.get("device") == "gpu" and "cpu_moe" in cls.options(model) and not opts.get("cpu_moe"):
        for n in range(1, cfg.num_hidden_layers + 1):
            p = cls.plan_folder(model, MIN_CONTEXT, **{**opts, "cpu_moe": n})
            if p.device_total <= (budget.bytes or 0):
                return [f"--cpu-moe {n} (the experts of {n} layers on the CPU side of unified memory, as llama.cpp's "
                        f"--n-cpu-moe) leaves {gib(p.device_total)} on the GPU at {MIN_CONTEXT} tokens"]
    profile = load_profile(target)
    recipe = load_json(model / "edgec.json").get("recipe") or {}
    have = (recipe.get("dense"), recipe.get("experts"))
    priced = []
    for d in (profile.get("dense") or {}).get("supported", []):
        for e in (profile.get("experts") or {}).get("supported", []):
            p = None if (d, e) == have else plan_recipe(profile, cfg, MIN_CONTEXT, d, e, **opts)
            if p is not None:
                priced.append((p.device_total <= (budget.bytes or 0), f"--dense {d} --experts {e}: {gib(p.total)}"))
    fit = [s for ok, s in priced if ok]
    if fit:
        return [f"converting with {' or '.join(fit)} at {MIN_CONTEXT} tokens would fit"]
    others = "; ".join(s for _, s in priced)
    return [f"no recipe of target {target} fits at {MIN_CONTEXT} tokens ({others or 'it has no other'})"]


def open_session(model: Path, max_tokens: int | None, temperature: float, top_p: float, top_k: int, seed: int | None,
                 max_context: int | None, reasoning: str, system: str | None, developer: str | None = None,
                 tools_file: Path | None = None, memory_budget: str | None = None, say=None,
                 hosts: Path | None = None, dist_backend: str = "ring", **runtime: Any):
    """Plan memory (choosing the context), load the backend and the tokenizer, and start a ChatSession."""
    from ..harmony.tokenizer import Tokenizer
    from .base import load_backend
    from .generate import Sampling
    from .session import ChatSession, read_tools

    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                        max_tokens=1 if max_tokens is None else max_tokens)  # None: the session sets it by effort
    tools, mocks = read_tools(tools_file) if tools_file else ([], {})
    if hosts is not None:
        from .pipeline import open_stage

        backend, context = open_stage(model, hosts, dist_backend, max_context, say, backend_options(**runtime))
    else:
        context, opts = plan_context(model, max_context, memory_budget, backend_options(**runtime), say)
        backend = load_backend(model, max_context=context, **opts)
    tok = Tokenizer.from_folder(model)
    return ChatSession(backend, tok, reasoning=reasoning, system=system, developer=developer, tools=tools,
                       sampling=sampling, max_context=context, mocks=mocks, auto_max_tokens=max_tokens is None)


class Printer:
    """Streams Harmony events to the terminal: the final answer plain, tool calls cyan, the analysis dimmed with
    --show-analysis and otherwise hidden behind a live "thinking… N tokens" line on stderr (terminals only: it is
    erased when the answer starts, and never reaches a pipe or stdout)."""

    def __init__(self, show_analysis: bool, tokens: Callable[[], int] | None = None, out: Any = None,
                 err: Any = None):
        from rich.console import Console

        self.out = out or Console(highlight=False, soft_wrap=True)
        self.err = err or stderr
        self.show_analysis = show_analysis
        self.tokens = tokens  # tokens generated so far in this reply (default: hidden analysis deltas seen)
        self.channel: str | None = None
        self.recipient: str | None = None
        self.open = False
        self.hidden = 0
        self.live: Any = None

    def __call__(self, e: Any) -> None:
        """Handle one event of `edgec.harmony.parser.StreamParser`."""
        if e.kind == "start":
            self._newline()
            self.channel, self.recipient = e.channel, e.recipient
            if self._hidden():
                self._thinking()
                return
            self._stop_thinking()
            if self.recipient:
                self.out.print(f"→ {self.recipient} ", style="cyan", end="", markup=False)
                self.open = True
        elif e.kind == "delta":
            if self._hidden():
                self.hidden += 1
                self._thinking()
                return
            style = "cyan" if self.recipient else "dim" if self.channel == "analysis" else None
            self.out.print(e.text, style=style, end="", markup=False)
            self.open = True
        elif e.kind == "done":
            self._newline()

    def end(self) -> None:
        """The reply is over (or was stopped): erase the thinking line, end the answer's line."""
        self._stop_thinking()
        self._newline()
        self.hidden = 0

    def _hidden(self) -> bool:
        return self.channel == "analysis" and not self.recipient and not self.show_analysis

    def _thinking(self) -> None:
        if not self.err.is_terminal:
            return
        from rich.text import Text

        text = Text(f"thinking… {self.tokens() if self.tokens else self.hidden} tokens", style="dim")
        if self.live is None:
            from rich.live import Live
            from rich.spinner import Spinner

            self.spinner = Spinner("dots", text, style="dim")
            self.live = Live(self.spinner, console=self.err, transient=True, refresh_per_second=8,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        self.spinner.update(text=text)
        self.live.refresh()

    def _stop_thinking(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _newline(self) -> None:
        if self.open:
            self.out.print()
            self.open = False


def cut_off(turn, session, lower_effort: str) -> str | None:
    """One line when a reply stopped at --max-tokens or the context's end, naming what to raise; None otherwise."""
    st = turn.stats
    if st.stop not in ("max_tokens", "context"):
        return None
    if st.stop == "max_tokens":
        raise_ = f"raise --max-tokens (now {session.sampling.max_tokens})"
    else:
        raise_ = f"the context is full: raise --max-context (now {session.max_context})"
    if all(m.channel == "analysis" for m in turn.messages):
        hint = f" or lower the effort ({lower_effort})" if session.reasoning != "low" else ""
        return f"the reply stopped while thinking, before any answer ({st.decode} tokens): {raise_}{hint}"
    return f"the answer was cut off after {st.decode} tokens: {raise_}"


class PipeReader:
    """Lines from a pipe or a file, as they are (scripted chats)."""

    interactive = False

    def __call__(self, prompt: str) -> str | None:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")


class TerminalReader:
    """Terminal input through prompt_toolkit (Windows consoles too): line editing, history (up/down), and multi-line
    input by pasting (bracketed paste), Esc+Enter (or Meta+Enter), or a line ending in a backslash."""

    interactive = True

    def __init__(self, input: Any = None, output: Any = None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        kb = KeyBindings()

        @kb.add("enter")
        def _enter(event) -> None:
            buf = event.current_buffer
            if buf.document.is_cursor_at_the_end and buf.text.endswith("\\"):
                buf.delete_before_cursor(1)
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        if output is None and input is None and not sys.stdout.isatty():  # stdout redirected: prompt on stderr
            from prompt_toolkit.output import create_output

            output = create_output(stdout=sys.stderr)
        self.session = PromptSession(history=InMemoryHistory(), key_bindings=kb, input=input, output=output,
                                     prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ")

    def __call__(self, prompt: str) -> str | None:
        try:
            return self.session.prompt(prompt)
        except EOFError:  # Ctrl-D (prompt_toolkit ends the prompt's line itself)
            return None


def line_reader() -> PipeReader | TerminalReader:
    return TerminalReader() if sys.stdin.isatty() else PipeReader()


def say(text: str, style: str = "dim") -> None:
    """One line on stderr, never wrapped (logs and tests read it whole)."""
    stderr.print(f"[{style}]{escape(text)}[/]", highlight=False, soft_wrap=True)


def _run_turn(session, user: str | None, printer: Printer, stats: bool, read) -> None:
    """Ask (or continue after a tool result), answering tool calls from mocks or the user."""
    turn = session.ask(user, printer) if user is not None else session.respond(printer)
    for _ in range(MAX_TOOL_ROUNDS):
        printer.end()
        if turn.dropped_turns:
            stderr.print(f"[yellow]context full: dropped the {turn.dropped_turns} oldest turn(s)[/]")
        if turn.stats.stop == "interrupted":
            stderr.print("[yellow]stopped[/]")
        if note := cut_off(turn, session, "/effort low"):
            say(note, "yellow")
        if stats:
            click.echo(turn.stats.line())
        call = turn.tool_call
        if call is None:
            return
        recipient = call.recipient
        result = session.mocks.get(recipient.removeprefix("functions."))
        if result is None:
            result = read(f"result of {recipient}> ")
            if result is None:
                return
        else:
            stderr.print(f"[cyan]← {escape(recipient)}[/] {escape(str(result))}", highlight=False)
        turn = session.tool_result(recipient, result, printer)


HELP = "commands: /reset  /effort [low|medium|high]  /save FILE  /load FILE  /schema FILE|off  /stats  /exit"
MULTILINE = "multi-line: paste, Esc+Enter, or end a line with \\"


def model_argument(f):
    """MODEL (a folder or a Hugging Face id) and --target, for chat and generate."""
    f = click.option("--target", "-t", help="with a Hugging Face id: convert it once for this target (e.g. mlx) into "
                                            "edgec's cache, and run that")(f)
    return click.argument("model")(f)


def resolve(model: str, target: str | None) -> Path:
    """The folder to open for MODEL, with a warning when it is a source checkpoint (the slow numpy reference)."""
    from ..hub import is_hub_id, resolve_model
    from .base import target_of

    folder = resolve_model(model, target, announce=lambda m: say(m, "cyan"))
    if target_of(folder) == "source":
        suggest = "onnx-cpu" if sys.platform == "win32" else "mlx"
        if is_hub_id(model):
            fast = f"edgec chat {model} --target {suggest}"
        else:
            fast = f"edgec convert {model} --target {suggest} -o {Path(model).name}-{suggest}"
        say(f"warning: {model} is a source checkpoint: it runs on the numpy reference, which recomputes the whole "
            f"sequence for every token (about 1 token/s on the small preset, slower for bigger models). For a fast "
            f"runtime: {fast}", "yellow")
    return folder


@click.command()
@model_argument
@sampling_options
@click.option("--stats", "show_stats", is_flag=True,
              help="after each turn print `prefill=N reused=M decode=K tok/s=X`")
@click.option("--think-tokens", type=int, default=None,
              help="with /schema: end the analysis after this many tokens")
def chat(model: str, target: str | None, show_analysis: bool, show_stats: bool, think_tokens: int | None,
         **kw) -> None:
    """Chat with MODEL in Harmony format: an edgec output folder, a source checkpoint (the numpy reference: slow),
    or a Hugging Face id in the local cache (e.g. openai/gpt-oss-20b; --target converts it once)."""
    session = open_session(resolve(model, target), **kw)
    session.think_tokens = think_tokens
    if kw.get("hosts"):  # rank 0 (the others serve their stage inside open_session)
        from . import pipeline

        pipeline.ON_DOWN.append(lambda: rescue(session))
    printer = Printer(show_analysis, tokens=lambda: session.gen.stats.decode)
    read = line_reader()
    if read.interactive:
        say(f"{session.backend.name} · context {session.max_context} · reasoning {session.reasoning} · {HELP} · "
            f"{MULTILINE}")
    while True:
        try:
            line = read("> ")
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
            _run_turn(session, line, printer, show_stats, read)
        except KeyboardInterrupt:  # outside the sampling loop (rendering, a tool prompt): the session goes on
            printer.end()
            stderr.print("[yellow]stopped[/]")
        except EdgecError as e:  # e.g. a turn too long for the context: say so, keep the session
            printer.end()
            say(str(e), "red")


def _slash(session, line: str) -> bool:
    """Run a slash command; True means exit. Any error is one line, and the session goes on."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if cmd in ("/exit", "/quit"):
            return True
        if cmd == "/reset":
            session.reset()
            stderr.print("[dim]conversation cleared[/]")
        elif cmd == "/effort":
            if arg:
                if arg not in ("low", "medium", "high"):
                    raise EdgecError("/effort takes low, medium or high")
                session.reasoning = arg
            stderr.print(f"[dim]reasoning effort {session.reasoning} (max tokens {session.sampling.max_tokens})[/]")
        elif cmd == "/save":
            if not arg:
                raise EdgecError("/save needs a file name")
            session.save(Path(arg).expanduser())
            stderr.print(f"[dim]saved {escape(arg)} ({len(session.conversation().messages)} messages)[/]")
        elif cmd == "/load":
            if not arg:
                raise EdgecError("/load needs a file name")
            say(session.load(Path(arg).expanduser()))
        elif cmd == "/stats":
            click.echo(session.stats_text())
        elif cmd == "/schema":
            say(_schema(session, arg))
        else:
            say(HELP, "default")
    except EdgecError as e:
        say(str(e), "red")
    except KeyboardInterrupt:
        say("stopped", "yellow")
    except Exception as e:
        say(f"{cmd} failed: {type(e).__name__}: {e}", "red")
    return False


def rescue(session) -> str:
    """--hosts: another rank is gone and this process must end; the conversation goes to a new file in the working
    folder, to /load in the next chat."""
    if not session.history:
        return "no conversation to save"
    path = Path.cwd() / f"edgec-chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
    while path.exists():
        path = path.with_stem(path.stem + "-1")
    session.save(path)
    return f"the conversation is saved to {path} (/load it in a new chat)"


def _schema(session, arg: str) -> str:
    """/schema FILE: constrain every final answer to a JSON schema from now on; /schema off: stop."""
    from .constrain import read_constraint

    if not arg:
        return f"final answers follow {session.constraint.param}" if session.constraint else "no schema (/schema FILE)"
    if arg == "off":
        session.constraint = None
        return "schema off"
    c = read_constraint(json_schema=Path(arg).expanduser(), think_tokens=session.think_tokens)
    c.compile(session.tokenizer)  # refuse it now, not at the next turn
    session.constraint = c
    return f"final answers follow {arg} from now on (/schema off to stop)"


@click.command()
@model_argument
@click.option("--prompt", help="the user message ('-' reads it from stdin)")
@click.option("--conversation", type=click.Path(path_type=Path),
              help="conversation JSON: openai-harmony's to_json form, or OpenAI chat messages (a list, or a request "
                   "body with messages, tools, reasoning_effort)")
@sampling_options
@click.option("--json-schema", type=click.Path(path_type=Path),
              help="constrain the final answer to this JSON schema (the analysis stays free)")
@click.option("--grammar", type=click.Path(path_type=Path), help="constrain the final answer to this Lark grammar "
                                                                  "(llguidance's; a GBNF file is converted)")
@click.option("--regex", help="constrain the final answer to this regular expression")
@click.option("--think-tokens", type=int, default=None,
              help="with a constraint: end the analysis after this many tokens")
@click.option("--json", "as_json", is_flag=True, help="print the parsed messages and the statistics as JSON")
def generate(model: str, target: str | None, prompt: str | None, conversation: Path | None, show_analysis: bool,
             as_json: bool, json_schema: Path | None, grammar: Path | None, regex: str | None,
             think_tokens: int | None, **kw) -> None:
    """One completion of a prompt or a conversation (MODEL as for chat)."""
    from ..harmony.conversation import Message
    from ..harmony.tokenizer import Tokenizer
    from .constrain import read_constraint

    if (prompt is None) == (conversation is None):
        raise EdgecError("give exactly one of --prompt or --conversation")
    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")
        if not prompt.strip():
            raise EdgecError("--prompt -: stdin was empty")
    if conversation is not None:
        from ..jsonio import regular_file

        regular_file(conversation)  # a missing file is said before the model loads
    folder = resolve(model, target)
    constraint = read_constraint(json_schema, grammar, regex, think_tokens)
    if constraint is not None:
        constraint.compile(Tokenizer.from_folder(folder))  # a bad schema or grammar is said before the model loads
    planned: list[str] = []  # --json: the memory plan goes into the JSON, not onto stderr
    session = open_session(folder, say=planned.append if as_json else None, **kw)
    session.constraint = constraint
    if conversation is not None:
        say(session.load(conversation))  # what the file replaced (a --system it overrides, say), on stderr
        if click.get_current_context().get_parameter_source("reasoning") == click.core.ParameterSource.COMMANDLINE:
            session.reasoning = kw["reasoning"]  # an explicit --reasoning wins over the file's system message
    else:
        session.history.append(Message("user", prompt))
    printer = Printer(show_analysis, tokens=lambda: session.gen.stats.decode) if not as_json else None
    turn = session.respond(printer)
    if printer is not None:
        printer.end()
    if not as_json and (note := cut_off(turn, session, "--reasoning low")):  # JSON: stats.stop says it
        say(note, "yellow")
    if as_json:
        click.echo(json.dumps({
            "messages": [{"role": m.role, "channel": m.channel, "recipient": m.recipient,
                          "content_type": m.content_type, "text": m.text} for m in turn.messages],
            "tokens": turn.tokens,
            "stats": turn.stats.as_dict(),
            "finish_reason": turn.finish_reason,
            "valid": turn.valid,  # constrained output complete and matching (null: no constraint)
            "memory": planned[0] if planned else None,
        }, ensure_ascii=False, indent=2))
    else:
        valid = "" if turn.valid is None else f" valid={str(turn.valid).lower()}"
        stderr.print(f"[dim]{turn.stats.line()} stop={turn.stats.stop}{valid}[/]")
    if turn.stats.stop == "interrupted":  # Ctrl-C: what was generated is shown, the exit code says it was cut
        raise Interrupted("interrupted")


COMMANDS = [chat, generate]
