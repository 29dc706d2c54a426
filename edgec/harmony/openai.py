"""The OpenAI API <-> Harmony mapping, in one place (used by `edgec serve`, `generate --conversation` and chat).

Requests to Harmony (`from_chat`, `from_responses`), as gpt-oss's published chat template does:
  - `system` and `developer` messages before the first turn become the developer message's `# Instructions`
    (the system message itself is Harmony's: identity, date, reasoning effort); a later one is a developer message
    in place;
  - function tools (`{"type": "function", "function": {...}}`, or the Responses API's flat form) go into the developer
    message's `functions` namespace; their parameters must be a JSON Schema (checked with `jsonschema`);
  - an assistant message's `reasoning_content` (or `reasoning` / `thinking`) is an analysis message, its `content` a
    final message (a commentary preamble when it also has `tool_calls`), each tool call a commentary message to
    `functions.NAME` with `<|constrain|>json` and the arguments verbatim;
  - a `tool` message is a tool result from `functions.NAME`, the name taken from the matching tool call's id.

Harmony to responses (`Reply`): the parser's events become items: analysis -> reasoning, final/commentary text ->
content, a message to `functions.NAME` -> a function call with JSON arguments. Harmony markup never reaches the
content: the parser runs with special_text=False and only message text is returned.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgecError
from .conversation import (
    DEFAULT_IDENTITY,
    EFFORTS,
    Conversation,
    DeveloperContent,
    Message,
    ToolDescription,
    ToolNamespace,
    system_message,
)

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEXT_PARTS = ("text", "input_text", "output_text")


class RequestError(EdgecError):
    """A request the OpenAI API would refuse: one line, plus what an HTTP server needs to answer in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.code, self.status, self.type = param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def effort_of(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in EFFORTS:
        raise RequestError(f"{param} must be one of {', '.join(EFFORTS)} (got {value!r})", param, "invalid_value")
    return value.lower()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# ---- tools ------------------------------------------------------------------------------------------------------
def _check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise RequestError(f"{param} must be a JSON Schema object", param, "invalid_function_parameters")
    try:
        import jsonschema
    except ImportError:  # without the serve extra only the shape is checked
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise RequestError(f"{param} is not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else ""),
                           param, "invalid_function_parameters") from None


def parse_tools(tools: Any, param: str = "tools", flat: bool = False) -> list[ToolDescription]:
    """Function tools of a request: `{"type": "function", "function": {name, description, parameters}}` (chat
    completions) or, with flat=True, `{"type": "function", name, description, parameters}` (Responses API)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError(f"{param} must be a list", param, "invalid_type")
    out = []
    for i, t in enumerate(tools):
        p = f"{param}[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise RequestError(f"{p}: only function tools are supported (got {kind!r})", f"{p}.type", "invalid_value")
        fn = t if flat else t.get("function")
        if not flat and not isinstance(fn, dict):
            raise RequestError(f"{p}: missing required field 'function'", f"{p}.function", "missing_required_parameter")
        fp = p if flat else f"{p}.function"
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RequestError(f"{fp}.name must match ^[A-Za-z0-9_-]{{1,64}}$ (got {name!r})", f"{fp}.name",
                               "invalid_value")
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, f"{fp}.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise RequestError(f"{fp}.description must be a string", f"{fp}.description", "invalid_type")
        out.append(ToolDescription(name, desc or "", params))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise RequestError(f"{param}: duplicate function names", param, "invalid_value")
    return out


def tool_choice(choice: Any, tools: list[ToolDescription]) -> str | None:
    """`tool_choice` -> None (the model decides), "none", "required", or the name of the function it must call.
    Both the chat form `{"type": "function", "function": {"name"}}` and the Responses form `{"type": "function",
    "name"}` are read."""
    if choice in (None, "auto"):
        return None
    if choice in ("none", "required"):
        if choice == "required" and not tools:
            raise RequestError("tool_choice 'required' needs tools", "tool_choice", "invalid_value")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if name not in {t.name for t in tools}:
            raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools",
                               "tool_choice", "invalid_value")
        return name
    raise RequestError(f"tool_choice must be 'auto', 'none', 'required' or a function (got {choice!r})",
                       "tool_choice", "invalid_value")


def forced_start(choice: str | None) -> str:
    """What the assistant's reply must start with (after `<|start|>assistant`) for a tool_choice: the header the
    model itself writes for a call, with the function's name when one is named."""
    if choice in (None, "none"):
        return ""
    if choice == "required":
        return "<|channel|>commentary to=functions."
    return f"<|channel|>commentary to=functions.{choice} <|constrain|>json<|message|>"


# ---- requests -> Harmony ----------------------------------------------------------------------------------------
def _text(content: Any, param: str, required: bool = True) -> str | None:
    """The text of an OpenAI content field: a string or a list of text parts."""
    if content is None:
        if required:
            raise RequestError(f"missing required field '{param}'", param, "missing_required_parameter")
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "refusal":
                out.append(str(part.get("refusal") or ""))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{param}[{j}]: unsupported content part {kind!r} (gpt-oss reads text only)",
                                   f"{param}[{j}]", "invalid_value")
        return "".join(out)
    raise RequestError(f"{param} must be a string or a list of text parts", param, "invalid_type")


