"""Structured outputs: the one constraint-engine adapter (llguidance), Harmony-aware.

A `Constraint` says what the assistant reply may be: the final channel's text (a JSON schema, any JSON object, a
Lark grammar or a regex), strict tools (each call's arguments match its `parameters` schema) and `tool_choice`.
`compile(tokenizer)` turns it into ONE Lark grammar for the whole reply after the prompt's `<|start|>assistant`:

    start:    analysis? (final | call_0 | call_1 ...)
    analysis: <|channel|>analysis<|message|> free text <|end|><|start|>assistant
    final:    <|channel|>final<|message|> @final <|return|>
    call_i:   <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> @tool_i <|call|>

so the analysis stays free, the constraint holds inside the final message and inside the tool-call arguments, and
the stop tokens (`<|return|>`, `<|call|>`) are allowed exactly when the grammar accepts. tool_choice picks the
alternatives: "none" has no call branch, "required" no final branch, {"name": fn} only that function's call.
`think_tokens` caps the analysis: over budget the guard allows only `<|end|>`.

A `Guard` follows one generation: `mask()` is the bool [vocab] of allowed next tokens, `consume(tok)` advances it.
The generation loop (generate.py) computes the mask for step t+1 in a thread while the backend runs step t
(llguidance releases the GIL while it computes a mask).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgecError, require
from ..harmony.render import CALL, CHANNEL, END, MESSAGE, RETURN

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_TEXT = 'TEXT: /(?s:.*)/'  # any text; special tokens are not text, so they never match it
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps' layout


class ConstraintError(EdgecError):
    """A constraint that cannot be compiled; raised before any token is generated. `param` names where the problem
    is (the caller's prefix, then a JSON pointer to the offending keyword)."""

    def __init__(self, message: str, param: str):
        super().__init__(f"{param}: {message}")
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Constraint:
    final: dict | None = None  # {"json_schema": {...}} | {"json_object": True} | {"lark": "..."} | {"regex": "..."}
    tools: dict[str, dict] = field(default_factory=dict)  # strict tools: function name -> parameters JSON schema
    tool_choice: str | dict = "auto"  # "auto" | "none" | "required" | {"name": "fn"}
    think_tokens: int | None = None  # analysis budget; then the guard forces the end of analysis
    param: str = "constraint"  # where `final`'s value came from, e.g. "response_format.json_schema.schema": the
    # prefix of ConstraintError.param, followed by a JSON pointer into a schema

    def grammar(self) -> str:
        """The whole reply's grammar: llguidance's top-level JSON (a Lark main grammar plus named sub-grammars)."""
        subs: list[dict] = []
        branches: list[str] = []
        rules: list[str] = []
        names = self._calls()
        if self.tool_choice != "required" and not isinstance(self.tool_choice, dict):
            body = "TEXT"
            if self.final is not None:
                subs.append({**_sub_grammar(self.final, self.param), "name": "final"})
                body = "@final"
            rules.append(f'final: <|channel|> "final" <|message|> {body} <|return|>')
            branches.append("final")
        for i, name in enumerate(names):
            head = json.dumps(f"commentary to=functions.{name} ")
            subs.append({**_json_grammar(self.tools[name], f"tools.{name}.parameters"), "name": f"tool_{i}"})
            rules.append(f'call_{i}: <|channel|> {head} <|constrain|> "json" <|message|> @tool_{i} <|call|>')
            branches.append(f"call_{i}")
        if not branches:
            raise ConstraintError('tool_choice "required" needs at least one strict tool', "tool_choice")
        main = "\n".join([f"start: analysis? ({' | '.join(branches)})",
                          'analysis: <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"',
                          *rules, _TEXT])
        return json.dumps({"grammars": [{"lark_grammar": main}, *subs]})

    def _calls(self) -> list[str]:
        if not isinstance(self.tools, dict):
            raise ConstraintError("must map function names to parameter schemas", "tools")
        for name, schema in self.tools.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConstraintError(f"function name {name!r} must be 1-128 of A-Z a-z 0-9 _ . -", "tools")
            if not isinstance(schema, dict):
                raise ConstraintError("must be a JSON schema object", f"tools.{name}.parameters")
        choice = self.tool_choice
        if choice in ("auto", "required"):
            return list(self.tools)
        if choice == "none":
            return []
        if isinstance(choice, dict) and set(choice) == {"name"}:
            if choice["name"] not in self.tools:
                raise ConstraintError(f"names {choice['name']!r}, which is not a strict tool", "tool_choice")
            return [choice["name"]]
        raise ConstraintError('must be "auto", "none", "required" or {"name": FUNCTION}', "tool_choice")

    def compile(self, tokenizer: Any) -> Guard:
        """Validate and compile (cached per tokenizer and grammar); a fresh Guard for one generation."""
        if self.think_tokens is not None and (not isinstance(self.think_tokens, int) or self.think_tokens < 0):
            raise ConstraintError(f"must be an integer >= 0 (got {self.think_tokens!r})", "think_tokens")
        template = _matcher(_lltokenizer(tokenizer), self.grammar())
        if isinstance(template, str):
            raise self._explain(template)
        return Guard(template.deep_copy(), tokenizer, self.think_tokens)

    def _explain(self, error: str) -> ConstraintError:
        """llguidance's message, with the JSON pointer of the keyword it names where it can be found."""
        msg = error.strip().splitlines()[0] if error.strip() else "the grammar does not compile"
        schemas = [(self.param, (self.final or {}).get("json_schema"))] if self.final else []
        schemas += [(f"tools.{n}.parameters", s) for n, s in self.tools.items()]
        keys = re.search(r"Unimplemented keys: \[(.*?)\]", msg)
        fmt = re.search(r"Unknown format: (\S+)", msg)
        for where, schema in schemas:
            if not isinstance(schema, dict):
                continue
            if keys:
                ptr = _pointer(schema, lambda k, v: f'"{k}"' in keys.group(1))
            elif fmt:
                ptr = _pointer(schema, lambda k, v: k == "format" and v == fmt.group(1))
            else:
                ptr = None
            if ptr is not None:
                return ConstraintError(f"unsupported: {msg}", where + ptr)
        return ConstraintError(msg, self.param if self.final is not None or not self.tools else "tools")


def read_constraint(json_schema: Path | None = None, grammar: Path | None = None, regex: str | None = None,
                    think_tokens: int | None = None) -> Constraint | None:
    """The constraint of `edgec generate --json-schema FILE | --grammar FILE | --regex R [--think-tokens N]` (None:
    none given); a bad file is a one-line error naming it."""
    from ..jsonio import read_json

    given = [x for x in (json_schema, grammar, regex) if x is not None]
    if len(given) > 1:
        raise EdgecError("give at most one of --json-schema, --grammar, --regex")
    if json_schema is not None:
        return Constraint(final={"json_schema": read_json(json_schema)}, think_tokens=think_tokens,
                          param=str(json_schema))
    if grammar is not None:
        from ..jsonio import regular_file

        regular_file(grammar, "grammar file")
        text = grammar.read_text(encoding="utf-8", errors="replace")
        if "::=" in text:  # GBNF (llama.cpp): llguidance converts it to Lark
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except Exception as e:
                raise ConstraintError(f"GBNF does not convert ({e})", str(grammar)) from None
        return Constraint(final={"lark": text}, think_tokens=think_tokens, param=str(grammar))
    if regex is not None:
        return Constraint(final={"regex": regex}, think_tokens=think_tokens, param="--regex")
    return None if think_tokens is None else Constraint(think_tokens=think_tokens, param="--think-tokens")


def _sub_grammar(final: Any, param: str) -> dict:
    """The final channel's grammar as an llguidance sub-grammar; refuses a malformed `final` naming its field."""
    if not isinstance(final, dict) or len(final) != 1:
        raise ConstraintError("must be one of {json_schema}, {json_object}, {lark}, {regex}", param)
    (kind, value), = final.items()
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise ConstraintError("must be a JSON object", param)
        return _json_grammar(value, param)
    if kind == "json_object":
        return _json_grammar({"type": "object"}, param)
    if kind in ("lark", "regex"):
        if not isinstance(value, str) or not value:
            raise ConstraintError(f"{kind}: must be a non-empty string", param)
        if kind == "regex":
            return json.loads(require("llguidance", "constrain").LLMatcher.grammar_from_regex(value))["grammars"][0]
        return {"lark_grammar": value}
    raise ConstraintError(f"unknown kind {kind!r} (json_schema, json_object, lark or regex)", param)


def _json_grammar(schema: dict, param: str) -> dict:
    """A JSON schema as an llguidance sub-grammar, laid out as json.dumps does (no free whitespace: a model that
    loves blanks cannot pad the object forever)."""
    llg = require("llguidance", "constrain")
    try:
        return json.loads(llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_STYLE))["grammars"][0]
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"not a JSON schema ({e})", param) from None


