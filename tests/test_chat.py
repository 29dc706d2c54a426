"""`edgec chat` / `edgec generate` end to end on the tiny model (source checkpoint and its MLX output), prompt reuse
across turns against a fresh prefill, the context-fill policy, tool round trips, and the KV memory plan."""

from __future__ import annotations

import datetime
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from tolerance import assert_reordered

from edgec.cli import main
from edgec.harmony.conversation import Message
from edgec.runtime.base import Backend
from edgec.runtime.generate import Generator, Sampling, common_prefix
from edgec.runtime.session import ChatSession

STATS = re.compile(r"^prefill=(\d+) reused=(\d+) decode=(\d+) tok/s=(\d+\.\d)$", re.M)


@pytest.fixture(params=["source", "mlx", "onnx-cpu"])
def model(request, tiny, tiny_mlx, tiny_onnx):
    return {"source": tiny, "mlx": tiny_mlx, "onnx-cpu": tiny_onnx}[request.param]


@pytest.fixture(params=["mlx", "onnx-cpu"])
def kv_model(request, tiny_mlx, tiny_onnx):
    """The converted outputs, whose backends keep a real KV cache."""
    return {"mlx": tiny_mlx, "onnx-cpu": tiny_onnx}[request.param]


def invoke(args, input=None, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    assert r.exit_code == code, (r.output, r.exception)
    assert "Traceback" not in r.output
    return r


def run(args, input=None):
    """stdout of a successful command (warnings and notes go to stderr)."""
    return invoke(args, input).stdout


def tokenizer():
    from edgec.harmony.tokenizer import Tokenizer

    return Tokenizer.default()


# ---- scripted chat -------------------------------------------------------------------------------------------------
def test_scripted_chat_reuses_the_first_turn(model, tmp_path):
    out = run(["chat", model, "--stats", "--max-tokens", 6, "--temperature", 0, "--max-context", 1024],
              input=f"hi\n/effort low\nhow are you?\n/save {tmp_path / 'c.json'}\n/stats\n/exit\n")
    turns = [tuple(int(x) for x in m[:3]) for m in STATS.findall(out)]
    assert len(turns) == 2, out
    (p1, r1, d1), (p2, r2, d2) = turns
    assert r1 == 0 and d1 == d2 == 6
    assert 0 < r2 < p1  # /effort low edits the system message: only the tokens before it are reused
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in saved["messages"]][:3] == ["system", "user", "assistant"]
    assert saved["messages"][0]["content"][0]["reasoning_effort"] == "Low"


def test_eof_ends_cleanly_and_without_effort_change_reuse_covers_the_whole_first_prompt(tiny):
    out = run(["chat", tiny, "--stats", "--max-tokens", 3, "--temperature", 0, "--max-context", 1024],
              input="hi\nagain\n")
    (p1, r1, _), (_, r2, _) = [tuple(int(x) for x in m[:3]) for m in STATS.findall(out)]
    assert r2 >= p1  # the whole first prompt (and `<|start|>assistant`) comes from the cache


# ---- prompt reuse equals a fresh prefill ---------------------------------------------------------------------------
@pytest.mark.float_sensitive
def test_reuse_after_dropped_analysis_equals_fresh_prefill(kv_model):
    """Harmony drops the earlier analysis once a final answer exists: the new prompt is not an extension of the
    cached tokens. The session must roll back to the common prefix and give the logits of a fresh prefill."""
    from edgec.runtime.base import load_backend

    tok = tokenizer()
    s = ChatSession(load_backend(kv_model, max_context=2048), tok, date="2025-01-01",
                    sampling=Sampling(temperature=0, max_tokens=4))
    s.history = [Message("user", "What is 2+2? " * 40),
                 Message("assistant", "The user asks a sum. " * 20, channel="analysis")]
    s.respond()
    cached = list(s.gen.tokens)
    s.history[2:] = [Message("assistant", "4", channel="final"), Message("user", "And 3+3?")]
    prompt, _ = s.fit_prompt()
    analysis_at = common_prefix(s.render(s.history[:1] and s.header() + s.history[:1]), cached)
    assert cached[:len(prompt)] != prompt  # not an extension
    logits = s.gen.prefill(prompt)
    assert s.gen.stats.reused == common_prefix(cached, prompt) >= analysis_at > 0
    assert s.gen.stats.prefill == len(prompt) - s.gen.stats.reused
    fresh = (be := load_backend(kv_model, max_context=2048)).forward(prompt)[0]
    assert_reordered(logits, fresh, be.config, len(prompt))  # cached vs fresh: the reorder bound, tests/tolerance.py
    assert int(np.argmax(logits)) == int(np.argmax(fresh))


