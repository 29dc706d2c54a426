"""A chat session: Harmony conversation state, prompt reuse across turns, the context policy and the memory plan.

Every turn re-renders the whole conversation with Harmony and hands the token ids to `Generator`, which reuses the
longest common prefix with what the KV cache holds (Harmony drops earlier analysis once a final answer exists, so
the new prompt is usually NOT an extension of the cached tokens) and prefills only the rest.

Context policy: when the prompt plus `max_tokens` would not fit in the context, the oldest turns (a user message and
everything up to the next user message) are dropped; system and developer messages are always kept.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgecError
from ..spec import GptOssConfig, read_json
from .base import Backend
from .generate import CALL, Generator, Sampling, Stats

EFFORTS = ("low", "medium", "high")
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."


# ---- memory plan -------------------------------------------------------------------------------------------
def kv_plan_bytes(cfg: GptOssConfig, context: int, kv_bits: int = 16) -> int:
    """KV bytes for `context` tokens, sliding layers holding `sliding_window` positions in 16 bits; full layers hold
    every position in 16 bits or, with kv_bits=8, as the MLX runtime stores them (one byte per value plus a float16
    scale and bias per group along the head dim: 68 bytes per head and position for head_dim 64, 0.53x bf16)."""
    if kv_bits == 16:
        return cfg.kv_cache_bytes(context, 2)
    from .mlx_backend import kv8_position_bytes

    full = len(cfg.full_layers) * context * kv8_position_bytes(cfg)
    sliding = len(cfg.sliding_layers) * min(context, cfg.sliding_window) * 2 * cfg.kv_dim * 2
    return full + sliding


def available_memory() -> int | None:
    """Bytes the OS says a new allocation can use (Linux MemAvailable, else physical memory), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class MemoryPlan:
    context: int
    kv_bits: int
    kv_bytes: int
    weights_bytes: int
    available_bytes: int | None
    kv_label: str = ""  # what the KV cache holds, e.g. "8-bit full layers, float32 sliding"; default "<kv_bits>-bit"

    @property
    def total(self) -> int:
        return self.kv_bytes + self.weights_bytes

    def describe(self) -> str:
        gib = 2**30
        avail = f"{self.available_bytes / gib:.2f} GiB available" if self.available_bytes else "available unknown"
        label = self.kv_label or f"{self.kv_bits}-bit"
        return (f"KV cache {self.kv_bytes / gib:.2f} GiB at {self.context} tokens ({label}) + weights "
                f"{self.weights_bytes / gib:.2f} GiB = {self.total / gib:.2f} GiB; {avail}")

    def check(self, warn: Callable[[str], None]) -> None:
        """Refuse (EdgecError) when it cannot fit, warn above 80% of available memory."""
        if not self.available_bytes:
            return
        if self.total > self.available_bytes:
            raise EdgecError(f"will not fit: {self.describe()}; lower --max-context or use --kv-bits 8")
        if self.total > 0.8 * self.available_bytes:
            warn(f"tight on memory: {self.describe()}")


def plan_memory(folder: Path, cfg: GptOssConfig, context: int, kv_bits: int = 16,
                kv_dtype: str | None = None) -> MemoryPlan:
    """Weights + KV cache at `context` tokens. Weights as `edgec inspect --context` prices this folder; the KV cache
    of an MLX output with the MLX runtime's own allocation arithmetic (`mlx_backend.kv_cache_bytes`: `kv_bits` 8 or
    16 = unquantized, `kv_dtype` float32|bfloat16, default the profile's), of other folders as inspect prices them."""
    from ..inspect import inspect_report

    report = inspect_report(folder, context)
    rows = report["memory_plan"]["targets"]
    if report.get("kind") != "edgec output":
        rows = [r for r in rows if r.get("target") == "source"] or rows
    kv, weights = int(rows[0]["kv_bytes"]), int(rows[0].get("weights_bytes") or 0)
    label = ""
    if rows[0].get("target") == "mlx":
        from .mlx_backend import kv_cache_bytes

        dtype = kv_dtype or ("bfloat16" if str(rows[0].get("kv_dtype")) in ("bf16", "bfloat16") else "float32")
        kv = kv_cache_bytes(cfg, context, 8 if kv_bits == 8 else None, dtype)
        label = f"8-bit full layers, {dtype} sliding" if kv_bits == 8 else dtype
    return MemoryPlan(context, kv_bits, kv, weights, available_memory(), label)


