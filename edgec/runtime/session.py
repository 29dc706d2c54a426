"""A chat session: Harmony conversation state, prompt reuse across turns and the context policy.

Every turn re-renders the whole conversation with Harmony and hands the token ids to `Generator`, which reuses the
longest common prefix with what the KV cache holds (Harmony drops earlier analysis once a final answer exists, so
the new prompt is usually NOT an extension of the cached tokens) and prefills only the rest.

Context policy: when the prompt plus `max_tokens` would not fit in the context, the oldest turns (a user message and
everything up to the next user message) are dropped; system and developer messages are always kept.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgecError
from ..harmony.conversation import (
    DEFAULT_IDENTITY,
    Conversation,
    Message,
    SystemContent,
    ToolDescription,
    developer_message,
    load_tools,
    normalize_effort,
    system_message,
)
from ..harmony.openai import conversation_from_any, tool_result
from ..jsonio import read_json
from .base import Backend
from .generate import Generator, Sampling, Stats

# ---- reply length ---------------------------------------------------------------------------------------------
# The default --max-tokens follows the reasoning effort: gpt-oss's analysis alone often runs past 512 tokens at
# high effort, and a reply cut off inside it has no answer at all. At most half the context, so that a long reply
# does not push the whole history out.
DEFAULT_MAX_TOKENS = {"low": 2048, "medium": 8192, "high": 32768}


def default_max_tokens(effort: str | None, context: int) -> int:
    return max(1, min(DEFAULT_MAX_TOKENS[effort or "medium"], context // 2))


# ---- tools ---------------------------------------------------------------------------------------------------
def read_tools(path: Path) -> tuple[list[ToolDescription], dict[str, str]]:
    """A tools file: a JSON list of function definitions `{"name", "description", "parameters", "mock"?}` (or
    `{"tools": [...]}`, or OpenAI's `{"type": "function", "function": {...}}` entries). Returns the tools and the
    mock results by name: `mock`, when present, is the result returned for every call (a string as is, anything
    else as JSON); without it the chat asks the user for the result."""
    data = read_json(path)
    try:
        tools = load_tools(data)
    except EdgecError as e:
        raise EdgecError(f"{path}: {e}") from None
    raw = data.get("tools") if isinstance(data, dict) else data
    mocks = {t.name: (r["mock"] if isinstance(r["mock"], str) else json.dumps(r["mock"]))
             for t, r in zip(tools, raw, strict=True) if isinstance(r, dict) and "mock" in r}
    return tools, mocks


@dataclass
class Turn:
    """What one assistant turn produced."""

    messages: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    dropped_turns: int = 0
    guard: Any = None  # the constraint's Guard when one held (constrain.py)

    @property
    def finish_reason(self) -> str:
        """OpenAI's words: "length" when max_tokens or the context cut the reply, else "tool_calls" or "stop"."""
        return {"max_tokens": "length", "context": "length", "call": "tool_calls"}.get(self.stats.stop, "stop")

    @property
    def valid(self) -> bool | None:
        """Whether the constrained output is complete and matches its grammar (None: no constraint)."""
        if self.guard is None:
            return None
        return self.guard.accepting() and not self.guard.constrained_open() and self.finish_reason != "length"

    @property
    def tool_call(self) -> Message | None:
        """The assistant message addressed to a tool when the turn ended with `<|call|>`."""
        if self.stats.stop == "call":
            for m in reversed(self.messages):
                if m.recipient and m.role == "assistant":
                    return m
        return None


class ChatSession:
    """Harmony chat over one backend: a system message, an optional developer message and the turns, all Harmony
    `Message`s. `ask(text)` adds a user message and generates the assistant's reply."""

    def __init__(self, backend: Backend, tokenizer: Any, *, reasoning: str = "medium", system: str | None = None,
                 developer: str | None = None, tools: list[ToolDescription] | None = None,
                 sampling: Sampling | None = None, max_context: int | None = None, date: str | None = None,
                 mocks: dict[str, str] | None = None, auto_max_tokens: bool = False):
        self.backend = backend
        self.tokenizer = tokenizer
        self.gen = Generator(backend, max_context=max_context)
        self.max_context = self.gen.max_context
        self.sampling = sampling or Sampling()
        self.date = date if date is not None else _dt.date.today().isoformat()
        self.identity = system or DEFAULT_IDENTITY
        self.system = system_message(reasoning, self.date or None, model_identity=self.identity)
        self.developer = developer_message(developer, tools)
        self.mocks = mocks or {}  # tool name -> the result the chat answers every call with
        self.history: list[Message] = []  # user / assistant / tool messages
        self.last: Turn | None = None
        self.auto_max_tokens = auto_max_tokens  # sampling.max_tokens follows the effort (no --max-tokens given)
        self.constraint: Any = None  # a constrain.Constraint on every reply (generate --json-schema, chat /schema)
        self.think_tokens: int | None = None  # chat --think-tokens: the analysis budget of a /schema constraint
        self._follow_effort()

    # ---- conversation ----------------------------------------------------------------------------------------
    @property
    def reasoning(self) -> str | None:
        sc = next((c for c in self.system.content if isinstance(c, SystemContent)), None)
        return sc.reasoning_effort if sc else None

    @reasoning.setter
    def reasoning(self, effort: str) -> None:
        for c in self.system.content:
            if isinstance(c, SystemContent):
                c.reasoning_effort = normalize_effort(effort)
        self._follow_effort()

    def _follow_effort(self) -> None:
        if self.auto_max_tokens:
            self.sampling.max_tokens = default_max_tokens(self.reasoning, self.max_context)

    @property
    def tools(self) -> list[ToolDescription]:
        dev = self.developer.content[0] if self.developer else None
        fns = getattr(dev, "tools", None) or {}
        return list(fns["functions"].tools) if "functions" in fns else []

    def header(self) -> list[Message]:
        """The system message and, with instructions or tools, the developer message."""
        return [self.system] + ([self.developer] if self.developer else [])

    def conversation(self) -> Conversation:
        return Conversation(self.header() + self.history)

    def render(self, messages: list[Message]) -> list[int]:
        from ..harmony.render import render_conversation

        return render_conversation(messages, self.tokenizer, next_role="assistant")

    def fit_prompt(self) -> tuple[list[int], int]:
        """Render the conversation; drop the oldest turns while prompt + max_tokens exceeds the context."""
        head, dropped = self.header(), 0
        while True:
            prompt = self.render(head + self.history)
            if len(prompt) + self.sampling.max_tokens <= self.max_context:
                return prompt, dropped
            starts = [i for i, m in enumerate(self.history) if m.role == "user"]
            if len(starts) < 2:  # only the current turn is left
                if len(prompt) < self.max_context:
                    return prompt, dropped  # fits, with less room than max_tokens: the reply may stop at 'context'
                fix = "raise --max-context" if self.max_context < self.backend.config.max_position_embeddings \
                    else "the model's maximum: shorten the conversation"
                raise EdgecError(f"the conversation needs {len(prompt)} tokens even after dropping old turns; the "
                                 f"context holds {self.max_context} ({fix})")
            del self.history[: starts[1]]
            dropped += 1

    # ---- turns -------------------------------------------------------------------------------------------------
    def ask(self, text: str, on_event: Callable[[Any], None] | None = None) -> Turn:
        self.history.append(Message("user", text))
        return self.respond(on_event)

    def tool_result(self, recipient: str, result: str, on_event: Callable[[Any], None] | None = None) -> Turn:
        """Answer the tool call to `recipient` (e.g. functions.get_weather) and let the assistant go on."""
        self.history.append(tool_result(recipient, result))
        return self.respond(on_event)

    def respond(self, on_event: Callable[[Any], None] | None = None) -> Turn:
        """Generate the assistant's next message(s) and add them to the history."""
        from ..harmony.parser import StreamParser

        prompt, dropped = self.fit_prompt()
        parser = StreamParser(self.tokenizer, role="assistant")

        def on_token(tok: int) -> None:
            events = parser.feed(tok)
            if on_event is not None:
                for e in events:
                    on_event(e)

        guard = self.constraint.compile(self.tokenizer) if self.constraint is not None else None
        res = self.gen.generate(prompt, self.sampling, on_token, guard)
        for e in parser.finish():  # a message cut off by max-tokens, the context end or Ctrl-C
            if on_event is not None:
                on_event(e)
        turn = Turn(list(parser.messages), res.tokens, res.stats, dropped, guard)
        self.history.extend(turn.messages)
        self.last = turn
        return turn

    # ---- slash-command helpers ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.history = []
        self.last = None
        self.gen.reset()

    def save(self, path: Path) -> None:
        self.conversation().save(path)

    def load(self, path: Path) -> str:
        """Load a conversation JSON and say what happened: openai-harmony's to_json form, taken verbatim (its leading
        system and developer messages replace the session's; only /effort edits the system's reasoning effort), or
        the OpenAI chat format (a list of messages or a request body), mapped as `edgec serve` maps it (its system
        messages become developer instructions). Every message is loaded; system or developer messages after the
        first turn stay in place."""
        data = read_json(path)
        try:
            conv = conversation_from_any(data, self.reasoning, self.date or None, self.identity)
        except EdgecError as e:
            raise EdgecError(f"{path}: {e}") from None
        if not conv.messages:
            raise EdgecError(f"{path}: no messages")
        raw = data.get("messages") if isinstance(data, dict) else data
        in_file = len(raw) if isinstance(raw, list) else len(conv.messages)
        head = 0
        while head < len(conv.messages) and conv.messages[head].role in ("system", "developer"):
            head += 1
        system = next((m for m in conv.messages[:head] if m.role == "system"), None)
        developer = next((m for m in conv.messages[:head] if m.role == "developer"), None)
        extra = [m for m in conv.messages[:head] if m is not system and m is not developer]
        notes = []
        if system is not None and system != self.system:
            notes.append(f"replaced the system message's {_differences(self.system, system)}")
        if developer is not None and developer != self.developer:
            notes.append("replaced the developer message (--developer/--system, --tools)" if self.developer else
                         "added the file's developer message")
        elif developer is None and self.developer is not None:
            notes.append("kept the developer message of the command line (the file has none)")
        self.system = system or self.system
        self.developer = developer or self.developer
        self.history = extra + conv.messages[head:]
        self._follow_effort()
        kinds = [k for k, n in (("system", system is not None), ("developer", developer is not None)) if n]
        parts = kinds + [f"{len(self.history)} in the conversation"]
        what = f"{len(conv.messages)} messages ({', '.join(parts)})"
        if in_file != len(conv.messages):
            what = f"{in_file} messages in the file as {what} in Harmony"
        return f"loaded {path}: {what}" + "".join(f"; {n}" for n in notes)

    def stats_text(self) -> str:
        """What /stats prints: the cache, the settings and the last turn, for people."""
        from ..report import human_bytes

        lines = [f"cache {len(self.gen.tokens)} of {self.max_context} tokens, KV {human_bytes(self.backend.kv_bytes())}"
                 f" · reasoning {self.reasoning} · max tokens {self.sampling.max_tokens}"]
        st = self.last.stats if self.last else None
        if st is None:
            lines.append("last turn: none yet")
        else:
            lines.append(f"last turn: prompt {st.prompt} tokens ({st.reused} reused, {st.prefill} prefilled in "
                         f"{st.prefill_s:.2f} s), {st.decode} generated at {st.tok_s:.1f} tok/s, first token after "
                         f"{st.ttft_s:.2f} s, stopped by {STOPS.get(st.stop, st.stop)}")
        return "\n".join(lines)


STOPS = {"return": "the end of the answer", "call": "a tool call", "max_tokens": "--max-tokens",
         "context": "the end of the context", "interrupted": "Ctrl-C"}


def _differences(old: Message, new: Message) -> str:
    """What differs between two system messages, for people: 'identity, reasoning effort high (was medium)'."""
    a = next((c for c in old.content if isinstance(c, SystemContent)), None)
    b = next((c for c in new.content if isinstance(c, SystemContent)), None)
    if a is None or b is None:
        return "content"
    names = {"model_identity": "identity (--identity)", "reasoning_effort": "reasoning effort",
             "conversation_start_date": "date", "knowledge_cutoff": "knowledge cutoff", "valid_channels": "channels",
             "channel_required": "channels", "tools": "built-in tools"}
    out: list[str] = []
    for k, name in names.items():
        if getattr(a, k) != getattr(b, k) and not any(o.startswith(name) for o in out):
            out.append(f"{name} {b.reasoning_effort} (was {a.reasoning_effort})" if k == "reasoning_effort" else name)
    return ", ".join(out) or "content"


__all__ = ["ChatSession", "Turn", "default_max_tokens", "read_tools"]
