"""Harmony: gpt-oss's chat format (renderer, streaming parser, o200k_harmony tokenizer).

Pure Python (+ `regex`); token-for-token identical to openai-harmony, which the tests use as the oracle.

Public API (stable; the chat loop builds on it):

    tok = Tokenizer.from_folder(model_dir)                # or Tokenizer.default(): the vendored o200k vocabulary
    conv = Conversation([system_message("low", current_date="2025-06-01"),
                         developer_message("Be brief.", tools=load_tools("tools.json")),
                         Message("user", "What's the weather in Paris?")])
    ids = render_conversation(conv, tok)                  # ends with <|start|>assistant (next_role="assistant")

    parser = StreamParser(tok)                            # role "assistant" is already in the prompt
    for t in generated_ids:                               # stop sampling on STOP_TOKENS (<|return|>, <|call|>)
        for ev in parser.feed(t):                         # MessageStart / TextDelta / MessageDone / ToolCall
            ...
    parser.finish(); parser.messages                      # list[Message]

  - `Conversation.from_json(text)` / `conversation_from_json(text_or_obj)` read openai-harmony's
    `Conversation.to_json()` form or a plain list of {role, content}; `Conversation.to_json()` writes the former.
  - A tool result goes back as `Message("tool", result, name="functions.get_weather", channel="commentary",
    recipient="assistant")`; the assistant's call is `Message("assistant", args, channel="commentary",
    recipient="functions.get_weather", content_type="<|constrain|>json")`.
  - `edgec.harmony.openai` maps the OpenAI API (chat completions, responses, tools) to these messages and the
    parser's events back to content, reasoning and tool calls (used by `edgec serve`, `generate` and chat).
  - `render_conversation` drops analysis messages before the first final-channel message once the last assistant
    message is final (openai-harmony's rule), so the next prompt is not an extension of the previous one.
"""

from __future__ import annotations

from .conversation import (
    Conversation,
    DeveloperContent,
    Message,
    SystemContent,
    ToolDescription,
    ToolNamespace,
    developer_message,
    load_tools,
    system_message,
)
from .parser import Event, MessageDone, MessageStart, StreamParser, TextDelta, ToolCall, parse_completion
from .render import END_TOKENS, STOP_TOKENS, render_conversation, render_message, schema_to_typescript
from .tokenizer import Tokenizer, write_tokenizer_files


def conversation_from_json(data: str | bytes | dict | list) -> Conversation:
    """A Conversation from JSON text or an already-parsed object (openai-harmony form or a list of messages)."""
    if isinstance(data, str | bytes):
        return Conversation.from_json(data.decode() if isinstance(data, bytes) else data)
    return Conversation.from_obj(data)


def builtin_parity_conversations() -> list[tuple[str, Conversation]]:
    """A few realistic Harmony prompts (system + developer + user, a tool round trip, multi-turn) used by
    `edgec parity` to compare backends on the token sequences a chat really feeds the model."""
    weather = ToolDescription("get_weather", "Gets the current weather in a city.", {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "City name"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]})
    sys_low = system_message("low", current_date="2025-06-28")
    simple = Conversation([sys_low, Message("user", "What is the capital of France? Answer in one word.")])
    tools = Conversation([
        system_message("medium", current_date="2025-06-28"),
        developer_message("Use the tools when they help.", [weather]),
        Message("user", "What's the weather in Tokyo right now?"),
        Message("assistant", "Need to call get_weather for Tokyo.", channel="analysis"),
        Message("assistant", '{"location":"Tokyo"}', channel="commentary", recipient="functions.get_weather",
                content_type="<|constrain|>json"),
        Message("tool", '{"temperature":21,"sky":"clear"}', name="functions.get_weather", channel="commentary",
                recipient="assistant"),
    ])
    multi = Conversation([
        system_message("high"),
        developer_message("Answer in the user's language."),
        Message("user", "Bonjour ! Combien font 12 × 7 ?"),
        Message("assistant", "12*7=84.", channel="analysis"),
        Message("assistant", "12 × 7 = 84.", channel="final"),
        Message("user", "Et 84 ÷ 4 ?"),
    ])
    return [("harmony-simple", simple), ("harmony-tool-call", tools), ("harmony-multi-turn", multi)]


__all__ = [
    "END_TOKENS", "STOP_TOKENS", "Conversation", "DeveloperContent", "Event", "Message", "MessageDone",
    "MessageStart", "StreamParser", "SystemContent", "TextDelta", "ToolCall", "ToolDescription", "ToolNamespace",
    "Tokenizer", "builtin_parity_conversations", "conversation_from_json", "developer_message", "load_tools",
    "parse_completion", "render_conversation", "render_message", "schema_to_typescript",
    "system_message", "write_tokenizer_files",
]
