"""Harmony conversations: our own dataclasses, read from and written to openai-harmony's JSON form.

`Conversation.from_json` accepts exactly what openai-harmony's `Conversation.to_json()` writes
(`{"messages": [{"role", "name", "content": [...], "channel"?, "recipient"?, "content_type"?}]}` with text,
`system_content` and `developer_content` parts) and, for convenience, a plain list of `{"role", "content"}`.
A field missing from a system/developer part means "not set" (as in openai-harmony's Rust core); the Python
constructors below use openai-harmony's defaults instead (identity, cutoff 2024-06, medium effort, channels).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgecError
from ..jsonio import loads, read_json

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_CHANNELS = ["analysis", "commentary", "final"]


@dataclass
class ToolDescription:
    """One function tool: name, description and an optional JSON schema of its parameters."""

    name: str
    description: str = ""
    parameters: dict | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.parameters is not None:
            d["parameters"] = self.parameters
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ToolDescription:
        if isinstance(d, dict) and d.get("type") == "function" and isinstance(d.get("function"), dict):
            return cls.from_dict(d["function"])  # OpenAI API style wrapper
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise EdgecError(f"tool definition needs a string 'name': {str(d)[:80]}")
        params = d.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise EdgecError(f"tool {d['name']}: 'parameters' must be a JSON schema object")
        return cls(d["name"], str(d.get("description") or ""), params)


@dataclass
class ToolNamespace:
    """A tool namespace (`functions`, `browser`, `python`, ...)."""

    name: str
    tools: list[ToolDescription] = field(default_factory=list)
    description: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            d["description"] = self.description
        d["tools"] = [t.to_dict() for t in self.tools]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ToolNamespace:
        return cls(str(d["name"]), [ToolDescription.from_dict(t) for t in d.get("tools") or []], d.get("description"))


def _tools_from(raw: dict | None) -> dict[str, ToolNamespace] | None:
    if raw is None:
        return None
    return {k: ToolNamespace.from_dict(v) for k, v in raw.items()}


def _tools_to(tools: dict[str, ToolNamespace] | None) -> dict | None:
    return None if tools is None else {k: v.to_dict() for k, v in tools.items()}


def normalize_effort(effort: str | None) -> str | None:
    if effort is None:
        return None
    e = str(effort).lower()
    if e not in EFFORTS:
        raise EdgecError(f"reasoning effort must be one of low, medium, high (got {effort!r})")
    return e


@dataclass
class SystemContent:
    """The system message: identity, knowledge cutoff, date, reasoning effort, channels, built-in tools."""

    model_identity: str | None = DEFAULT_IDENTITY
    reasoning_effort: str | None = "medium"
    conversation_start_date: str | None = None
    knowledge_cutoff: str | None = "2024-06"
    valid_channels: list[str] | None = field(default_factory=lambda: list(DEFAULT_CHANNELS))
    channel_required: bool = True
    tools: dict[str, ToolNamespace] | None = None

    def __post_init__(self):
        self.reasoning_effort = normalize_effort(self.reasoning_effort)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        for k in ("model_identity", "reasoning_effort", "conversation_start_date", "knowledge_cutoff"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v.capitalize() if k == "reasoning_effort" else v
        if self.valid_channels is not None:
            d["channel_config"] = {"valid_channels": list(self.valid_channels),
                                   "channel_required": self.channel_required}
        if self.tools is not None:
            d["tools"] = _tools_to(self.tools)
        d["type"] = "system_content"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SystemContent:
        cc = d.get("channel_config")
        return cls(model_identity=d.get("model_identity"), reasoning_effort=d.get("reasoning_effort"),
                   conversation_start_date=d.get("conversation_start_date"),
                   knowledge_cutoff=d.get("knowledge_cutoff"),
                   valid_channels=None if cc is None else list(cc.get("valid_channels") or []),
                   channel_required=bool(cc.get("channel_required", False)) if cc is not None else True,
                   tools=_tools_from(d.get("tools")))


@dataclass
class DeveloperContent:
    """The developer message: instructions and function tools."""

    instructions: str | None = None
    tools: dict[str, ToolNamespace] | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.instructions is not None:
            d["instructions"] = self.instructions
        if self.tools is not None:
            d["tools"] = _tools_to(self.tools)
        d["type"] = "developer_content"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeveloperContent:
        return cls(instructions=d.get("instructions"), tools=_tools_from(d.get("tools")))


Content = str | SystemContent | DeveloperContent


@dataclass
class Message:
    """One Harmony message. `name` is the author name (a tool message's name is the tool, e.g. functions.f)."""

    role: str
    content: list[Content] = field(default_factory=list)
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise EdgecError(f"unknown message role {self.role!r} (expected one of {', '.join(ROLES)})")
        if isinstance(self.content, str | SystemContent | DeveloperContent):
            self.content = [self.content]

    @property
    def text(self) -> str:
        """The concatenated text parts."""
        return "".join(c for c in self.content if isinstance(c, str))

    def to_dict(self) -> dict:
        parts = [{"type": "text", "text": c} if isinstance(c, str) else c.to_dict() for c in self.content]
        d: dict[str, Any] = {"role": self.role, "name": self.name, "content": parts}
        for k in ("channel", "recipient", "content_type"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Message:
        if not isinstance(d, dict) or "role" not in d:
            raise EdgecError(f"message needs a 'role': {str(d)[:80]}")
        role = d["role"]
        if isinstance(role, dict):  # {"author": {"role", "name"}} style
            d = {**d, "role": role.get("role"), "name": role.get("name")}
        if "author" in d and isinstance(d["author"], dict):
            d = {**d, "role": d["author"].get("role"), "name": d["author"].get("name")}
        raw = d.get("content")
        if raw is None:
            raw = []
        if isinstance(raw, str):
            raw = [{"type": "text", "text": raw}]
        elif isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(p, str | dict) for p in raw):
            raise EdgecError(f"message content must be a string or a list of parts: {str(d)[:80]}")
        parts: list[Content] = []
        for p in raw:
            if isinstance(p, str):
                parts.append(p)
                continue
            kind = p.get("type")
            if kind == "text":
                parts.append(str(p.get("text", "")))
            elif kind == "system_content":
                parts.append(SystemContent.from_dict(p))
            elif kind == "developer_content":
                parts.append(DeveloperContent.from_dict(p))
            else:
                raise EdgecError(f"unknown content part type {kind!r}")
        return cls(str(d["role"]), parts, d.get("name"), d.get("channel"), d.get("recipient"), d.get("content_type"))


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"messages": [m.to_dict() for m in self.messages]}

    def to_json(self) -> str:
        """openai-harmony's `Conversation.to_json()` form."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_obj(cls, data: Any) -> Conversation:
        """From openai-harmony's dict form or a plain list of {role, content} messages."""
        if isinstance(data, dict) and "messages" in data:
            data = data["messages"]
        if not isinstance(data, list):
            raise EdgecError("a conversation is {\"messages\": [...]} or a list of {role, content} messages")
        return cls([Message.from_dict(m) for m in data])

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        return cls.from_obj(loads(text, "conversation"))

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        p = Path(path)
        data = read_json(p)
        try:
            return cls.from_obj(data)
        except EdgecError as e:
            raise EdgecError(f"{p}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the JSON form: to a temporary file beside `path`, renamed over it (an error never leaves half a
        file); an unwritable path is a one-line EdgecError."""
        p = Path(path)
        if p.is_dir():
            raise EdgecError(f"{p}: is a folder; give a file name")
        tmp = p.with_name(f".{p.name}.edgec-tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise EdgecError(f"{p}: cannot write ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------------
# builders the chat loop uses
# ----------------------------------------------------------------------------------------------------------------

def system_message(reasoning_effort: str | None = "medium", current_date: str | None = None,
                   model_identity: str | None = DEFAULT_IDENTITY, knowledge_cutoff: str | None = "2024-06",
                   ) -> Message:
    """The standard gpt-oss system message (openai-harmony's defaults)."""
    return Message("system", [SystemContent(model_identity=model_identity, reasoning_effort=reasoning_effort,
                                            conversation_start_date=current_date,
                                            knowledge_cutoff=knowledge_cutoff)])


def load_tools(source: str | Path | list | None) -> list[ToolDescription]:
    """Function tools from a JSON list of `{name, description, parameters}` (or a path to such a file).
    OpenAI API style `{"type": "function", "function": {...}}` entries are accepted too."""
    if source is None:
        return []
    if isinstance(source, str | Path):
        data = read_json(Path(source))
    else:
        data = source
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise EdgecError("tools must be a JSON list of {name, description, parameters}")
    return [t if isinstance(t, ToolDescription) else ToolDescription.from_dict(t) for t in data]


def developer_message(instructions: str | None = None, tools: list[ToolDescription] | list[dict] | None = None
                      ) -> Message | None:
    """A developer message with `# Instructions` and/or function tools; None when both are empty."""
    fns = load_tools(tools) if tools else []
    if instructions is None and not fns:
        return None
    return Message("developer", [DeveloperContent(instructions, {"functions": ToolNamespace("functions", fns)}
                                                  if fns else None)])