@pytest.mark.float_sensitive
def test_rollback_past_the_sliding_history_equals_fresh_prefill(kv_model, ids_long):
    """A rollback far behind the sliding layers' kept positions: they must be rebuilt, exactly."""
    from edgec.runtime.base import load_backend

    g = Generator(load_backend(kv_model, max_context=4096))
    g.prefill(ids_long[:1800])
    assert g.backend.sw_start > 300 - 128  # the sliding buffers no longer hold the window before position 300
    second = ids_long[:300] + ids_long[3000:3100]
    logits = g.prefill(second)
    assert (g.stats.reused, g.stats.prefill) == (300, 100)
    fresh = (be := load_backend(kv_model, max_context=4096)).forward(second)[0]
    assert_reordered(logits, fresh, be.config, len(second))  # the reorder bound, tests/tolerance.py


# ---- context policy ------------------------------------------------------------------------------------------------
def test_context_fill_drops_the_oldest_turns_and_keeps_system_and_developer(tiny):
    from edgec.runtime.reference_backend import ReferenceBackend

    s = ChatSession(ReferenceBackend(tiny), tokenizer(), developer="Answer in French.", max_context=300,
                    sampling=Sampling(max_tokens=20), date="2025-01-01")
    for i in range(12):
        s.history += [Message("user", f"question number {i} about the weather in town {i}"),
                      Message("assistant", f"answer number {i}: it is sunny in town {i}", channel="final")]
    s.history.append(Message("user", "last question"))
    full = list(s.history)
    prompt, dropped = s.fit_prompt()
    assert dropped > 0 and len(prompt) + 20 <= 300
    assert s.history == full[2 * dropped:] and s.history[0].role == "user"
    head = s.render(s.header())[:-2]  # system + developer messages, without `<|start|>assistant`
    assert prompt[:len(head)] == head
    assert len(s.render(s.header() + full[2 * (dropped - 1):])) + 20 > 300  # one turn fewer would not fit


def test_a_single_turn_too_long_for_the_context_is_refused(tiny):
    from edgec.errors import EdgecError
    from edgec.runtime.reference_backend import ReferenceBackend

    s = ChatSession(ReferenceBackend(tiny), tokenizer(), max_context=120, sampling=Sampling(max_tokens=8))
    s.history = [Message("user", "word " * 200)]
    with pytest.raises(EdgecError, match="context holds 120"):
        s.fit_prompt()


# ---- generate --------------------------------------------------------------------------------------------------------
def test_generate_json_matches_openai_harmony_prompt_and_reference_greedy(tiny, tmp_path):
    """The prompt is openai-harmony's rendering of the conversation; the tokens are the numpy reference's greedy."""
    import openai_harmony as oh

    from edgec.runtime.reference import Reference

    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    tools = [oh.ToolDescription.new("get_weather", "Weather now", parameters={
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]})]
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(
            oh.ReasoningEffort.HIGH).with_conversation_start_date("2025-06-01")),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
            "Be brief.").with_function_tools(tools)),
        oh.Message.from_role_and_content(oh.Role.USER, "Weather in Paris?")])
    path = tmp_path / "conv.json"
    path.write_text(conv.to_json())
    out = json.loads(run(["generate", tiny, "--conversation", path, "--json", "--max-tokens", 4, "--temperature", 0,
                          "--max-context", 1024]))
    prompt = enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT)
    st = out["stats"]
    assert (st["prompt"], st["decode"], st["stop"]) == (len(prompt), 4, "max_tokens")
    ids, ref = list(prompt), Reference(__import__("edgec.checkpoint").checkpoint.Checkpoint.open(tiny))
    for _ in range(4):
        ids.append(int(np.argmax(ref.logits(ids, last=1)[0])))
    assert out["tokens"] == ids[len(prompt):]
    assert out["messages"] and set(out["messages"][0]) == {"role", "channel", "recipient", "content_type", "text"}
    assert {"tok_s", "ttft_s", "prefill", "reused"} <= set(st)