_NAMES = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # keys below are names


def _pointer(schema: Any, hit, path: str = "", names: bool = False) -> str | None:
    """JSON pointer (RFC 6901) of the first keyword/value pair in `schema` where hit(keyword, value); the keys of
    `properties` and the like are names, not keywords, and are only walked through."""
    items = schema.items() if isinstance(schema, dict) else enumerate(schema) if isinstance(schema, list) else ()
    for k, v in items:
        here = f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}"
        if isinstance(schema, dict) and not names and hit(k, v):
            return here
        found = _pointer(v, hit, here, isinstance(schema, dict) and not names and k in _NAMES)
        if found is not None:
            return found
    return None


@lru_cache(maxsize=4)
def _lltokenizer(tok: Any):
    """llguidance's tokenizer from edgec's (same ranks, specials and split pattern); ~1 s, so once per tokenizer."""
    llg = require("llguidance", "constrain")
    specials = {name: i for i, name in tok.specials.items()}
    return llg.LLTokenizer.from_tiktoken(encoder=tok.ranks, special_tokens=specials, pattern=tok.pattern.pattern,
                                         eos_token=RETURN, n_vocab=tok.vocab_size)


@lru_cache(maxsize=64)
def _matcher(lltok: Any, grammar: str):
    """A compiled matcher to copy per generation, or llguidance's error text."""
    llg = require("llguidance", "constrain")
    bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if bad:
        return messages[0] if messages else "the grammar does not compile"
    m = llg.LLMatcher(lltok, grammar, log_level=0)
    return m.get_error() if m.is_error() else m