def _call_message(name: str, arguments: Any, param: str) -> Message:
    if not isinstance(name, str) or not name:
        raise RequestError(f"missing required field '{param}.name'", f"{param}.name", "missing_required_parameter")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise RequestError(f"{param}.arguments must be a JSON string", f"{param}.arguments", "invalid_type")
    return Message("assistant", arguments, channel="commentary", recipient=f"functions.{name}",
                   content_type="<|constrain|>json")


def tool_result(name: str, output: str) -> Message:
    """A tool's answer to the assistant (`functions.NAME to=assistant` on the commentary channel)."""
    return Message("tool", output, name=name if "." in name else f"functions.{name}", channel="commentary",
                   recipient="assistant")


@dataclass
class _Builder:
    """Accumulates Harmony messages; leading system/developer text becomes the developer instructions."""

    instructions: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)  # tool call id -> function name

    def instruct(self, text: str) -> None:
        if self.messages:
            self.messages.append(Message("developer", [DeveloperContent(instructions=text)]))
        else:
            self.instructions.append(text)

    def call(self, call_id: Any, name: str, arguments: Any, param: str) -> None:
        self.messages.append(_call_message(name, arguments, param))
        if isinstance(call_id, str) and call_id:
            self.calls[call_id] = name

    def result(self, call_id: Any, output: str, param: str, name: Any = None) -> None:
        fn = self.calls.get(call_id) if isinstance(call_id, str) else None
        if fn is None and isinstance(name, str) and name:
            fn = name
        if fn is None:
            if call_id is None:
                raise RequestError(f"missing required field '{param}.tool_call_id'", f"{param}.tool_call_id",
                                   "missing_required_parameter")
            raise RequestError(f"{param}: no earlier tool call has the id {call_id!r}", param, "invalid_value")
        self.messages.append(tool_result(fn, output))

    def done(self, tools: list[ToolDescription], extra_instructions: str | None = None) -> list[Message]:
        texts = ([extra_instructions] if extra_instructions else []) + self.instructions
        instructions = "\n\n".join(texts) if texts else None
        if instructions is None and not tools:
            return list(self.messages)
        ns = {"functions": ToolNamespace("functions", tools)} if tools else None
        return [Message("developer", [DeveloperContent(instructions, ns)]), *self.messages]