def test_generate_prompt_uses_todays_date_and_reasoning(tiny):
    import openai_harmony as oh

    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    out = json.loads(run(["generate", tiny, "--prompt", "hello", "--reasoning", "low", "--json", "--max-tokens", 1,
                          "--max-context", 512]))
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(
            oh.ReasoningEffort.LOW).with_conversation_start_date(datetime.date.today().isoformat())),
        oh.Message.from_role_and_content(oh.Role.USER, "hello")])
    assert out["stats"]["prompt"] == len(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))


# ---- tool round trip through the CLI, answered by a mock -------------------------------------------------------------
class Replay(Backend):
    """Emits a fixed token script, one token per forward (a stand-in model that speaks Harmony)."""

    name = "replay"

    def __init__(self, script: list[int]):
        from edgec.spec import preset

        self.config, self.script, self.n, self.prompts = preset("tiny"), list(script), 0, []

    @property
    def length(self) -> int:
        return self.n

    def forward(self, ids, all_logits=False):
        ids = list(ids)
        if len(ids) > 1 or self.n == 0:
            self.prompts.append((self.n, ids))
        self.n += len(ids)
        out = np.zeros((1, 201088), np.float32)
        out[0, self.script.pop(0) if self.script else 200002] = 100.0  # certain even at temperature 1
        return out

    def truncate(self, n):
        self.n = n