# ---- tools ---------------------------------------------------------------------------------------------------
def load_tools(path: Path) -> list[dict[str, Any]]:
    """Read a tools file: a JSON list of function definitions `{"name", "description", "parameters", "mock"}`
    (or `{"tools": [...]}`). `mock`, when present, is the result returned for every call (a string as is,
    anything else as JSON); without it the chat asks the user for the result."""
    data = read_json(path)
    if isinstance(data, dict):
        data = data.get("tools")
    if not isinstance(data, list):
        raise EdgecError(f"{path}: expected a JSON list of function definitions")
    for i, t in enumerate(data):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise EdgecError(f"{path}: tool {i}: needs a string 'name'")
        if "parameters" in t and not isinstance(t["parameters"], dict):
            raise EdgecError(f"{path}: tool {t['name']}: 'parameters' must be a JSON schema object")
    return data


def mock_result(tools: list[dict[str, Any]], recipient: str) -> str | None:
    name = recipient.removeprefix("functions.")
    for t in tools:
        if t["name"] == name and "mock" in t:
            m = t["mock"]
            return m if isinstance(m, str) else json.dumps(m)
    return None


# ---- conversation messages in openai-harmony's to_json form ----------------------------------------------------
def text_message(role: str, text: str, channel: str | None = None, recipient: str | None = None,
                 content_type: str | None = None, name: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"role": role, "name": name, "content": [{"type": "text", "text": text}]}
    if channel:
        m["channel"] = channel
    if recipient:
        m["recipient"] = recipient
    if content_type:
        m["content_type"] = content_type
    return m


