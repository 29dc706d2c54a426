"""Streaming Harmony parser: token ids in, events out.

    parser = StreamParser(tokenizer)           # after a prompt ending in <|start|>assistant (role="assistant")
    for tok in generated:
        for ev in parser.feed(tok):
            ...                                # MessageStart, TextDelta, MessageDone, ToolCall
    parser.finish()                            # end of stream (flushes a message cut off without <|end|>)

Header parsing follows openai-harmony's StreamableParser (channel after `<|channel|>`, recipient `to=...`,
content type such as `<|constrain|>json`). Text deltas are emitted as soon as their bytes form complete UTF-8
characters (partial multi-byte characters are buffered). A model that breaks the format never makes this raise:
tokens outside a message, an over-long or unparsable header, or a `<|start|>` inside a message are handled by
treating the stray tokens as plain text of an assistant message (or closing the message), and parsing goes on.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgecError
from .conversation import ROLES, Message
from .render import CALL, END_TOKENS, MESSAGE, RETURN, START
from .tokenizer import Tokenizer

MAX_HEADER_TOKENS = 64  # a real header is ~5-20 tokens; past this the stream is treated as text


@dataclass
class MessageStart:
    role: str
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    kind: str = field(default="start", init=False)


@dataclass
class TextDelta:
    text: str
    channel: str | None = None
    kind: str = field(default="delta", init=False)


@dataclass
class MessageDone:
    message: Message
    end_token: int | None = None  # <|end|>, <|return|>, <|call|>, or None (end of stream / implicit)
    kind: str = field(default="done", init=False)


@dataclass
class ToolCall:
    recipient: str
    arguments: str
    channel: str | None = None
    content_type: str | None = None
    kind: str = field(default="tool_call", init=False)

    def json_arguments(self) -> Any:
        """The arguments parsed as JSON, or None when they are not valid JSON."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return None


Event = MessageStart | TextDelta | MessageDone | ToolCall


def parse_header(text: str, role: str | None) -> MessageStart:
    """openai-harmony's header grammar; raises ValueError on a header it would reject."""
    channel = None
    marker = "<|channel|>"
    idx = text.find(marker)
    if idx >= 0:
        after = text[idx + len(marker):]
        end = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        if end == 0:
            raise ValueError("channel marker present but no channel value found in header")
        channel = after[:end]
        text = text[:idx] + after[end:]
    text = text.strip()
    if "<|constrain|>" in text:
        text = text.replace("<|constrain|>", " <|constrain|>").strip()
    parts = text.split()  # (harmony splits on ASCII whitespace; non-ASCII spaces in headers are not expected)
    name = None
    if role is None:
        if not parts:
            raise ValueError("message header did not contain a role")
        first = parts[0]
        if first in ROLES:
            role = first
        elif len(parts) > 1 or first.startswith("to="):
            parts.pop(0)
            role, name = "tool", first
        else:
            raise ValueError(f"unknown role: {first}")
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        n = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif n == 1:
            recipient = last
        else:
            content_type = last
            if parts:
                raw = parts.pop()
                recipient = raw[3:] if raw.startswith("to=") else raw
    if parts:
        raise ValueError(f"unexpected tokens remaining in message header: {parts}")
    return MessageStart(role, name, channel, recipient, content_type)


