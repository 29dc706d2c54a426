"""Structured outputs (issue 22): constrained decoding through the one loop on mlx and onnx-cpu tiny outputs and
through `edgec generate`. Random tiny weights make the content meaningless; validity must be 100%, every time."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from edgec.cli import main
from edgec.harmony.parser import StreamParser
from edgec.harmony.render import CALL, END, RETURN, render_conversation
from edgec.harmony.tokenizer import Tokenizer
from edgec.runtime.constrain import Constraint, ConstraintError
from edgec.runtime.generate import Generator, Sampling

WORD = {"type": "string", "maxLength": 6}  # random weights rarely close a free string: bound every one
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user"],
               "properties": {"user": {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
                                       "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                                      "tag": WORD}}}},
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                     "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "any_of": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"enum": ["none", "many"]},
                         {"type": "boolean"}]},
    "optional": {"type": "object", "additionalProperties": False, "required": ["a"],
                 "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"enum": [1, 2, 3]}}},
    "pattern": {"type": "object", "additionalProperties": False, "required": ["code", "zip"],
                "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    "number_bounds": {"type": "object", "additionalProperties": False, "required": ["t", "p"],
                      "properties": {"t": {"type": "integer", "minimum": -40, "maximum": 50},
                                     "p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}},
    "defs_ref": {"$defs": {"pt": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                  "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                 "y": {"type": "integer", "minimum": 0, "maximum": 9}}}},
                 "type": "object", "additionalProperties": False, "required": ["from", "to"],
                 "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}}},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3,
                         "items": {"type": "object", "additionalProperties": False, "required": ["k"],
                                   "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "boolean"}}}},
    "const_and_string_len": {"type": "object", "additionalProperties": False, "required": ["v", "s"],
                             "properties": {"v": {"const": 2}, "s": {"type": "string", "minLength": 2,
                                                                     "maxLength": 4}}},
    "nullable_union": {"type": "object", "additionalProperties": False, "required": ["n"],
                       "properties": {"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 3},
                                      "l": {"type": "array", "items": {"enum": [True]}, "maxItems": 2}}},
}
SEEDS = range(8)
MAX_TOKENS = 256


def final_text(tok: Tokenizer, tokens: list[int]) -> str | None:
    """The final channel's text, parsed with edgec's Harmony parser (None: no final message)."""
    p = StreamParser(tok, role="assistant")
    for t in tokens:
        p.feed(t)
    p.finish()
    finals = [m.text for m in p.messages if m.channel == "final"]
    return finals[-1] if finals else None


@pytest.fixture(scope="module", params=["tiny_mlx", "tiny_onnx"])
def loop(request):
    """(Generator, tokenizer, prompt) on a converted tiny output."""
    from edgec.runtime.base import load_backend

    folder = request.getfixturevalue(request.param)
    tok = Tokenizer.from_folder(folder)
    prompt = render_conversation([{"role": "user", "content": "Answer in JSON."}], tok)
    return Generator(load_backend(folder, max_context=1024)), tok, prompt


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_is_always_valid(loop, name):
    gen, tok, prompt = loop
    schema = SCHEMAS[name]
    for seed in SEEDS:
        guard = Constraint(final={"json_schema": schema}, think_tokens=seed % 4).compile(tok)
        r = gen.generate(prompt, Sampling(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS), guard=guard)
        assert r.stats.stop == "return", (name, seed, tok.decode(r.tokens))
        assert guard.accepting() and not guard.constrained_open()
        jsonschema.validate(json.loads(final_text(tok, r.tokens)), schema)


class Recording:
    """A guard that records, before each step, whether <|return|> is allowed and the final text so far."""

    def __init__(self, guard, tok):
        self.guard, self.tok = guard, tok
        self.seen: list[int] = []
        self.allowed_return: list[tuple[bool, str | None]] = []

    def mask(self):
        m = self.guard.mask()
        text = final_text(self.tok, self.seen) if self.guard.constrained_open() else None
        self.allowed_return.append((bool(m[RETURN]), text))
        assert not m[CALL]  # no tools: a call is never allowed
        return m

    def consume(self, t):
        self.seen.append(t)
        self.guard.consume(t)


def test_stop_tokens_are_allowed_exactly_when_the_json_is_complete(loop):
    """At every step <|return|> is allowed iff the final text so far is a complete, valid document."""
    gen, tok, prompt = loop
    schema = SCHEMAS["array_bounds"]
    for seed in range(3):
        rec = Recording(Constraint(final={"json_schema": schema}, think_tokens=2).compile(tok), tok)
        gen.generate(prompt, Sampling(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS), guard=rec)
        assert rec.seen[-1] == RETURN
        for ok, text in rec.allowed_return:
            complete = False
            if text is not None:
                try:
                    jsonschema.validate(json.loads(text), schema)
                    complete = True
                except (ValueError, jsonschema.ValidationError):
                    pass
            assert ok == complete, (text, ok)


def test_think_tokens_caps_the_analysis(loop):
    gen, tok, prompt = loop
    for seed in range(4):
        guard = Constraint(final={"json_schema": SCHEMAS["enum"]}, think_tokens=3).compile(tok)
        r = gen.generate(prompt, Sampling(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS), guard=guard)
        if r.tokens[1] == tok.encode("analysis")[0]:
            assert r.tokens.index(END) <= 3 + 3  # <|channel|> analysis <|message|> + at most 3 tokens
        assert r.stats.stop == "return"


def test_max_tokens_inside_the_json_is_length_never_valid(loop):
    gen, tok, prompt = loop
    free = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    guard = Constraint(final={"json_schema": free}, think_tokens=0).compile(tok)
    r = gen.generate(prompt, Sampling(temperature=1.0, seed=0, max_tokens=12), guard=guard)
    assert r.stats.stop == "max_tokens"
    assert guard.constrained_open() and not guard.accepting()
    with pytest.raises(ValueError):
        json.loads(final_text(tok, r.tokens))


def test_lark_and_regex(loop):
    gen, tok, prompt = loop
    lark = 'start: "yes" | "no" | "n=" NUM\nNUM: /[0-9]{1,3}/'
    for seed in range(4):
        for final, check in [({"lark": lark}, r"^(yes|no|n=[0-9]{1,3})$"), ({"regex": r"[a-c]{2}-[0-9]{2}"},
                                                                             r"^[a-c]{2}-[0-9]{2}$")]:
            guard = Constraint(final=final, think_tokens=1).compile(tok)
            r = gen.generate(prompt, Sampling(temperature=1.0, seed=seed, max_tokens=64), guard=guard)
            assert r.stats.stop == "return"
            assert re.match(check, final_text(tok, r.tokens)), final_text(tok, r.tokens)


def test_strict_tools_and_tool_choice(loop):
    gen, tok, prompt = loop
    weather = {"type": "object", "additionalProperties": False, "required": ["city"],
               "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                              "maximum": 7}}}
    other = {"type": "object", "additionalProperties": False, "properties": {"q": {"enum": ["x"]}}, "required": ["q"]}
    tools = {"get_weather": weather, "other": other}
    for seed in range(4):
        for choice, want in [("required", None), ({"name": "get_weather"}, "get_weather")]:
            guard = Constraint(tools=tools, tool_choice=choice, think_tokens=2).compile(tok)
            r = gen.generate(prompt, Sampling(temperature=1.0, seed=seed, max_tokens=64), guard=guard)
            assert r.stats.stop == "call"
            p = StreamParser(tok, role="assistant")
            for t in r.tokens:
                p.feed(t)
            call = p.messages[-1]
            name = call.recipient.removeprefix("functions.")
            assert want in (None, name)
            jsonschema.validate(json.loads(call.text), tools[name])
        guard = Constraint(tools=tools, tool_choice="none", think_tokens=2).compile(tok)
        r = gen.generate(prompt, Sampling(temperature=1.0, seed=seed, max_tokens=8), guard=guard)
        assert CALL not in r.tokens and tok.encode("commentary")[0] not in r.tokens[:2]


def test_unsupported_or_malformed_constraints_are_refused():
    tok = Tokenizer.default()
    cases = [
        ({"json_schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}},
         "rf.schema/properties/a/not"),
        ({"json_schema": {"type": "string", "format": "no-such-format"}}, "rf.schema/format"),
        ({"json_schema": {"properties": {"not": {"type": "integer"}, "b": {"not": {}}}}},
         "rf.schema/properties/b/not"),  # a property named "not" is a name, not the keyword
        ({"json_schema": ["not", "an", "object"]}, "rf.schema"),
        ({"lark": "start: @@@"}, "rf.schema"),
        ({"regex": "(unclosed"}, "rf.schema"),
        ({"xml": "<a/>"}, "rf.schema"),
    ]
    for final, param in cases:
        with pytest.raises(ConstraintError) as e:
            Constraint(final=final, param="rf.schema").compile(tok)
        assert e.value.param == param, (final, e.value)
    with pytest.raises(ConstraintError, match="tool_choice"):
        Constraint(tool_choice="required").compile(tok)
    with pytest.raises(ConstraintError, match="tool_choice"):
        Constraint(tools={"f": {"type": "object"}}, tool_choice={"name": "g"}).compile(tok)
    with pytest.raises(ConstraintError) as e:
        Constraint(tools={"f": {"type": "object", "properties": {"a": {"not": {}}}}}).compile(tok)
    assert e.value.param == "tools.f.parameters/properties/a/not"


def test_mask_is_none_free_and_masks_are_bool_vocab():
    tok = Tokenizer.default()
    guard = Constraint(final={"json_object": True}).compile(tok)
    m = guard.mask()
    assert m.dtype == np.bool_ and m.shape == (tok.vocab_size,)
    assert m[tok.encode("<|channel|>", allowed_special="all")[0]] and m.sum() == 1  # the reply opens with it


def _generate(args):
    return CliRunner().invoke(main, ["generate", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("name", SCHEMAS)
def test_generate_cli_json_schema(tiny_onnx, tmp_path, name):
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(SCHEMAS[name]))
    r = _generate([tiny_onnx, "--prompt", "hi", "--json-schema", f, "--think-tokens", 2, "--max-tokens", MAX_TOKENS,
                   "--seed", 11, "--max-context", 1024, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and out["valid"] is True
    final = [m["text"] for m in out["messages"] if m["channel"] == "final"][-1]
    jsonschema.validate(json.loads(final), SCHEMAS[name])


def test_generate_cli_length_and_refusal(tiny_onnx, tmp_path):
    free = tmp_path / "free.json"
    free.write_text(json.dumps({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}))
    r = _generate([tiny_onnx, "--prompt", "hi", "--json-schema", free, "--think-tokens", 0, "--max-tokens", 10,
                   "--max-context", 1024, "--seed", 0, "--json"])
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "length" and out["valid"] is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"a": {"not": {}}}}))
    r = _generate([tiny_onnx, "--prompt", "hi", "--json-schema", bad])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith(f"error: {bad}/properties/a/not: unsupported")
    assert "Traceback" not in r.output


def test_chat_schema_command(tiny_onnx, tmp_path):
    """/schema FILE constrains the next answers, a bad file is one red line and the chat goes on, /schema off ends
    it (the --json of generate is the checked surface; here the answer printed on stdout is validated)."""
    f = tmp_path / "s.json"
    f.write_text(json.dumps(SCHEMAS["defs_ref"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"a": {"not": {}}}}))
    lines = [f"/schema {bad}", f"/schema {f}", "where?", "/schema off", "/exit"]
    r = CliRunner().invoke(main, ["chat", str(tiny_onnx), "--think-tokens", "1", "--max-tokens", str(MAX_TOKENS),
                                  "--max-context", "1024", "--seed", "3"], input="\n".join(lines) + "\n",
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"{bad}/properties/a/not: unsupported" in r.stderr
    assert "schema off" in r.stderr
    jsonschema.validate(json.loads(r.stdout.strip().splitlines()[-1]), SCHEMAS["defs_ref"])


def test_generate_cli_gbnf_grammar(tiny_onnx, tmp_path):
    """A llama.cpp GBNF file goes through llguidance's converter; the answer matches it."""
    g = tmp_path / "answer.gbnf"
    g.write_text('root ::= "yes" | "no" | num\nnum ::= [0-9] [0-9]?\n')
    for seed in range(3):
        r = _generate([tiny_onnx, "--prompt", "hi", "--grammar", g, "--think-tokens", 1, "--max-tokens", 32,
                       "--max-context", 512, "--seed", seed, "--json"])
        out = json.loads(r.stdout)
        assert out["valid"] is True
        assert re.fullmatch(r"yes|no|[0-9]{1,2}", [m["text"] for m in out["messages"] if m["channel"] == "final"][-1])
