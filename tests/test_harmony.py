"""Harmony renderer, parser and CLI vs openai-harmony (the test-only oracle, offline via TIKTOKEN_ENCODINGS_BASE)."""

from __future__ import annotations

import json
import random

import openai_harmony as H  # test-only oracle, installed with edgec[test]
import pytest
from click.testing import CliRunner

from edgec.harmony import (
    STOP_TOKENS,
    Conversation,
    Message,
    MessageDone,
    MessageStart,
    StreamParser,
    TextDelta,
    Tokenizer,
    ToolCall,
    conversation_from_json,
    developer_message,
    parse_completion,
    render_conversation,
    system_message,
)


@pytest.fixture(scope="module")
def enc():
    return H.load_harmony_encoding(H.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def oracle(enc, conv_json: str, next_role: str | None = "assistant", drop: bool = True) -> list[int]:
    """openai-harmony's rendering of the exact JSON we render (its Rust core reads the same to_json form)."""
    cfg = {"auto_drop_analysis": drop}
    if next_role is None:
        return list(enc._inner.render_conversation(conversation_json=conv_json, config=cfg))
    return list(enc._inner.render_conversation_for_completion(conversation_json=conv_json, next_turn_role=next_role,
                                                             config=cfg))


# ---------------------------------------------------------------------------------------------------------------
# hand-written battery, built with openai-harmony's own Python objects
# ---------------------------------------------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "description": "Weather query",
    "properties": {
        "location": {"type": "string", "description": "City and country", "title": "Location",
                     "examples": ["Paris, France", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "Forecast days", "default": 1},
        "details": {"type": "object", "description": "Extra", "properties": {
            "wind": {"type": "boolean", "default": False},
            "hours": {"type": "array", "items": {"type": "integer"}},
            "deep": {"type": "object", "properties": {"x": {"type": ["string", "null"]}}, "required": ["x"]}},
            "required": ["wind"]},
        "format": {"description": "Output format", "oneOf": [
            {"type": "string", "enum": ["short", "long"], "description": "Output format"},
            {"type": "object", "properties": {"template": {"type": "string"}}, "nullable": True,
             "description": "custom", "default": {"template": "{t}"}}], "default": "short"},
        "tags": {"type": "array"},
        "anything": {},
        "maybe": {"type": "number", "nullable": True, "default": 0.5},
    },
    "required": ["location", "format"],
}


def _msgs(H):
    R = H.Role
    sysc = (H.SystemContent.new().with_reasoning_effort(H.ReasoningEffort.HIGH)
            .with_conversation_start_date("2025-06-28"))
    dev = (H.DeveloperContent.new().with_instructions("Always answer in French.\nBe brief.")
           .with_function_tools([H.ToolDescription.new("get_weather", "Gets the weather.\nSecond line.", WEATHER),
                                 H.ToolDescription.new("ping", "No parameters")]))
    user = H.Message.from_role_and_content(R.USER, "Quel temps fait-il à Paris ? 🌦️ «»")
    think = H.Message.from_role_and_content(R.ASSISTANT, "User wants weather. Call tool.").with_channel("analysis")
    call = (H.Message.from_role_and_content(R.ASSISTANT, '{"location":"Paris, France"}').with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    result = (H.Message.from_author_and_content(H.Author.new(R.TOOL, "functions.get_weather"), '{"temp":18}')
              .with_recipient("assistant").with_channel("commentary"))
    final = H.Message.from_role_and_content(R.ASSISTANT, "Il fait 18 °C.").with_channel("final")
    return R, sysc, dev, user, think, call, result, final


def battery(H) -> dict[str, list]:
    R, sysc, dev, user, think, call, result, final = _msgs(H)
    S = H.Message.from_role_and_content
    cases = {
        "tools-round-trip": [S(R.SYSTEM, sysc), S(R.DEVELOPER, dev), user, think, call, result],
        "multi-turn-dropped-analysis": [S(R.SYSTEM, sysc), S(R.DEVELOPER, dev), user, think, call, result,
                                        H.Message.from_role_and_content(R.ASSISTANT, "ok").with_channel("analysis"),
                                        final, S(R.USER, "Et demain ?"),
                                        S(R.ASSISTANT, "tomorrow?").with_channel("analysis"),
                                        S(R.ASSISTANT, "Pluie.").with_channel("final")],
        "last-assistant-not-final-keeps-analysis": [S(R.SYSTEM, sysc), user, think, final, S(R.USER, "?"),
                                                    S(R.ASSISTANT, "hmm").with_channel("analysis")],
        "no-system-message": [S(R.USER, "just a user"), S(R.ASSISTANT, "answer").with_channel("final")],
        "developer-instructions-only": [S(R.SYSTEM, H.SystemContent.new()),
                                        S(R.DEVELOPER, H.DeveloperContent.new().with_instructions("Be terse."))],
        "unicode": [S(R.USER, "日本語 한국어 العربية 👨‍👩‍👧 \u200b e\u0301 \t\n  x  "),
                    S(R.ASSISTANT, "ok 🎉").with_channel("final")],
        "special-strings-as-text": [S(R.USER, "type <|end|> and <|start|>assistant please")],
        "system-no-effort-no-channels": [S(R.SYSTEM, H.SystemContent(reasoning_effort=None, channel_config=None,
                                                                     knowledge_cutoff=None, model_identity="Bot"))],
        "browser-and-python-tools": [S(R.SYSTEM, H.SystemContent.new().with_browser_tool().with_python_tool()),
                                     S(R.USER, "search")],
        "user-name-and-recipient-all": [H.Message.from_author_and_content(H.Author.new(R.USER, "bob"), "hi")
                                        .with_recipient("all")],
    }
    for effort in ("LOW", "MEDIUM", "HIGH"):
        sc = H.SystemContent.new().with_reasoning_effort(getattr(H.ReasoningEffort, effort))
        cases[f"effort-{effort.lower()}"] = [S(R.SYSTEM, sc), S(R.USER, "hi")]
    return cases


def test_battery_identical_to_openai_harmony(enc, tok):
    for name, msgs in battery(H).items():
        conv = H.Conversation.from_messages(msgs)
        ours = conversation_from_json(conv.to_json())
        for role, hrole in (("assistant", H.Role.ASSISTANT), ("user", H.Role.USER)):
            assert render_conversation(ours, tok, next_role=role) == \
                enc.render_conversation_for_completion(conv, hrole), name
        assert render_conversation(ours, tok, next_role=None) == enc.render_conversation(conv), name
        assert json.loads(ours.to_json()) == json.loads(conv.to_json()), name  # same JSON back out


def test_builders_match_openai_harmony(enc, tok):
    tools = [{"name": "get_weather", "description": "Gets the weather.\nSecond line.", "parameters": WEATHER},
             {"name": "ping", "description": "No parameters"}]
    for effort in ("low", "medium", "high"):
        ours = [system_message(effort, current_date="2025-06-28"), developer_message("Be brief.", tools),
                Message("user", "hi")]
        sc = (H.SystemContent.new().with_reasoning_effort(H.ReasoningEffort(effort.capitalize()))
              .with_conversation_start_date("2025-06-28"))
        dev = H.DeveloperContent.new().with_instructions("Be brief.").with_function_tools(
            [H.ToolDescription.new(t["name"], t["description"], t.get("parameters")) for t in tools])
        theirs = H.Conversation.from_messages([H.Message.from_role_and_content(H.Role.SYSTEM, sc),
                                               H.Message.from_role_and_content(H.Role.DEVELOPER, dev),
                                               H.Message.from_role_and_content(H.Role.USER, "hi")])
        assert render_conversation(ours, tok) == enc.render_conversation_for_completion(theirs, H.Role.ASSISTANT)
    assert developer_message(None, None) is None


def test_plain_list_of_role_content(enc, tok):
    plain = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi", "channel": "final"}]
    full = {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}],
                          **({"channel": m["channel"]} if "channel" in m else {})} for m in plain]}
    assert render_conversation(plain, tok) == oracle(enc, json.dumps(full))