class StreamParser:
    """Incremental Harmony parser. `role` is the role already rendered in the prompt (`<|start|>assistant`);
    pass role=None when the stream starts with `<|start|>` itself. A special token the model puts inside a message's
    text is decoded to its name, as openai-harmony does; with special_text=False it is left out of the text (what
    an API client reads must never hold Harmony markup)."""

    def __init__(self, tokenizer: Tokenizer | None = None, role: str | None = "assistant", special_text: bool = True):
        self.tok = tokenizer or Tokenizer.default()
        self.special_text = special_text
        self.messages: list[Message] = []
        self.tokens: list[int] = []
        self.stopped_on: int | None = None  # the last <|return|> / <|call|> seen
        self._next_role = role
        self._state = "header" if role is not None else "start"
        self._header_tokens: list[int] = []
        self._header: MessageStart | None = None
        self._content: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    # state ----------------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """"start" (expecting <|start|>), "header" or "content"."""
        return self._state

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._state == "content" and self._header else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._state == "content" and self._header else None

    # feeding --------------------------------------------------------------------------------------------------
    def feed(self, token: int) -> list[Event]:
        """Consume one token id; return the events it produced."""
        token = int(token)
        self.tokens.append(token)
        if token in (RETURN, CALL):
            self.stopped_on = token
        if self._state == "start":
            if token == START:
                self._begin_header(None)
                return []
            if token in END_TOKENS:
                return []  # a stray end marker between messages: nothing to close
            return self._begin_text_message() + self._content_token(token)
        if self._state == "header":
            if token == MESSAGE:
                return self._finish_header()
            if token in END_TOKENS or token == START or len(self._header_tokens) >= MAX_HEADER_TOKENS:
                events = self._header_as_text()
                if token == START:
                    events += self._close(None)
                    self._begin_header(None)
                elif token in END_TOKENS:
                    events += self._close(token)
                else:
                    events += self._content_token(token)
                return events
            self._header_tokens.append(token)
            return []
        # content
        if token in END_TOKENS:
            return self._close(token)
        if token == START:  # the model forgot <|end|>: close the message, a new one starts
            events = self._close(None)
            self._begin_header(None)
            return events
        return self._content_token(token)

    def feed_many(self, tokens) -> list[Event]:
        out: list[Event] = []
        for t in tokens:
            out += self.feed(t)
        return out

    def finish(self, header_as_text: bool = True) -> list[Event]:
        """End of stream: close a message that had no end token (a header without <|message|> becomes text, or is
        dropped with header_as_text=False)."""
        if self._state == "content":
            return self._close(None)
        if self._state == "header" and self._header_tokens and header_as_text:
            return self._header_as_text() + self._close(None)
        self._state = "start"
        return []

    # internals ------------------------------------------------------------------------------------------------
    def _begin_header(self, role: str | None) -> None:
        self._state, self._next_role, self._header_tokens = "header", role, []

    def _start_content(self, header: MessageStart) -> list[Event]:
        self._state, self._header, self._content = "content", header, []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._next_role = None
        return [header]

    def _finish_header(self) -> list[Event]:
        try:
            header = parse_header(self.tok.decode(self._header_tokens), self._next_role)
        except (ValueError, EdgecError):  # unparsable header, or ids outside the vocabulary
            return self._header_as_text()
        return self._start_content(header)

    def _begin_text_message(self) -> list[Event]:
        return self._start_content(MessageStart(self._next_role or "assistant"))

    def _header_as_text(self) -> list[Event]:
        """A header that cannot be parsed: its tokens become the text of an assistant message."""
        toks = self._header_tokens
        self._header_tokens = []
        events = self._begin_text_message()
        for t in toks:
            events += self._content_token(t)
        return events

    def _content_token(self, token: int) -> list[Event]:
        if not self.special_text and self.tok.is_special(token):
            return []
        self._content.append(token)
        try:
            data = self.tok.decode_bytes([token])
        except EdgecError:  # an id outside the vocabulary: keep going, show a replacement character
            data = b"\xef\xbf\xbd"
            self._content[-1] = -1
        text = self._decoder.decode(data)
        return [TextDelta(text, self._header.channel if self._header else None)] if text else []

    def _close(self, end_token: int | None) -> list[Event]:
        h = self._header or MessageStart("assistant")
        data = b"".join(self.tok.decode_bytes([t]) if t >= 0 else b"\xef\xbf\xbd" for t in self._content)
        msg = Message(h.role, [data.decode("utf-8", "replace")], h.name, h.channel, h.recipient, h.content_type)
        self.messages.append(msg)
        events: list[Event] = []
        tail = self._decoder.decode(b"", final=True)
        if tail:
            events.append(TextDelta(tail, h.channel))
        events.append(MessageDone(msg, end_token))
        if msg.role == "assistant" and msg.recipient not in (None, "all"):
            events.append(ToolCall(msg.recipient, msg.text, msg.channel, msg.content_type))  # type: ignore[arg-type]
        self._state, self._header, self._content, self._next_role = "start", None, [], None
        return events


def parse_completion(tokens, tokenizer: Tokenizer | None = None, role: str | None = "assistant") -> list[Message]:
    """All messages of a completion (openai-harmony's parse_messages_from_completion_tokens)."""
    p = StreamParser(tokenizer, role)
    p.feed_many(tokens)
    p.finish()
    return p.messages