@pytest.mark.parametrize("show_analysis", [False, True])
def test_tool_call_answered_from_the_mock(tiny, tmp_path, monkeypatch, show_analysis):
    import openai_harmony as oh

    import edgec.runtime.base as base

    tok = tokenizer()
    call = tok.encode("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary"
                      ' to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
                      allowed_special="all")
    final = tok.encode("<|channel|>final<|message|>Sunny, 21 C.<|return|>", allowed_special="all")
    backend = Replay(call + final)
    monkeypatch.setattr(base, "load_backend", lambda *a, **k: backend)
    tools = tmp_path / "tools.json"
    fn = {"name": "get_weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    # edgec's form, or OpenAI's form of a tool (plus edgec's mock)
    tool = {"type": "function", "function": fn} if show_analysis else dict(fn)
    tools.write_text(json.dumps([{**tool, "mock": {"temp_c": 21}}]))
    out = run(["chat", tiny, "--tools", tools, "--stats", "--max-context", 4096]
              + (["--show-analysis"] if show_analysis else []), input=f"weather?\n/save {tmp_path / 'c.json'}\n")
    assert "→ functions.get_weather" in out and "Sunny, 21 C." in out
    assert ("Need the weather." in out) == show_analysis
    assert len(STATS.findall(out)) == 2  # one line per generation: the call, then the answer
    conv = oh.Conversation.from_json((tmp_path / "c.json").read_text())
    roles = [(m.author.role.value, m.author.name, m.channel, m.recipient) for m in conv.messages]
    assert roles[2:] == [("user", None, None, None), ("assistant", None, "analysis", None),
                         ("assistant", None, "commentary", "functions.get_weather"),
                         ("tool", "functions.get_weather", "commentary", "assistant"),
                         ("assistant", None, "final", None)]
    assert conv.messages[5].content[0].text == '{"temp_c": 21}'
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    prompt2 = enc.render_conversation_for_completion(oh.Conversation.from_messages(conv.messages[:6]),
                                                     oh.Role.ASSISTANT)
    start, ids = backend.prompts[-1]
    assert list(prompt2[start:]) == ids and start > 0  # the second call prefilled only the tool result


# ---- KV memory: what inspect reports is what the runtime allocates --------------------------------------------------
def test_inspect_kv_bytes_equal_the_mlx_allocation_at_131072(tiny_mlx):
    import mlx.core as mx

    from edgec.runtime.base import load_backend

    report = json.loads(run(["inspect", tiny_mlx, "--context", 131072, "--json"]))
    planned = report["memory_plan"]["targets"][0]["kv_bytes"]
    b = load_backend(tiny_mlx, max_context=131072)
    c = b.config
    for i in range(c.num_hidden_layers):  # one token at the last position makes each layer allocate its full plan
        z = mx.zeros((c.num_key_value_heads, 1, c.head_dim))
        b._store(i, z, z, 0 if c.is_sliding(i) else 131071)
    assert b.kv_bytes() == planned


def test_inspect_kv_bytes_equal_the_onnx_allocation_at_131072(tiny_onnx):
    from edgec.runtime.base import load_backend

    report = json.loads(run(["inspect", tiny_onnx, "--context", 131072, "--json"]))
    planned = report["memory_plan"]["targets"][0]["kv_bytes"]
    b = load_backend(tiny_onnx, max_context=131072)
    b._grow_full(131072)  # what a full context makes the full layers allocate
    assert b.kv_bytes() == planned == (1 * 131072 + 2 * 1408) * 2 * 2 * 16 * 4  # fp32; sliding layers stay at 1408


def test_load_and_reset_slash_commands(tiny, tmp_path, monkeypatch):
    """/load takes openai-harmony's to_json form verbatim (its system message included); /reset empties the cache."""
    import openai_harmony as oh

    import edgec.runtime.base as base

    backend = Replay([])
    monkeypatch.setattr(base, "load_backend", lambda *a, **k: backend)
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(
            oh.ReasoningEffort.HIGH).with_conversation_start_date("2024-12-24")),
        oh.Message.from_role_and_content(oh.Role.USER, "Earlier question"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Earlier answer").with_channel("final")])
    (tmp_path / "c.json").write_text(conv.to_json())
    out = run(["chat", tiny, "--stats", "--max-context", 4096],
              input=f"/load {tmp_path / 'c.json'}\nNew question\n/reset\nNew question\n")
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    want = enc.render_conversation_for_completion(oh.Conversation.from_messages(
        [*conv.messages, oh.Message.from_role_and_content(oh.Role.USER, "New question")]), oh.Role.ASSISTANT)
    assert backend.prompts[0] == (0, list(want))
    (_, r1, _), (_, r2, _) = [tuple(int(x) for x in m[:3]) for m in STATS.findall(out)]
    assert r1 == r2 == 0 and backend.prompts[-1][0] == 0
    assert len(backend.prompts[-1][1]) < len(want)  # after /reset the loaded history is gone, the system stays


@pytest.mark.parametrize("explicit", [False, True])
def test_generate_reads_an_openai_conversation_with_the_reasoning_flag(tiny, tmp_path, monkeypatch, explicit):
    """An OpenAI chat list: its system message becomes developer instructions (not raw system text), its tools the
    functions namespace, and --reasoning sets the effort; openai-harmony renders the same prompt."""
    import openai_harmony as oh

    import edgec.runtime.base as base

    backend = Replay(tokenizer().encode("<|channel|>final<|message|>Hi!<|return|>", allowed_special="all"))
    monkeypatch.setattr(base, "load_backend", lambda *a, **k: backend)
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
            "tools": [{"type": "function", "function": {"name": "ping", "description": "Ping",
                                                        "parameters": {"type": "object", "properties": {}}}}],
            "reasoning_effort": "high"}  # an explicit --reasoning wins over the file's
    path = tmp_path / "openai.json"
    path.write_text(json.dumps(body))
    out = json.loads(run(["generate", tiny, "--conversation", path, "--json", "--max-context", 4096]
                         + (["--reasoning", "low"] if explicit else [])))
    effort = oh.ReasoningEffort.LOW if explicit else oh.ReasoningEffort.HIGH
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(effort)
                                         .with_conversation_start_date(datetime.date.today().isoformat())),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Be brief.")
                                         .with_function_tools([oh.ToolDescription.new(
                                             "ping", "Ping", parameters={"type": "object", "properties": {}})])),
        oh.Message.from_role_and_content(oh.Role.USER, "hello")])
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    assert backend.prompts[0] == (0, list(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT)))
    assert [(m["channel"], m["text"]) for m in out["messages"]] == [("final", "Hi!")]


def test_generate_says_when_the_conversation_file_replaces_the_command_lines_instructions(tiny, tmp_path,
                                                                                            monkeypatch):
    import edgec.runtime.base as base

    backend = Replay(tokenizer().encode("<|channel|>final<|message|>Hi!<|return|>", allowed_special="all"))
    monkeypatch.setattr(base, "load_backend", lambda *a, **k: backend)
    path = tmp_path / "openai.json"
    path.write_text(json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]))
    r = invoke(["generate", tiny, "--conversation", path, "--system", "Be long.", "--max-context", 4096])
    assert "replaced the developer message" in r.stderr and r.stdout.strip() == "Hi!"
    monkeypatch.setattr(base, "load_backend", lambda *a, **k: pytest.fail("loaded a model for a missing file"))
    r = invoke(["generate", tiny, "--conversation", tmp_path / "missing.json"], code=2)
    assert "missing.json: file not found" in r.output