class Guard:
    """One generation's constraint state (see the module docstring)."""

    def __init__(self, matcher: Any, tokenizer: Any, think_tokens: int | None):
        self.m = matcher
        self.tok = tokenizer
        self.think_tokens = think_tokens
        self.vocab = tokenizer.vocab_size
        self.bits = np.full((1, (self.vocab + 31) // 32), -1, dtype=np.int32)
        self.header: list[int] | None = None  # the tokens after <|channel|>, until <|message|>
        self.channel = ""  # the open message's header text ("" = between messages)
        self.thought = 0  # analysis tokens so far

    def mask(self) -> np.ndarray | None:
        """Allowed next tokens, bool [vocab] (None = all allowed)."""
        from llguidance.numpy import fill_next_token_bitmask

        if self.m.is_error():
            raise EdgecError(f"constraint: {self.m.get_error()}")
        fill_next_token_bitmask(self.m, self.bits)
        allowed = np.unpackbits(self.bits[0].view(np.uint8), bitorder="little")[:self.vocab].astype(bool)
        if self.think_tokens is not None and self.channel == "analysis" and self.thought >= self.think_tokens:
            end = allowed[END]
            allowed[:] = False
            allowed[END] = end
        return allowed

    def consume(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise EdgecError(f"constraint: token {token} is not allowed here ({self.m.get_error()})")
        if token == CHANNEL:
            self.header = []
        elif token == MESSAGE and self.header is not None:
            self.channel = self.tok.decode(self.header).strip() or "?"
            self.header = None
        elif token in (END, RETURN, CALL):
            self.channel = ""
        elif self.header is not None:
            self.header.append(int(token))
        elif self.channel == "analysis":
            self.thought += 1

    def accepting(self) -> bool:
        """The constrained part is complete: the reply's grammar accepts (or has ended with its stop token)."""
        return self.m.is_accepting() or self.m.is_stopped()

    def constrained_open(self) -> bool:
        """Inside the final message or a tool call's arguments now (a stop there is "length", not valid output)."""
        return self.channel not in ("", "analysis")