def from_chat(messages: Any, tools: Any = None, calls: dict[str, str] | None = None) -> list[Message]:
    """Chat Completions `messages` and `tools` -> Harmony messages (a developer message first when there are
    instructions or tools), without the system message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages",
                           "missing_required_parameter" if messages is None else "invalid_type")
    fns = parse_tools(tools)
    b = _Builder(calls=dict(calls or {}))
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role is None:
            raise RequestError(f"missing required field '{p}.role'", f"{p}.role", "missing_required_parameter")
        if role in ("system", "developer"):
            b.instruct(_text(m.get("content"), f"{p}.content") or "")
        elif role == "user":
            b.messages.append(Message("user", _text(m.get("content"), f"{p}.content")))
        elif role == "assistant":
            reasoning = next((m[k] for k in ("reasoning_content", "reasoning", "thinking") if m.get(k)), None)
            tool_calls = m.get("tool_calls") or []
            content = _text(m.get("content"), f"{p}.content", required=not tool_calls and not reasoning)
            if reasoning:
                b.messages.append(Message("assistant", _text(reasoning, f"{p}.reasoning_content"), channel="analysis"))
            if not isinstance(tool_calls, list):
                raise RequestError(f"{p}.tool_calls must be a list", f"{p}.tool_calls", "invalid_type")
            if content:
                b.messages.append(Message("assistant", content, channel="commentary" if tool_calls else "final"))
            for j, tc in enumerate(tool_calls):
                q = f"{p}.tool_calls[{j}]"
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict):
                    raise RequestError(f"missing required field '{q}.function'", f"{q}.function",
                                       "missing_required_parameter")
                b.call(tc.get("id"), fn.get("name"), fn.get("arguments", "{}"), f"{q}.function")
        elif role in ("tool", "function"):
            b.result(m.get("tool_call_id"), _text(m.get("content"), f"{p}.content") or "", p, m.get("name"))
        else:
            raise RequestError(f"Invalid value for '{p}.role': {role!r} (expected system, developer, user, assistant "
                               f"or tool)", f"{p}.role", "invalid_value")
    return b.done(fns)


def from_responses(input: Any, instructions: Any = None, tools: Any = None,
                   history: list[Message] | None = None, calls: dict[str, str] | None = None) -> list[Message]:
    """Responses API `input` (a string or a list of items), `instructions` and `tools` -> Harmony messages,
    after `history` (the messages of a previous response, for `previous_response_id`), without the system message."""
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("instructions must be a string", "instructions", "invalid_type")
    fns = parse_tools(tools, flat=True)
    b = _Builder(messages=list(history or []), calls=dict(calls or {}))
    if isinstance(input, str):
        items: list = [{"role": "user", "content": input}]
    elif isinstance(input, list) and input:
        items = input
    else:
        raise RequestError("'input' must be a string or a non-empty list of items", "input",
                           "missing_required_parameter" if input is None else "invalid_type")
    for i, it in enumerate(items):
        p = f"input[{i}]"
        if not isinstance(it, dict):
            raise RequestError(f"{p} must be an object", p, "invalid_type")
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role in ("system", "developer"):
                b.instruct(_text(it.get("content"), f"{p}.content") or "")
            elif role == "user":
                b.messages.append(Message("user", _text(it.get("content"), f"{p}.content")))
            elif role == "assistant":
                b.messages.append(Message("assistant", _text(it.get("content"), f"{p}.content"), channel="final"))
            elif role is None:
                raise RequestError(f"missing required field '{p}.role'", f"{p}.role", "missing_required_parameter")
            else:
                raise RequestError(f"Invalid value for '{p}.role': {role!r}", f"{p}.role", "invalid_value")
        elif kind == "function_call":
            b.call(it.get("call_id"), it.get("name"), it.get("arguments", "{}"), p)
        elif kind == "function_call_output":
            out = it.get("output")
            b.result(it.get("call_id"), out if isinstance(out, str) else _text(out, f"{p}.output") or "", p)
        elif kind == "reasoning":
            parts = it.get("content") or it.get("summary") or []
            text = "".join(x.get("text", "") for x in parts if isinstance(x, dict)) if isinstance(parts, list) else ""
            if text:
                b.messages.append(Message("assistant", text, channel="analysis"))
        else:
            raise RequestError(f"{p}: unsupported input item type {kind!r}", f"{p}.type", "invalid_value")
    return b.done(fns, instructions)


def conversation(messages: list[Message], effort: str | None = "medium", date: str | None = None,
                 identity: str | None = DEFAULT_IDENTITY) -> Conversation:
    """The Harmony system message (identity, date, reasoning effort) followed by `messages`."""
    return Conversation([system_message(effort, date, model_identity=identity), *messages])


# ---- conversation files: openai-harmony JSON or the OpenAI chat format --------------------------------------------
HARMONY_KEYS = ("channel", "recipient", "content_type", "author")


def is_harmony_json(data: Any) -> bool:
    """openai-harmony's `to_json` form (typed parts such as system_content, a channel or recipient on a message, or
    `name` on every message) rather than the OpenAI chat format."""
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        return False
    for m in msgs:
        if any(k in m for k in HARMONY_KEYS) or isinstance(m.get("role"), dict):
            return True
        parts = m.get("content")
        if isinstance(parts, list) and any(isinstance(p, dict) and p.get("type") in ("system_content",
                                                                                       "developer_content")
                                           for p in parts):
            return True
    return all("name" in m and isinstance(m.get("content"), list) for m in msgs)


def conversation_from_any(data: Any, effort: str | None = "medium", date: str | None = None,
                          identity: str | None = DEFAULT_IDENTITY) -> Conversation:
    """A conversation file's JSON: openai-harmony's form taken as is, or the OpenAI chat format (a list of messages,
    or a request body with `messages`, `tools` and `reasoning_effort`) mapped with a system message."""
    if is_harmony_json(data):
        return Conversation.from_obj(data)
    body = data if isinstance(data, dict) else {"messages": data}
    if not isinstance(body.get("messages"), list):
        raise EdgecError("a conversation is openai-harmony's {\"messages\": [...]} or OpenAI chat messages")
    effort = effort_of(body.get("reasoning_effort"), "reasoning_effort") or effort
    return conversation(from_chat(body["messages"], body.get("tools")), effort, date, identity)


# ---- Harmony -> responses ---------------------------------------------------------------------------------------
@dataclass
class Item:
    """One output item: reasoning (analysis), text (final or commentary), or a function call."""

    kind: str
    id: str
    text: str = ""
    name: str | None = None
    call_id: str | None = None
    done: bool = False


class Reply:
    """Turns the parser's events into output items, as they stream: `feed(event)` returns `(what, item, delta)`
    tuples, `what` being "start", "delta" or "done"."""

    def __init__(self):
        self.items: list[Item] = []
        self.calls: dict[str, str] = {}  # call id -> function name, for the tool results that follow

    def feed(self, ev: Any) -> list[tuple[str, Item, str]]:
        if ev.kind == "start":
            if ev.recipient not in (None, "all"):
                name = ev.recipient.removeprefix("functions.")
                item = Item("call", new_id("fc"), name=name, call_id=new_id("call"))
                self.calls[item.call_id] = name
            else:
                item = Item("reasoning" if ev.channel == "analysis" else "text", new_id("rs" if ev.channel ==
                                                                                       "analysis" else "msg"))
            self.items.append(item)
            return [("start", item, "")]
        if not self.items or self.items[-1].done:
            return []
        item = self.items[-1]
        if ev.kind == "delta":
            item.text += ev.text
            return [("delta", item, ev.text)]
        if ev.kind == "done":
            item.done = True
            return [("done", item, "")]
        return []

    def content(self) -> str:
        return "".join(i.text for i in self.items if i.kind == "text")

    def reasoning(self) -> str:
        return "".join(i.text for i in self.items if i.kind == "reasoning")

    def tool_calls(self) -> list[dict]:
        return [tool_call(i) for i in self.items if i.kind == "call"]

    def chat_message(self) -> dict:
        """The Chat Completions assistant message: content, reasoning_content and tool_calls apart."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content() or None}
        if reasoning := self.reasoning():
            msg["reasoning_content"] = reasoning
        if calls := self.tool_calls():
            msg["tool_calls"] = calls
        return msg

    def output_items(self, status: str = "completed") -> list[dict]:
        """The Responses API output items."""
        return [output_item(i, status) for i in self.items]


def tool_call(item: Item, index: int | None = None, arguments: str | None = None) -> dict:
    d: dict[str, Any] = {"id": item.call_id, "type": "function",
                         "function": {"name": item.name, "arguments": item.text if arguments is None else arguments}}
    return d if index is None else {"index": index, **d}


def output_item(item: Item, status: str = "completed") -> dict:
    text = item.text if item.done or status != "in_progress" else ""
    if item.kind == "reasoning":
        return {"type": "reasoning", "id": item.id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []}
    if item.kind == "call":
        return {"type": "function_call", "id": item.id, "call_id": item.call_id, "name": item.name,
                "arguments": text, "status": status}
    return {"type": "message", "id": item.id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if status != "in_progress" else []}