# ---- issue 14: a chat that tells the truth ---------------------------------------------------------------------------
def _replay(monkeypatch, text: str = "", times: int = 1) -> Replay:
    """Make every command run on a Replay backend speaking `text` (Harmony, after `<|start|>assistant`) `times`
    times in a row (one reply each)."""
    import edgec.runtime.base as base

    backend = Replay(tokenizer().encode(text, allowed_special="all") * times if text else [])
    monkeypatch.setattr(base, "load_backend", lambda *a, **k: backend)
    return backend


THINK_THEN_ANSWER = "<|channel|>analysis<|message|>Let me think about it.<|end|><|start|>assistant<|channel|>final" \
                    "<|message|>Hello there.<|return|>"


def test_hidden_reasoning_shows_a_live_token_count_on_the_terminal_only():
    """The indicator is drawn on stderr when it is a terminal, erased when the answer starts, and never written to
    stdout; with stderr not a terminal nothing at all is written for the hidden analysis."""
    import io

    from rich.console import Console

    from edgec.harmony.parser import StreamParser
    from edgec.runtime.cli import Printer

    ids = tokenizer().encode(THINK_THEN_ANSWER, allowed_special="all")
    for terminal in (True, False):
        out, err = io.StringIO(), io.StringIO()
        fed = []
        p = Printer(False, tokens=fed.__len__, out=Console(file=out, force_terminal=False),
                    err=Console(file=err, force_terminal=terminal, width=80))
        parser = StreamParser(tokenizer(), role="assistant")
        for t in ids:
            fed.append(t)
            for e in parser.feed(t):
                p(e)
                if e.kind == "start" and e.channel == "final":
                    assert p.live is None  # erased before the answer is printed
        p.end()
        assert out.getvalue() == "Hello there.\n"
        counts = [int(n) for n in re.findall(r"thinking… (\d+) tokens", err.getvalue())]
        if terminal:
            assert counts and counts == sorted(counts) and counts[-1] > counts[0] == 3  # from the header on
            assert counts[-1] < ids.index(200006)  # the count moves while the analysis streams
        else:
            assert err.getvalue() == ""


def test_chat_stdout_carries_the_answer_only(tiny, monkeypatch):
    _replay(monkeypatch, THINK_THEN_ANSWER)
    r = invoke(["chat", tiny, "--max-context", 4096], input="hi\n")
    assert r.stdout == "Hello there.\n"
    assert "thinking" not in r.output and "Let me think" not in r.output


def test_a_reply_cut_off_inside_the_analysis_says_so_and_names_the_option(tiny, monkeypatch):
    _replay(monkeypatch, "<|channel|>analysis<|message|>" + "step by step " * 40)
    r = invoke(["chat", tiny, "--max-tokens", 12, "--max-context", 4096, "--reasoning", "high"], input="hi\n")
    assert r.stdout == ""
    line = next(x for x in r.stderr.splitlines() if "thinking" in x)
    assert "before any answer (12 tokens)" in line and "raise --max-tokens (now 12)" in line
    assert "/effort low" in line
    _replay(monkeypatch, "<|channel|>analysis<|message|>" + "step by step " * 40)
    r = invoke(["generate", tiny, "--prompt", "hi", "--max-tokens", 12, "--max-context", 4096])
    assert "raise --max-tokens (now 12) or lower the effort (--reasoning low)" in r.stderr
    _replay(monkeypatch, "<|channel|>analysis<|message|>" + "step by step " * 40)
    r = invoke(["generate", tiny, "--prompt", "hi", "--max-tokens", 12, "--max-context", 4096, "--json"])
    out = json.loads(r.stdout)  # with --json the statistics say it, and stderr has no note
    assert out["stats"]["stop"] == "max_tokens" and [m["channel"] for m in out["messages"]] == ["analysis"]
    assert "raise" not in r.stderr
    # an answer cut off is named as such; a complete one draws no note
    _replay(monkeypatch, "<|channel|>final<|message|>" + "word " * 40)
    r = invoke(["generate", tiny, "--prompt", "hi", "--max-tokens", 8, "--max-context", 4096])
    assert "the answer was cut off after 8 tokens: raise --max-tokens (now 8)" in r.stderr
    _replay(monkeypatch, THINK_THEN_ANSWER)
    assert "raise" not in invoke(["generate", tiny, "--prompt", "hi", "--max-context", 4096]).stderr


