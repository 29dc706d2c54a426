"""Harmony renderer: conversation -> token ids, token-for-token identical to openai-harmony (0.0.8).

Each message is `<|start|>{header}<|message|>{content}<|end|>` where the header is the role (a tool message: the
tool's name; `role:name` when a non-tool author has a name), then ` to={recipient}` (omitted for "all"), then
`<|channel|>{channel}`, then ` {content_type}` (a leading `<|constrain|>` is the special token). Each text piece is
tokenized on its own, as openai-harmony does. An assistant message with a recipient ends with `<|call|>`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import EdgecError
from .conversation import Conversation, DeveloperContent, Message, SystemContent, ToolNamespace
from .tokenizer import SPECIAL_TOKENS, Tokenizer

# the ids of the special tokens that carry Harmony's structure, named once by the tokenizer's table
_ID = {name: i for i, name in SPECIAL_TOKENS.items()}
START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    _ID[f"<|{n}|>"] for n in ("start", "end", "message", "channel", "constrain", "return", "call"))
STOP_TOKENS = (RETURN, CALL)  # sampling stops on these
END_TOKENS = (END, RETURN, CALL)  # any of these ends a message when parsing


def _lines(s: str) -> list[str]:
    """Rust's str::lines(): split on \\n, drop one trailing empty line, strip a trailing \\r from each line."""
    if not s:
        return []
    parts = s.split("\n")
    if parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def _json(v: Any) -> str:
    """serde_json's compact Display of a value."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _is_enum(s: Any) -> bool:
    return isinstance(s, dict) and isinstance(s.get("enum"), list) and len(s["enum"]) > 0


def _default_text(schema: dict, quote_enum_strings: bool) -> str:
    d = schema["default"]
    if isinstance(d, str) and not _is_enum(schema):
        return f'default: "{d}"'
    if isinstance(d, str) and not quote_enum_strings:
        return f"default: {d}"
    return f"default: {_json(d)}"


def _nullable(variant: Any, type_str: str) -> str:
    if isinstance(variant, dict) and variant.get("nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """JSON schema -> openai-harmony's TypeScript-like type (objects, enums, arrays, defaults, oneOf, nullable)."""
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for i, variant in enumerate(one_of):
            out += f"\n{indent} | " if i == 0 else f"\n{indent} | "
            out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
            comments = []
            if isinstance(variant, dict):
                if isinstance(variant.get("description"), str):
                    comments.append(variant["description"])
                if "default" in variant:
                    comments.append(_default_text(variant, quote_enum_strings=True))
            if comments:
                out += " // " + " ".join(comments)
        return out
    ty = schema.get("type")
    if isinstance(ty, list):
        names = ["number" if t == "integer" else t for t in ty if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(ty, str):
        return "any"
    if ty == "object":
        out = ""
        if isinstance(schema.get("description"), str):
            out += f"{indent}// {schema['description']}\n"
        out += "{\n"
        props = schema.get("properties")
        if isinstance(props, dict):
            req = schema.get("required")
            required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
            for key, val in props.items():
                out += _property(key, val, key in required, indent)
        return out + f"{indent}}}"
    if ty == "string":
        enum = schema.get("enum")
        if isinstance(enum, list):
            vals = [f'"{v}"' for v in enum if isinstance(v, str)]
            if vals:
                return " | ".join(vals)
        return "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _property(key: str, val: Any, required: bool, indent: str) -> str:
    opt = "" if required else "?"
    g = val.get if isinstance(val, dict) else (lambda k, d=None: d)
    out = ""
    if isinstance(g("title"), str):
        out += f"{indent}// {g('title')}\n{indent}//\n"
    one_of = g("oneOf")
    if one_of is None and isinstance(g("description"), str):
        out += f"{indent}// {g('description')}\n"
    examples = g("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        for ex in examples:
            if isinstance(ex, str):
                out += f'{indent}// - "{ex}"\n'
    if isinstance(one_of, list):
        prop_desc = g("description") if isinstance(g("description"), str) else None
        first = one_of[0] if one_of else None
        skip = prop_desc is not None and isinstance(first, dict) and first.get("description") == prop_desc
        above = False
        if not skip and prop_desc is not None:
            out += f"{indent}// {prop_desc}\n"
            above = True
        if "default" in val:
            out += f"{indent}// {_default_text(val, quote_enum_strings=False)}\n"
        out += f"{indent}{key}{opt}:\n"
        for i, variant in enumerate(one_of):
            out += f"{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
            comments = []
            vd = variant.get("description") if isinstance(variant, dict) else None
            if not (i == 0 and above) and isinstance(vd, str) and vd != prop_desc:
                comments.append(vd)
            if isinstance(variant, dict) and "default" in variant:
                comments.append(_default_text(variant, quote_enum_strings=False))
            if comments:
                out += " // " + " ".join(comments)
            out += "\n"
        return out + f"{indent},\n"
    out += f"{indent}{key}{opt}: " + _nullable(val, schema_to_typescript(val, indent + "    ")) + ","
    if one_of is None and isinstance(val, dict) and "default" in val:
        out += " // " + _default_text(val, quote_enum_strings=False)
    return out + "\n"


def tools_section(tools: dict[str, ToolNamespace]) -> str:
    """`# Tools` with one `## namespace` per tool namespace (sorted by name, as openai-harmony's BTreeMap)."""
    sections = ["# Tools"]
    for name in sorted(tools):
        ns = tools[name]
        part = [f"## {ns.name}\n"]
        if ns.description is not None:
            part += [f"// {ln}" if ns.tools else ln for ln in _lines(ns.description)]
        if ns.tools:
            part.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                part += [f"// {ln}" for ln in _lines(tool.description)]
                if tool.parameters is not None:
                    part.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
                else:
                    part.append(f"type {tool.name} = () => any;\n")
            part.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(part))
    return "\n\n".join(sections)


def system_text(sys: SystemContent, has_function_tools: bool = False) -> str:
    sections = []
    top = []
    if sys.model_identity is not None:
        top.append(sys.model_identity)
    if sys.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {sys.knowledge_cutoff}")
    if sys.conversation_start_date is not None:
        top.append(f"Current date: {sys.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if sys.reasoning_effort is not None:
        sections.append(f"Reasoning: {sys.reasoning_effort}")
    if sys.tools:
        sections.append(tools_section(sys.tools))
    if sys.valid_channels:
        head = f"# Valid channels: {', '.join(sys.valid_channels)}."
        if sys.channel_required:
            head += " Channel must be included for every message."
        if has_function_tools:
            head += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(head)
    return "\n\n".join(sections)


def developer_text(dev: DeveloperContent) -> str:
    sections = []
    if dev.instructions is not None:
        sections += ["# Instructions", dev.instructions]
    if dev.tools:
        sections.append(tools_section(dev.tools))
    return "\n\n".join(sections)


def render_message(msg: Message, tok: Tokenizer, has_function_tools: bool = False) -> list[int]:
    """One message as token ids."""
    enc = tok.encode_ordinary
    out = [START]
    if msg.role == "tool":
        if msg.name is None:
            raise EdgecError("a tool message needs a name (the tool that answered, e.g. functions.get_weather)")
        out += enc(msg.name)
    else:
        out += enc(msg.role)
        if msg.name is not None:
            out += enc(f":{msg.name}")
    if msg.recipient is not None and msg.recipient != "all":
        out += enc(f" to={msg.recipient}")
    if msg.channel is not None:
        out.append(CHANNEL)
        out += enc(msg.channel)
    if msg.content_type is not None:
        if msg.content_type.startswith("<|constrain|>"):
            out += enc(" ") + [CONSTRAIN] + enc(msg.content_type[len("<|constrain|>"):])
        else:
            out += enc(f" {msg.content_type}")
    out.append(MESSAGE)
    for part in msg.content:
        if isinstance(part, SystemContent):
            if msg.role != "system":
                raise EdgecError(f"system content may only appear in system messages, found in {msg.role}")
            out += enc(system_text(part, has_function_tools))
        elif isinstance(part, DeveloperContent):
            if msg.role != "developer":
                raise EdgecError(f"developer content may only appear in developer messages, found in {msg.role}")
            out += enc(developer_text(part))
        else:
            out += enc(part)
    out.append(CALL if msg.role == "assistant" and msg.recipient is not None else END)
    return out


def _has_function_tools(messages: list[Message]) -> bool:
    return any(isinstance(c, DeveloperContent) and c.tools and "functions" in c.tools and c.tools["functions"].tools
               for m in messages for c in m.content)


def visible_messages(messages: list[Message], auto_drop_analysis: bool = True) -> list[Message]:
    """The messages that get rendered: when the last assistant message is on the final channel, analysis messages
    before the first final-channel message are dropped (openai-harmony's rule)."""
    last_final = next((m.channel == "final" for m in reversed(messages) if m.role == "assistant"), False)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    if not (auto_drop_analysis and last_final and first_final is not None):
        return list(messages)
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


def render_conversation(conv: Conversation | list | dict | str, tokenizer: Tokenizer | None = None,
                        next_role: str | None = "assistant", auto_drop_analysis: bool = True) -> list[int]:
    """Token ids of a conversation; with `next_role` (default "assistant") the completion prompt
    `<|start|>{next_role}` is appended (openai-harmony's render_conversation_for_completion); next_role=None gives
    openai-harmony's render_conversation. `conv`: a Conversation, a list of Message, or the JSON form (str, dict
    `{"messages": [...]}` or a list of `{role, content}` dicts)."""
    tok = tokenizer or Tokenizer.default()
    if isinstance(conv, Conversation):
        messages = conv.messages
    elif isinstance(conv, str):
        messages = Conversation.from_json(conv).messages
    elif isinstance(conv, list) and all(isinstance(m, Message) for m in conv):
        messages = list(conv)
    else:
        messages = Conversation.from_obj(conv).messages
    fn = _has_function_tools(messages)
    out: list[int] = []
    for m in visible_messages(messages, auto_drop_analysis):
        out += render_message(m, tok, fn)
    if next_role is not None:
        out += [START] + tok.encode_ordinary(next_role)
    return out