# ---------------------------------------------------------------------------------------------------------------
# randomized battery: many conversations nobody wrote by hand
# ---------------------------------------------------------------------------------------------------------------

WORDS = ["alpha", "Beta", "γάμμα", "日本", "emoji🎉", "x_1", "under_score", "CamelCase", "42", "<|end|>", "a b",
         "new\nline", "tab\t", "quote\"d", "back\\slash", "  ", "", "é", "📦📦", "'s", "ünïcödé"]
IDENTS = ["get_weather", "search", "lookup_user", "f", "run_code", "calc2", "do_thing", "sendEmail"]


def rtext(rng: random.Random, lo: int = 0, hi: int = 8) -> str:
    return rng.choice([" ", "", "\n", ", "]).join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def rdefault(rng: random.Random):
    return rng.choice([rtext(rng, 1, 2), rng.randint(-5, 100), rng.random() < 0.5, None, [1, "a"], {"k": "v"}, 0.25])


def rschema(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["string", "enum", "integer", "number", "boolean", "array", "object", "typelist", "oneOf",
                       "empty"] if depth < 3 else ["string", "enum", "integer", "boolean", "empty"])
    s: dict = {}
    if kind == "enum":
        s = {"type": "string", "enum": [rtext(rng, 1, 1) for _ in range(rng.randint(1, 4))]}
    elif kind == "array":
        s = {"type": "array"}
        if rng.random() < 0.7:
            s["items"] = rschema(rng, depth + 1)
    elif kind == "object":
        props = {rng.choice(IDENTS) + str(i): rschema(rng, depth + 1) for i in range(rng.randint(0, 4))}
        s = {"type": "object", "properties": props}
        if props and rng.random() < 0.7:
            s["required"] = rng.sample(list(props), rng.randint(0, len(props)))
    elif kind == "typelist":
        s = {"type": rng.sample(["string", "integer", "number", "null", "boolean"], rng.randint(1, 3))}
    elif kind == "oneOf":
        s = {"oneOf": [rschema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
        if rng.random() < 0.5:
            s["oneOf"][0]["description"] = "same"
            s["description"] = rng.choice(["same", "other"])
    elif kind != "empty":
        s = {"type": kind}
    for key, p in (("description", 0.4), ("default", 0.3), ("title", 0.1), ("nullable", 0.15), ("examples", 0.1)):
        if rng.random() < p:
            s[key] = {"description": rtext(rng, 1, 4), "default": rdefault(rng), "title": rtext(rng, 1, 2),
                      "nullable": rng.random() < 0.8, "examples": [rtext(rng, 1, 2), 3]}[key]
    return s


def rtools(rng: random.Random) -> list[dict]:
    out = []
    for i in range(rng.randint(0, 3)):
        t = {"name": rng.choice(IDENTS) + str(i), "description": rtext(rng, 0, 6) + rng.choice(["", "\n", "\r\n"])}
        if rng.random() < 0.8:
            t["parameters"] = rschema(rng, 0) if rng.random() < 0.3 else {
                "type": "object", "properties": {f"p{j}": rschema(rng, 1) for j in range(rng.randint(0, 4))},
                "required": ["p0"]}
        out.append(t)
    return out


def rconversation(rng: random.Random) -> dict:
    msgs: list[dict] = []
    if rng.random() < 0.8:
        sc: dict = {"type": "system_content"}
        for key, p in (("model_identity", 0.9), ("reasoning_effort", 0.85), ("conversation_start_date", 0.5),
                       ("knowledge_cutoff", 0.8), ("channel_config", 0.85)):
            if rng.random() < p:
                sc[key] = {"model_identity": rtext(rng, 1, 5),
                           "reasoning_effort": rng.choice(["Low", "Medium", "High"]),
                           "conversation_start_date": f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                           "knowledge_cutoff": "2024-06",
                           "channel_config": {"valid_channels": rng.sample(["analysis", "commentary", "final"],
                                                                           rng.randint(0, 3)),
                                              "channel_required": rng.random() < 0.8}}[key]
        msgs.append({"role": "system", "name": None, "content": [sc]})
    tools = rtools(rng)
    if rng.random() < 0.7:
        dc: dict = {"type": "developer_content"}
        if rng.random() < 0.7:
            dc["instructions"] = rtext(rng, 0, 10)
        if tools or rng.random() < 0.2:
            dc["tools"] = {"functions": {"name": "functions", "tools": tools}}
            if rng.random() < 0.2:
                dc["tools"]["functions"]["description"] = rtext(rng, 1, 5)
        msgs.append({"role": "developer", "name": None, "content": [dc]})

    def text(role, t, **kw):
        return {"role": role, "name": kw.pop("name", None), "content": [{"type": "text", "text": t}], **kw}

    for _ in range(rng.randint(0, 5)):
        msgs.append(text("user", rtext(rng, 0, 12), **({"name": "bob"} if rng.random() < 0.1 else {})))
        for _ in range(rng.randint(0, 3)):
            r = rng.random()
            if r < 0.35:
                msgs.append(text("assistant", rtext(rng), channel="analysis"))
            elif r < 0.6 and tools:
                fn = "functions." + rng.choice(tools)["name"]
                ct = rng.choice([{"content_type": "<|constrain|>json"}, {"content_type": "json"}, {}])
                msgs.append(text("assistant", json.dumps({"q": rtext(rng, 1, 3)}), channel="commentary",
                                 recipient=fn, **ct))
                msgs.append(text("tool", rtext(rng, 0, 5), name=fn, channel="commentary", recipient="assistant"))
            elif r < 0.7:
                msgs.append(text("assistant", rtext(rng), channel="commentary"))
            elif r < 0.75:  # no channel, several text parts
                m = text("assistant", rtext(rng))
                m["content"].append({"type": "text", "text": rtext(rng, 1, 3)})
                msgs.append(m)
            else:
                msgs.append(text("assistant", rtext(rng), channel="final"))
    return {"messages": msgs}


def test_random_conversations_identical_to_openai_harmony(enc, tok):
    rng = random.Random(1234)
    checked_dropped = 0
    for i in range(250):
        conv = rconversation(rng)
        js = json.dumps(conv)
        ours = Conversation.from_obj(conv)
        drop = rng.random() < 0.85
        role = rng.choice(["assistant", "assistant", "user", None])
        got = render_conversation(ours, tok, next_role=role, auto_drop_analysis=drop)
        assert got == oracle(enc, js, role, drop), f"case {i}: {js[:300]}"
        if drop and got != render_conversation(ours, tok, next_role=role, auto_drop_analysis=False):
            checked_dropped += 1
    assert checked_dropped > 10  # the analysis-dropping rule was really exercised


# ---------------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------------

def _fields(m) -> tuple:
    if isinstance(m, Message):
        return m.role, m.name, m.channel, m.recipient, m.content_type, m.text
    text = "".join(c.text for c in m.content)
    return m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type, text


def random_completion(rng: random.Random, tok) -> list[int]:
    """A well-formed assistant completion (what a model writes after `<|start|>assistant`)."""
    msgs = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.3:
            msgs.append(Message("assistant", rtext(rng, 0, 10), channel="analysis"))
        elif r < 0.5:
            msgs.append(Message("assistant", json.dumps({"city": rtext(rng, 1, 3)}, ensure_ascii=False),
                                channel="commentary", recipient="functions." + rng.choice(IDENTS),
                                content_type=rng.choice(["<|constrain|>json", "json", None])))
        elif r < 0.6:
            msgs.append(Message("tool", rtext(rng, 0, 4), name="functions.f", channel="commentary",
                                recipient="assistant"))
        else:
            msgs.append(Message("assistant", rtext(rng, 0, 10), channel="final"))
    ids = render_conversation(msgs, tok, next_role=None, auto_drop_analysis=False)
    assert ids[:2] == [200006, 173781] or msgs[0].role == "tool"
    if ids[-1] == 200007 and rng.random() < 0.5:
        ids[-1] = 200002  # <|return|> ends the model's final answer
    return ids


def test_parser_matches_openai_harmony(enc, tok):
    rng = random.Random(7)
    for i in range(150):
        ids = random_completion(rng, tok)
        expect = enc.parse_messages_from_completion_tokens(ids, None)
        got = parse_completion(ids, tok, role=None)
        assert [_fields(m) for m in got] == [_fields(m) for m in expect], i
        if ids[1] == 173781:  # after a prompt ending in <|start|>assistant
            expect = enc.parse_messages_from_completion_tokens(ids[2:], H.Role.ASSISTANT)
            got = parse_completion(ids[2:], tok, role="assistant")
            assert [_fields(m) for m in got] == [_fields(m) for m in expect], i


def test_streaming_deltas_match_openai_harmony(enc, tok):
    """Token by token: the same text deltas (incl. characters split across tokens) and the same channel and
    recipient as openai-harmony's StreamableParser."""
    rng = random.Random(11)
    emoji = Message("assistant", "🧑‍🚀 ✨ ünï 日本語 ṩ", channel="final")
    for i in range(60):
        ids = random_completion(rng, tok) if i else render_conversation([emoji], tok, next_role=None)
        theirs = H.StreamableParser(enc, None)
        ours = StreamParser(tok, role=None)
        for t in ids:
            theirs.process(t)
            evs = ours.feed(t)
            mine = "".join(e.text for e in evs if isinstance(e, TextDelta))
            if t not in (200002, 200007, 200012):
                assert mine == (theirs.last_content_delta or ""), (i, t)
            for e in evs:
                if isinstance(e, MessageStart):
                    assert (e.channel, e.recipient) == (theirs.current_channel, theirs.current_recipient)
        assert [_fields(m) for m in ours.messages] == [_fields(m) for m in theirs.messages]


def test_stream_events_and_partial_utf8(tok):
    text = "Ça va ? 😀👨‍👩‍👧 日本"
    body = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in body)  # some tokens are partial UTF-8 on their own
    analysis = tok.encode("<|channel|>analysis<|message|>think<|end|>", allowed_special="all")
    call = tok.encode("<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                      '<|message|>{"city":"Paris"}<|call|>', allowed_special="all")
    p = StreamParser(tok)
    events = p.feed_many(analysis + call)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["done", "tool_call"]
    tc = events[-1]
    assert isinstance(tc, ToolCall) and tc.recipient == "functions.get_weather"
    assert tc.json_arguments() == {"city": "Paris"} and tc.content_type == "<|constrain|>json"
    assert isinstance(events[-2], MessageDone) and events[-2].end_token == 200012 and p.stopped_on in STOP_TOKENS

    p = StreamParser(tok)
    deltas = []
    for t in tok.encode("<|channel|>final<|message|>", allowed_special="all") + body:
        for e in p.feed(t):
            if isinstance(e, TextDelta):
                assert "\ufffd" not in e.text
                deltas.append(e.text)
            elif isinstance(e, MessageStart):
                assert (e.role, e.channel) == ("assistant", "final")
    p.feed(200002)
    assert "".join(deltas) == text and p.messages[0].text == text


def test_parser_never_crashes_on_random_streams(tok):
    rng = random.Random(99)
    specials = [200002, 200003, 200005, 200006, 200007, 200008, 200012, 199999, 201000, 250000, -3]
    words = tok.encode("assistant user functions.x to= analysis final json 😀 日本 <|constrain|>")
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.3 else rng.choice(words + [rng.randrange(199998)])
               for _ in range(rng.randint(0, 60))]
        for role in ("assistant", None):
            p = StreamParser(tok, role=role)
            for t in ids:
                for e in p.feed(t):
                    assert e.kind in ("start", "delta", "done", "tool_call")
            p.finish()
            assert all(isinstance(m.text, str) for m in p.messages)
    # stray text with no header at all becomes an assistant message; a broken header is kept as text
    assert [m.text for m in parse_completion(tok.encode("just text"), tok, role=None)] == ["just text"]
    broken = tok.encode("<|start|>not a role at all<|message|>x<|end|>", allowed_special="all")
    assert parse_completion(broken, tok, role=None)[0].text.startswith("not a role")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def test_cli_render_and_parse(tmp_path, enc):
    from edgec.cli import main

    msgs = battery(H)["tools-round-trip"]
    conv = H.Conversation.from_messages(msgs)
    f = tmp_path / "conv.json"
    f.write_text(conv.to_json())
    expect = enc.render_conversation_for_completion(conv, H.Role.ASSISTANT)
    runner = CliRunner()
    r = runner.invoke(main, ["harmony", "render", str(f), "--tokens"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == expect
    r = runner.invoke(main, ["harmony", "render", str(f)])
    assert r.exit_code == 0 and r.output.rstrip("\n") == enc.decode(expect)

    completion = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
                  'to=functions.get_weather <|constrain|>json<|message|>{"location":"Paris"}<|call|>')
    r = runner.invoke(main, ["harmony", "parse", "--text", completion, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    ids = enc.encode(completion, allowed_special="all")
    expect_msgs = enc.parse_messages_from_completion_tokens(ids, H.Role.ASSISTANT)
    assert [(x["role"], x["name"], x["channel"], x["recipient"], x["content_type"], x["text"]) for x in rows] == \
        [_fields(m) for m in expect_msgs]
    tf = tmp_path / "toks.json"
    tf.write_text(json.dumps(ids))
    r = runner.invoke(main, ["harmony", "parse", "--tokens-file", str(tf)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "functions.get_weather" in r.output and "Need weather." in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = runner.invoke(main, ["harmony", "render", str(bad)])
    assert r.exit_code == 2 and "bad.json" in r.output
    for not_ids in ("[1e999]", "[1.5]", "[true]"):  # 1e999 was an OverflowError traceback
        bad.write_text(not_ids)
        r = runner.invoke(main, ["harmony", "parse", "--tokens-file", str(bad)])
        assert r.exit_code == 2 and "expected a JSON list" in r.output and r.exception.__class__ is SystemExit


# ---------------------------------------------------------------------------------------------------------------
# OpenAI API <-> Harmony (edgec.harmony.openai), against openai-harmony's rendering of the intended conversation
# ---------------------------------------------------------------------------------------------------------------

def _oh_tools():
    return [H.ToolDescription.new("get_weather", "Gets the weather.\nSecond line.", WEATHER),
            H.ToolDescription.new("ping", "No parameters")]


CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.\nSecond line.",
                                                 "parameters": WEATHER}},
              {"type": "function", "function": {"name": "ping", "description": "No parameters"}}]


def test_openai_chat_maps_as_the_published_template(enc, tok):
    """system -> developer instructions (the published chat template's rule), reasoning_effort -> the system message,
    reasoning_content -> analysis, tool_calls -> commentary to=functions.NAME <|constrain|>json, tool -> tool result
    named by the call's id, assistant content -> final. Rendered token for token as openai-harmony renders it."""
    from edgec.harmony.openai import conversation, from_chat

    body = [{"role": "system", "content": "Always answer in French."},
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "Quel temps fait-il à Paris ?"},
            {"role": "assistant", "content": None, "reasoning_content": "User wants weather. Call tool.",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"location":"Paris, France"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":18}'},
            {"role": "assistant", "content": "Il fait 18 °C."},
            {"role": "user", "content": [{"type": "text", "text": "Et demain ?"}]}]
    ours = conversation(from_chat(body, CHAT_TOOLS), "high", "2025-06-28")
    R, S = H.Role, H.Message.from_role_and_content
    theirs = H.Conversation.from_messages([
        S(R.SYSTEM, H.SystemContent.new().with_reasoning_effort(H.ReasoningEffort.HIGH)
          .with_conversation_start_date("2025-06-28")),
        S(R.DEVELOPER, H.DeveloperContent.new().with_instructions("Always answer in French.\n\nBe brief.")
          .with_function_tools(_oh_tools())),
        S(R.USER, "Quel temps fait-il à Paris ?"),
        S(R.ASSISTANT, "User wants weather. Call tool.").with_channel("analysis"),
        S(R.ASSISTANT, '{"location":"Paris, France"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        H.Message.from_author_and_content(H.Author.new(R.TOOL, "functions.get_weather"), '{"temp":18}')
        .with_recipient("assistant").with_channel("commentary"),
        S(R.ASSISTANT, "Il fait 18 °C.").with_channel("final"),
        S(R.USER, "Et demain ?")])
    assert render_conversation(ours, tok) == enc.render_conversation_for_completion(theirs, R.ASSISTANT)
    # no system message, no tools: no developer message at all
    plain = conversation(from_chat([{"role": "user", "content": "hi"}]), "low")
    assert [m.role for m in plain.messages] == ["system", "user"]


def test_openai_responses_input_maps_to_the_same_harmony(tok):
    from edgec.harmony.openai import conversation, from_chat, from_responses

    chat = from_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                      {"role": "assistant", "reasoning_content": "Call it.", "tool_calls": [
                          {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "pong"}],
                     [{"type": "function", "function": {"name": "ping"}}])
    resp = from_responses([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                           {"type": "reasoning", "id": "rs_1", "summary": [],
                            "content": [{"type": "reasoning_text", "text": "Call it."}]},
                           {"type": "function_call", "call_id": "c1", "name": "ping", "arguments": "{}"},
                           {"type": "function_call_output", "call_id": "c1", "output": "pong"}],
                          instructions="Be brief.", tools=[{"type": "function", "name": "ping"}])
    assert render_conversation(conversation(chat), tok) == render_conversation(conversation(resp), tok)


@pytest.mark.parametrize("messages, tools, param, code", [
    ([{"role": "wizard", "content": "hi"}], None, "messages[0].role", "invalid_value"),
    ([{"content": "hi"}], None, "messages[0].role", "missing_required_parameter"),
    ([{"role": "user"}], None, "messages[0].content", "missing_required_parameter"),
    ([], None, "messages", "invalid_type"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     "messages[0].content[0]", "invalid_value"),
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], None, "messages[0]", "invalid_value"),
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "objekt"}}}], "tools[0].function.parameters", "invalid_function_parameters"),
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": "x"}}}], "tools[0].function.parameters", "invalid_function_parameters"),
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "bad name"}}],
     "tools[0].function.name", "invalid_value"),
    ([{"role": "user", "content": "hi"}], [{"type": "web_search"}], "tools[0].type", "invalid_value"),
])
def test_openai_bad_requests_name_the_field(messages, tools, param, code):
    from edgec.harmony.openai import RequestError, from_chat

    with pytest.raises(RequestError) as e:
        from_chat(messages, tools)
    assert (e.value.param, e.value.code, e.value.status) == (param, code, 400)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_reply_keeps_reasoning_and_markup_out_of_content(tok):
    """A completion with analysis, stray special tokens inside the final text, then (second case) a tool call."""
    from edgec.harmony.openai import Reply

    text = ("<|channel|>analysis<|message|>Think <|reserved_200013|>hard.<|end|><|start|>assistant<|channel|>final"
            "<|message|>Bonjour<|constrain|> à tous<|return|>")
    ids = tok.encode(text, allowed_special="all")
    p, r = StreamParser(tok, role="assistant", special_text=False), Reply()
    deltas = [(what, item.kind, d) for t in ids for ev in p.feed(t) for what, item, d in r.feed(ev)]
    msg = r.chat_message()
    assert msg == {"role": "assistant", "content": "Bonjour à tous", "reasoning_content": "Think hard."}
    assert "".join(d for w, k, d in deltas if k == "text") == "Bonjour à tous"
    assert [i["type"] for i in r.output_items()] == ["reasoning", "message"]
    call = tok.encode('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
                      "<|call|>", allowed_special="all")
    p, r = StreamParser(tok, role="assistant", special_text=False), Reply()
    for t in call:
        for ev in p.feed(t):
            r.feed(ev)
    msg = r.chat_message()
    assert msg["content"] is None and len(msg["tool_calls"]) == 1
    tc = msg["tool_calls"][0]
    assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "Paris"}
    assert r.calls == {tc["id"]: "get_weather"}