def test_default_max_tokens_follows_the_effort_within_half_the_context(tiny, monkeypatch):
    from edgec.runtime.session import DEFAULT_MAX_TOKENS

    _replay(monkeypatch)
    script = "/effort\n/effort high\n/effort low\n"
    r = invoke(["chat", tiny, "--max-context", 131072], input=script)
    shown = [int(n) for n in re.findall(r"reasoning effort \w+ \(max tokens (\d+)\)", r.stderr)]
    assert shown == [DEFAULT_MAX_TOKENS["medium"], DEFAULT_MAX_TOKENS["high"], DEFAULT_MAX_TOKENS["low"]]
    assert DEFAULT_MAX_TOKENS["low"] < DEFAULT_MAX_TOKENS["medium"] < DEFAULT_MAX_TOKENS["high"]
    assert re.findall(r"reasoning effort (\w+)", r.stderr) == ["medium", "high", "low"]
    r = invoke(["chat", tiny, "--max-context", 1000], input=script)
    assert re.findall(r"max tokens (\d+)", r.stderr) == ["500"] * 3  # at most half the context
    r = invoke(["chat", tiny, "--max-context", 131072, "--max-tokens", 100], input=script)
    assert re.findall(r"max tokens (\d+)", r.stderr) == ["100"] * 3  # an explicit --max-tokens stays


def test_an_error_in_any_slash_command_is_one_line_and_the_session_goes_on(tiny, tmp_path, monkeypatch):
    import edgec.runtime.session as session

    _replay(monkeypatch, "<|channel|>final<|message|>Sure.<|return|>", times=2)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "keep.json").write_text("precious")
    monkeypatch.setattr(session.ChatSession, "stats_text", lambda self: 1 / 0)
    bad = ["/save /nonexistdir/x.json", f"/save {tmp_path}", f"/load {tmp_path / 'nope.json'}",
           f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path}", "/effort extreme", "/save", "/stats"]
    r = invoke(["chat", tiny, "--max-context", 4096],
               input="\n".join(["first question", *bad, "second question", f"/save {tmp_path / 'keep.json'}"]) + "\n")
    errors = r.stderr.splitlines()
    for cmd, want in zip(bad, ["/nonexistdir/x.json: cannot write (No such file or directory)",
                               f"{tmp_path}: is a folder; give a file name", "nope.json: file not found", "bad.json",
                               f"{tmp_path}: is a folder, not a regular file", "/effort takes low, medium or high",
                               "/save needs a file name", "/stats failed: ZeroDivisionError"], strict=True):
        assert sum(want in e for e in errors) == 1, (cmd, want, errors)
    assert r.stdout == "Sure.\nSure.\n"  # both questions answered
    saved = json.loads((tmp_path / "keep.json").read_text())  # replaced whole, through a temporary file
    assert [m["content"][0].get("text") for m in saved["messages"][1:]] == ["first question", "Sure.",
                                                                            "second question", "Sure."]
    assert not list(tmp_path.glob(".*edgec-tmp*"))


def test_load_counts_what_the_file_holds_and_says_what_it_replaced(tiny, tmp_path, monkeypatch):
    import openai_harmony as oh

    backend = _replay(monkeypatch)
    conv = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(
            oh.ReasoningEffort.HIGH).with_conversation_start_date("2024-12-24")),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Be terse.")),
        oh.Message.from_role_and_content(oh.Role.USER, "Q1"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "A1").with_channel("final"),
        oh.Message.from_role_and_content(oh.Role.USER, "Q2"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "A2").with_channel("final")])
    (tmp_path / "six.json").write_text(conv.to_json())
    openai_chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q1"},
                   {"role": "assistant", "content": "A1", "reasoning_content": "think"},
                   {"role": "user", "content": "Q2"}]
    (tmp_path / "openai.json").write_text(json.dumps(openai_chat))
    r = invoke(["chat", tiny, "--max-context", 4096, "--developer", "Answer in French.", "--identity", "You are Bob."],
               input=f"/load {tmp_path / 'six.json'}\nQ3\n/load {tmp_path / 'openai.json'}\n")
    first, second = [x for x in r.stderr.splitlines() if x.startswith("loaded")]
    assert "6 messages (system, developer, 4 in the conversation)" in first
    assert "replaced the system message's identity (--identity), reasoning effort high (was medium), date" in first
    assert "replaced the developer message" in first
    # 4 OpenAI messages: a developer message from the system one, the reasoning as an analysis message, and a
    # system message made from the command line's identity and today's date (which six.json's had replaced)
    assert "4 messages in the file as 6 messages (system, developer, 4 in the conversation) in Harmony" in second
    assert second.endswith("; replaced the system message's identity (--identity), date; replaced the developer "
                           "message (--developer/--system, --tools)")
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    want = enc.render_conversation_for_completion(oh.Conversation.from_messages(
        [*conv.messages, oh.Message.from_role_and_content(oh.Role.USER, "Q3")]), oh.Role.ASSISTANT)
    assert backend.prompts[0] == (0, list(want))  # the file's system and developer messages, verbatim