def message_text(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    return "".join(p.get("text", "") for p in c or [] if isinstance(p, dict))


@dataclass
class Turn:
    """What one assistant turn produced."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    dropped_turns: int = 0

    @property
    def tool_call(self) -> dict[str, Any] | None:
        """The assistant message addressed to a tool when the turn ended with `<|call|>`."""
        if self.stats.stop == "call":
            for m in reversed(self.messages):
                if m.get("recipient") and m.get("role") == "assistant":
                    return m
        return None


class ChatSession:
    """Harmony chat over one backend. `ask(text)` adds a user message and generates the assistant's reply."""

    def __init__(self, backend: Backend, tokenizer: Any, *, reasoning: str = "medium", system: str | None = None,
                 developer: str | None = None, tools: list[dict[str, Any]] | None = None,
                 sampling: Sampling | None = None, max_context: int | None = None, date: str | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.gen = Generator(backend, max_context=max_context)
        self.max_context = self.gen.max_context
        self.sampling = sampling or Sampling()
        self.reasoning = reasoning
        self.identity = system or IDENTITY
        self.developer = developer
        self.tools = tools or []
        self.date = date if date is not None else _dt.date.today().isoformat()
        self.history: list[dict[str, Any]] = []  # user / assistant / tool messages
        self.last: Turn | None = None
        self.loaded: dict[str, dict[str, Any]] = {}  # system / developer messages of a loaded conversation

    # ---- conversation ----------------------------------------------------------------------------------------
    def header(self) -> list[dict[str, Any]]:
        """System message (identity, effort, date) and, with instructions or tools, the developer message."""
        sys_content: dict[str, Any] = {
            "model_identity": self.identity, "reasoning_effort": self.reasoning.capitalize(),
            "conversation_start_date": self.date, "knowledge_cutoff": "2024-06",
            "channel_config": {"valid_channels": ["analysis", "commentary", "final"], "channel_required": True},
            "type": "system_content"}
        if not self.date:
            del sys_content["conversation_start_date"]
        out = [{"role": "system", "name": None, "content": [sys_content]}]
        if "system" in self.loaded:
            m = copy.deepcopy(self.loaded["system"])
            c = m.get("content")
            if isinstance(c, list) and c and isinstance(c[0], dict) and c[0].get("type") == "system_content":
                c[0]["reasoning_effort"] = self.reasoning.capitalize()
            out = [m]
        if "developer" in self.loaded:
            out.append(copy.deepcopy(self.loaded["developer"]))
        elif self.developer or self.tools:
            dev: dict[str, Any] = {"instructions": self.developer}
            if self.tools:
                fns = [{k: t[k] for k in ("name", "description", "parameters") if k in t} for t in self.tools]
                for f in fns:
                    f.setdefault("description", "")
                dev["tools"] = {"functions": {"name": "functions", "tools": fns}}
            dev["type"] = "developer_content"
            out.append({"role": "developer", "name": None, "content": [dev]})
        return out

    def conversation(self) -> dict[str, Any]:
        return {"messages": self.header() + self.history}

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        from ..harmony.conversation import Conversation
        from ..harmony.render import render_conversation

        return render_conversation(Conversation.from_obj(messages), self.tokenizer, next_role="assistant")

    def fit_prompt(self) -> tuple[list[int], int]:
        """Render the conversation; drop the oldest turns while prompt + max_tokens exceeds the context."""
        head, dropped = self.header(), 0
        while True:
            prompt = self.render(head + self.history)
            if len(prompt) + self.sampling.max_tokens <= self.max_context:
                return prompt, dropped
            starts = [i for i, m in enumerate(self.history) if m.get("role") == "user"]
            if len(starts) < 2:  # only the current turn is left
                if len(prompt) < self.max_context:
                    return prompt, dropped  # fits, with less room than max_tokens: the reply may stop at 'context'
                raise EdgecError(f"the conversation needs {len(prompt)} tokens even after dropping old turns; the "
                                 f"context holds {self.max_context} (raise --max-context)")
            del self.history[: starts[1]]
            dropped += 1

    # ---- turns -------------------------------------------------------------------------------------------------
    def ask(self, text: str, on_event: Callable[[Any], None] | None = None) -> Turn:
        self.history.append(text_message("user", text))
        return self.respond(on_event)

    def tool_result(self, recipient: str, result: str, on_event: Callable[[Any], None] | None = None) -> Turn:
        """Answer the tool call to `recipient` (e.g. functions.get_weather) and let the assistant go on."""
        self.history.append(text_message("tool", result, channel="commentary", recipient="assistant",
                                         name=recipient))
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

        res = self.gen.generate(prompt, self.sampling, on_token)
        for e in parser.finish():  # a message cut off by max-tokens, the context end or Ctrl-C
            if on_event is not None:
                on_event(e)
        turn = Turn([m.to_dict() for m in parser.messages], res.tokens, res.stats, dropped)
        self.history.extend(turn.messages)
        self.last = turn
        return turn

    # ---- slash-command helpers ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.history = []
        self.gen.reset()

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.conversation(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    def load(self, path: Path) -> None:
        """Load a conversation JSON (openai-harmony to_json form or a plain list of {role, content}). Its system
        and developer messages are kept verbatim (only /effort edits the system's reasoning effort)."""
        conv = load_conversation(path)
        self.loaded = {m["role"]: m for m in conv if m.get("role") in ("system", "developer")}
        self.history = [m for m in conv if m.get("role") not in ("system", "developer")]
        sys_msg = self.loaded.get("system")
        c = (sys_msg or {}).get("content")
        if isinstance(c, list) and c and isinstance(c[0], dict) and c[0].get("reasoning_effort"):
            self.reasoning = str(c[0]["reasoning_effort"]).lower()


def load_conversation(path: Path) -> list[dict[str, Any]]:
    """Messages of a conversation JSON file: `{"messages": [...]}` (openai-harmony) or a list of {role, content}."""
    data = read_json(path)
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise EdgecError(f"{path}: expected {{\"messages\": [...]}} or a list of {{role, content}} objects")
    out = []
    for m in msgs:
        if isinstance(m.get("content"), str):
            m = dict(m, content=[{"type": "text", "text": m["content"]}])
        out.append(m)
    return out


__all__ = ["CALL", "ChatSession", "MemoryPlan", "Turn", "kv_plan_bytes", "load_conversation", "load_tools",
           "mock_result", "plan_memory"]