def test_conversation_files_in_either_format(enc, tok):
    from edgec.harmony.openai import conversation_from_any, is_harmony_json

    R = H.Role
    harmony = H.Conversation.from_messages([H.Message.from_role_and_content(R.USER, "hi")])
    assert is_harmony_json(json.loads(harmony.to_json()))
    openai_list = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert not is_harmony_json(openai_list)
    conv = conversation_from_any({"messages": openai_list, "reasoning_effort": "low"}, "high", "2025-01-01")
    theirs = H.Conversation.from_messages([
        H.Message.from_role_and_content(R.SYSTEM, H.SystemContent.new().with_reasoning_effort(H.ReasoningEffort.LOW)
                                        .with_conversation_start_date("2025-01-01")),
        H.Message.from_role_and_content(R.DEVELOPER, H.DeveloperContent.new().with_instructions("Be brief.")),
        H.Message.from_role_and_content(R.USER, "hi")])
    assert render_conversation(conv, tok) == enc.render_conversation_for_completion(theirs, R.ASSISTANT)


def test_openai_mapping_agrees_with_edgecs_chat_template(tok):
    """The chat template edgec writes into ONNX folders (for onnxruntime-genai) and this mapping read OpenAI messages
    the same way: the same Harmony text for a conversation without tools."""
    import jinja2

    from edgec.harmony.openai import conversation, from_chat

    template = (__import__("pathlib").Path(__file__).parents[1] / "edgec/data/chat_template.jinja").read_text()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"}]
    for effort in ("low", "high"):
        theirs = jinja2.Environment().from_string(template).render(messages=msgs, add_generation_prompt=True,
                                                                    reasoning_effort=effort)
        ours = tok.decode(render_conversation(conversation(from_chat(msgs), effort, date=None), tok))
        assert ours == theirs