def test_stats_is_for_people_and_reset_clears_it(kv_model):
    out = run(["chat", kv_model, "--max-tokens", 4, "--temperature", 0, "--max-context", 1024],
              input="hi\n/stats\n/reset\n/stats\n")
    assert "{" not in out
    first, after = out.split("cache ")[1:]
    m = re.match(r"(\d+) of 1024 tokens, KV ([\d.]+ [KMG]iB) · reasoning medium · max tokens 4\n"
                 r"last turn: prompt (\d+) tokens \(0 reused, (\d+) prefilled in [\d.]+ s\), 4 generated at "
                 r"[\d.]+ tok/s, first token after [\d.]+ s, stopped by --max-tokens\n", first)
    assert m and int(m[1]) == int(m[3]) + 3 and m[3] == m[4], first  # prompt + 3 fed tokens (the 4th is not)
    assert after.startswith("0 of 1024 tokens") and "last turn: none yet" in after


def test_eof_ends_the_last_line_of_a_piped_chat(tiny, monkeypatch):
    _replay(monkeypatch, "<|channel|>final<|message|>no newline at the end<|return|>")
    r = invoke(["chat", tiny, "--max-context", 4096], input="hi")  # no newline before EOF either
    assert r.stdout == "no newline at the end\n"


def test_source_checkpoint_warns_and_names_the_convert_command(tiny, tiny_mlx, monkeypatch):
    r = invoke(["generate", tiny, "--prompt", "hi", "--max-tokens", 1, "--max-context", 256])
    [line] = [x for x in r.stderr.splitlines() if "numpy reference" in x]
    assert f"edgec convert {tiny} --target mlx -o {tiny.name}-mlx" in line
    r = invoke(["generate", tiny_mlx, "--prompt", "hi", "--max-tokens", 1, "--max-context", 256])
    assert "numpy reference" not in r.stderr


def test_system_is_the_developer_instructions_and_identity_the_identity_line(tiny, monkeypatch):
    """--system means what a system prompt means in gpt-oss's chat template (developer instructions); --identity
    sets the system message's identity line. openai-harmony renders the same prompt."""
    import openai_harmony as oh

    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    backend = _replay(monkeypatch)
    run(["generate", tiny, "--prompt", "hi", "--max-context", 4096, "--system", "Be brief.", "--identity", "I am X."])
    run(["generate", tiny, "--prompt", "hi", "--max-context", 4096, "--developer", "Be brief."])
    for (_, got), identity in zip(backend.prompts, ["I am X.", None], strict=True):
        sc = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM).with_conversation_start_date(
            datetime.date.today().isoformat())
        conv = oh.Conversation.from_messages([
            oh.Message.from_role_and_content(oh.Role.SYSTEM, sc.with_model_identity(identity) if identity else sc),
            oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
                "Be brief.")),
            oh.Message.from_role_and_content(oh.Role.USER, "hi")])
        assert got == list(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))


def test_temp_and_max_kv_size_are_aliases(tiny):
    def tokens(*flags):
        return json.loads(run(["generate", tiny, "--prompt", "hi", "--json", "--max-tokens", 3, "--seed", 5,
                               *flags]))["tokens"]

    assert tokens("--temp", 0.7, "--max-kv-size", 256) == tokens("--temperature", 0.7, "--max-context", 256)
    assert tokens("--temp", 0, "--max-kv-size", 256) != tokens("--temp", 5, "--max-kv-size", 256)
    r = invoke(["generate", tiny, "--prompt", "word " * 300, "--max-kv-size", 256], code=2)
    assert "the context holds 256" in r.stderr
