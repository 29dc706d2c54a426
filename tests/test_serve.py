"""`edgec serve` through the official `openai` client: a live server process on the converted tiny models (mlx and
onnx-cpu), and an in-process server (real uvicorn, real HTTP) over a scripted backend that speaks Harmony, for what
random weights never produce (reasoning, tool calls) and for a queue that must fill up. Prompts are checked token
for token against openai-harmony's rendering of the conversation the request means."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import openai_harmony as oh
import pytest
from serving import (
    CALL,
    ENC,
    FINAL,
    KEY,
    WEATHER_TOOL,
    client,
    free_port,
    harmony_prompt,
    live_server,
    scripted_servers,
    user,
    wait_ready,
)


@pytest.fixture
def scripted():
    yield from scripted_servers()


# ---- a live `edgec serve` on the converted tiny models --------------------------------------------------------------
@pytest.fixture(scope="module", params=["mlx", "onnx-cpu"])
def live(request, tiny_mlx, tiny_onnx):
    yield from live_server({"mlx": tiny_mlx, "onnx-cpu": tiny_onnx}[request.param], "--max-tokens", "16")


def test_models(live, tiny):
    """The id is the source checkpoint's name (the manifest's), the output folder's name an alias; any other name is
    a 404 that lists the served ones."""
    url, name = live
    models = client(url).models.list()
    folder = {"tiny-mlx", "tiny-onnx"}
    assert name == tiny.name and [m.id for m in models.data][0] == name and folder & {m.id for m in models.data}
    for alias in [m.id for m in models.data]:
        assert client(url).models.retrieve(alias).id == alias
        r = client(url).chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1)
        assert r.model == name
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and repr(name) in e.value.message, e.value.message


def test_a_20b_shaped_output_answers_to_gpt_oss_20b_and_the_given_names(tmp_path):
    """A 2-layer slice of the 20b shape (reduced vocabulary is not 20b's shape, so the slice keeps 201,088 rows) is
    served as gpt-oss-20b, Ollama's gpt-oss:20b and --served-model-name's names (the first is the id replies carry)."""
    from conftest import make_ckpt

    from edgec.convert import run_convert

    src = make_ckpt(tmp_path / "src", "20b", layout="hf", num_hidden_layers=1, scale_spread=0)
    out = Path(run_convert(src, "mlx", tmp_path / "out", progress=False)["out"])
    assert json.loads((out / "edgec.json").read_text())["source"]["name"] == "src"
    gen = live_server(out, "--served-model-name", "my-ft", "--served-model-name", "team/ft", "--max-context", "128")
    url, name = next(gen)
    try:
        ids = [m.id for m in client(url).models.list().data]
        assert name == "my-ft" and ids == ["my-ft", "team/ft", "gpt-oss-20b", "gpt-oss:20b", "src", "out"], ids
        r = client(url).chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1)
        assert r.model == "my-ft" and r.choices[0].finish_reason == "length"
    finally:
        gen.close()


def test_chat_plain_and_streamed_agree_and_prompt_is_harmony(live):
    url, name = live
    c = client(url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, reasoning_effort="low")
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 8
    dev = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Be brief."))
    assert r.usage.prompt_tokens == len(harmony_prompt([dev, user("Hello there")], oh.ReasoningEffort.LOW))
    assert isinstance(ch.message.content, str) and "<|" not in ch.message.content
    chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=8, reasoning_effort="low",
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(k.choices[0].delta.content or "" for k in chunks if k.choices)
    assert text == ch.message.content  # greedy: the same tokens, the second time from the cache
    assert [k.choices[0].finish_reason for k in chunks if k.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == r.usage.prompt_tokens
    assert last.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1  # all but the last token


def test_second_turn_prefills_only_the_new_tokens(live):
    url, name = live
    c = client(url)
    first = [{"role": "user", "content": "Tell me about the sea, in a few words."}]
    r1 = c.chat.completions.create(model=name, messages=first, max_tokens=6)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content or "ok"},
                      {"role": "user", "content": "And the mountains?"}]
    r2 = c.chat.completions.create(model=name, messages=second, max_tokens=4)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens  # the whole first prompt came from the cache
    assert r2.model_extra["timings"]["prefill"] == r2.usage.prompt_tokens - cached


def test_responses_plain_streamed_and_previous_response_id(live):
    url, name = live
    c = client(url)
    r = c.responses.create(model=name, input="Hi!", instructions="Answer briefly.", max_output_tokens=6,
                           reasoning={"effort": "high"})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6 and r.output and all(i.type in ("message", "reasoning") for i in r.output)
    dev = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
        "Answer briefly."))
    assert r.usage.input_tokens == len(harmony_prompt([dev, user("Hi!")], oh.ReasoningEffort.HIGH))
    events = list(c.responses.create(model=name, input="Hi!", max_output_tokens=4, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "".join(p.text for i in final.output if i.type == "message" for p in i.content)
    r2 = c.responses.create(model=name, previous_response_id=r.id, input="More?", max_output_tokens=3,
                            reasoning={"effort": "high"})
    assert r2.previous_response_id == r.id and r2.usage.input_tokens > r.usage.input_tokens
    assert r2.usage.input_tokens_details.cached_tokens > 0
    assert c.responses.retrieve(r2.id).id == r2.id
    c.responses.delete(r2.id)  # the client's own call (it returns nothing)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r2.id)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model=name, previous_response_id=r2.id, input="Again?", max_output_tokens=2)


def test_bad_input_gets_openai_errors_and_the_server_goes_on(live):
    url, name = live
    c = client(url)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    ok = [{"role": "user", "content": "hi"}]

    def status(exc_type, **kw) -> openai.APIStatusError:
        with pytest.raises(exc_type) as e:
            c.chat.completions.create(**{"model": name, "messages": ok, "max_tokens": 2, **kw})
        return e.value

    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=h)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == "invalid_json"
    e = status(openai.BadRequestError, messages=[{"role": "wizard", "content": "hi"}])
    assert (e.code, e.param) == ("invalid_value", "messages[0].role")
    e = status(openai.BadRequestError, messages=[{"role": "user"}])
    assert (e.code, e.param) == ("missing_required_parameter", "messages[0].content")
    r = httpx.post(url + "/v1/chat/completions", json={"model": name}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    e = status(openai.BadRequestError, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}])
    assert e.code == "invalid_function_parameters"
    e = status(openai.BadRequestError, messages=[{"role": "user", "content": "word " * 1200}])
    assert e.code == "context_length_exceeded" and "1024" in e.message
    e = status(openai.NotFoundError, model="gpt-4o")
    assert e.code == "model_not_found"
    # an unsupported value is named, not echoed (a long object used to be cut off mid-JSON)
    e = status(openai.BadRequestError, logit_bias={str(i): 1 for i in range(100)})
    assert (e.code, e.param) == ("unsupported_value", "logit_bias"), e
    assert e.body["message"] == "logit_bias: an object is not supported by this server", e.body
    e = status(openai.BadRequestError, n=3)
    assert e.body["message"] == "n: 3 is not supported by this server", e.body
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").chat.completions.create(model=name, messages=ok)
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.post(url + "/v1/chat/completions", content=b" " * (5 << 20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for bad, param in (('"temperature": NaN', "temperature"), ('"top_p": Infinity', "top_p"),
                       ('"frequency_penalty": 1.5', "frequency_penalty"),
                       ('"presence_penalty": -1', "presence_penalty"),
                       ('"logit_bias": {"50256": -100}', "logit_bias"), ('"stream": "false"', "stream"),
                       ('"stream_options": {"include_usage": true}', "stream_options")):
        raw = f'{{"model": "{name}", "messages": [{{"role": "user", "content": "hi"}}], {bad}}}'.encode()
        r = httpx.post(url + "/v1/chat/completions", content=raw, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    assert c.chat.completions.create(model=name, messages=ok, max_tokens=2, frequency_penalty=0).choices
    assert c.chat.completions.create(model=name, messages=ok, max_tokens=2).choices[0].finish_reason == "length"


def test_dropped_stream_leaves_the_cache_consistent(live):
    """Greedy: the same request before and after a stream its client dropped gives the same tokens."""
    url, name = live
    c = client(url)
    ask = [{"role": "user", "content": "Count from one to ten."}]
    before = c.chat.completions.create(model=name, messages=ask, max_tokens=10).choices[0].message.content
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": name, "messages": ask + [{"role": "assistant", "content": "one two"},
                                                              {"role": "user", "content": "go on for long"}],
                            "max_tokens": 400, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(x.startswith("data: ") for x in got)
    t = time.time()
    while httpx.get(url + "/health").json()["busy"] and time.time() - t < 10:
        time.sleep(0.1)
    health = httpx.get(url + "/health").json()
    assert not health["busy"] and health["cached_tokens"] < 250  # stopped early: prompt ~100 + a few of the 400
    after = c.chat.completions.create(model=name, messages=ask, max_tokens=10)
    assert after.choices[0].message.content == before
    assert after.usage.prompt_tokens_details.cached_tokens > 0


def test_four_concurrent_clients(live):
    url, name = live

    def one(i: int) -> list:
        c = client(url)
        out = []
        for j in range(2):
            text = f"Client {i} asks question {j}."
            r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": text}], max_tokens=5)
            out.append((r.usage.prompt_tokens, len(harmony_prompt([user(text)])), r.usage.completion_tokens))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [x for rs in pool.map(one, range(4)) for x in rs]
    assert len(results) == 8 and all(p == want and n == 5 for p, want, n in results)


def _tool_messages():
    dev = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools(
        [oh.ToolDescription.new("get_weather", "Weather now", parameters=WEATHER_TOOL["function"]["parameters"])]))
    think = oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Need the weather.").with_channel("analysis")
    call = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city":"Paris"}').with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    result = (oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp_c": 21}')
              .with_recipient("assistant").with_channel("commentary"))
    return dev, think, call, result


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_call_round_trip(scripted, stream):
    srv = scripted([CALL, FINAL])
    c = client(srv.url, "unused")
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        chunks = list(c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL], stream=True))
        deltas = [k.choices[0].delta for k in chunks if k.choices]
        reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        tc = [t for d in deltas for t in d.tool_calls or []]
        call_id, fname = tc[0].id, tc[0].function.name
        args = "".join(t.function.arguments or "" for t in tc)
        finish = [k.choices[0].finish_reason for k in chunks if k.choices][-1]
    else:
        r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL])
        m = r.choices[0].message
        reasoning, content, finish = m.model_extra["reasoning_content"], m.content or "", r.choices[0].finish_reason
        assert len(m.tool_calls) == 1
        call_id, fname, args = m.tool_calls[0].id, m.tool_calls[0].function.name, m.tool_calls[0].function.arguments
    assert (finish, fname, json.loads(args), reasoning, content) == ("tool_calls", "get_weather", {"city": "Paris"},
                                                                     "Need the weather.", "")
    dev, think, call, result = _tool_messages()
    assert srv.backend.prefills[0] == (0, harmony_prompt([dev, user("Weather in Paris?")]))
    msgs += [{"role": "assistant", "content": None, "reasoning_content": reasoning, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": fname, "arguments": args}}]},
             {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL])
    want = harmony_prompt([dev, user("Weather in Paris?"), think, call, result])
    start, fed = srv.backend.prefills[1]
    assert want[start:] == fed and r.usage.prompt_tokens_details.cached_tokens == start
    assert start > len(srv.backend.prefills[0][1])  # the reasoning and the call came from the cache
    m = r.choices[0].message
    assert (m.content, m.model_extra["reasoning_content"], r.choices[0].finish_reason) == (
        "Sunny, 21 C.", "It is sunny.", "stop")


def test_tool_choice_forces_the_call_or_removes_the_tools(scripted):
    srv = scripted(['{"city":"Rome"}<|call|>', "<|channel|>final<|message|>No tools.<|return|>"])
    c = client(srv.url, "unused")
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    tc = r.choices[0].message.tool_calls
    assert (r.choices[0].finish_reason, tc[0].function.name, tc[0].function.arguments) == (
        "tool_calls", "get_weather", '{"city":"Rome"}')
    dev = _tool_messages()[0]
    forced = ENC.encode("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
                        allowed_special="all")
    assert srv.backend.prefills[0] == (0, harmony_prompt([dev, user("Weather in Rome?")]) + forced)
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL], tool_choice="none")
    assert r.choices[0].message.content == "No tools." and r.choices[0].finish_reason == "stop"
    start, fed = srv.backend.prefills[1]
    assert harmony_prompt([user("Weather in Rome?")])[start:] == fed  # no developer message: no tools
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_cut_off_in_its_header_shows_no_markup(scripted, stream):
    """tool_choice "required" opens the reply with `<|channel|>commentary to=functions.`; when generation ends
    before the model finishes that header, nothing of it becomes content."""
    srv = scripted(["get_weather <|constrain|>json<|message|>{}<|call|>"] * 2)
    c = client(srv.url, "unused")
    kw = {"model": "scripted", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL],
          "tool_choice": "required", "max_tokens": 1}
    if stream:
        chunks = list(c.chat.completions.create(**kw, stream=True))
        assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices) == ""
        assert not any(k.choices[0].delta.tool_calls for k in chunks if k.choices)
    else:
        r = c.chat.completions.create(**kw)
        assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == (None, None)
        assert r.choices[0].finish_reason == "length"
    out = c.responses.create(model="scripted", input="Weather?", tools=[{"type": "function", **WEATHER_TOOL[
        "function"]}], tool_choice="required", max_output_tokens=1)
    assert out.output == [] and out.status == "incomplete"


def test_responses_function_call_with_previous_response_id(scripted):
    srv = scripted([CALL, FINAL, FINAL])
    c = client(srv.url, "unused")
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    r = c.responses.create(model="scripted", input="Weather in Paris?", tools=[tool])
    assert [i.type for i in r.output] == ["reasoning", "function_call"] and r.status == "completed"
    assert r.output[0].content[0].text == "Need the weather."
    fc = r.output[1]
    assert (fc.name, json.loads(fc.arguments)) == ("get_weather", {"city": "Paris"})
    r2 = c.responses.create(model="scripted", previous_response_id=r.id, tools=[tool], input=[
        {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp_c": 21}'}])
    dev, think, call, result = _tool_messages()
    want = harmony_prompt([dev, user("Weather in Paris?"), think, call, result])
    start, fed = srv.backend.prefills[1]
    assert want[start:] == fed and r2.usage.input_tokens_details.cached_tokens == start > 0
    assert r2.output_text == "Sunny, 21 C." and [i.type for i in r2.output] == ["reasoning", "message"]
    events = list(c.responses.create(model="scripted", previous_response_id=r.id, tools=[tool], stream=True, input=[
        {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp_c": 21}'}]))
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    assert kinds[-1] == "response.completed" and events[-1].response.output_text == "Sunny, 21 C."
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="scripted", previous_response_id="resp_nope", input="x")
    assert e.value.code == "previous_response_not_found"


def test_the_clients_stream_helpers_assemble_our_events(scripted):
    """openai's `responses.stream` and `chat.completions.stream` rebuild the reply from the events, in order."""
    srv = scripted([CALL, CALL])
    c = client(srv.url, "unused")
    with c.responses.stream(model="scripted", input="Weather?",
                            tools=[{"type": "function", **WEATHER_TOOL["function"]}]) as s:
        r = s.get_final_response()
    assert [i.type for i in r.output] == ["reasoning", "function_call"] and r.output[1].arguments == '{"city":"Paris"}'
    with c.chat.completions.stream(model="scripted", messages=[{"role": "user", "content": "Weather?"}],
                                   tools=[WEATHER_TOOL]) as s:
        f = s.get_final_completion()
    call = f.choices[0].message.tool_calls[0]
    assert (f.choices[0].finish_reason, call.function.name, call.function.arguments) == (
        "tool_calls", "get_weather", '{"city":"Paris"}')


def test_reasoning_and_markup_never_reach_content(scripted):
    """Analysis goes to reasoning_content; special tokens the model puts inside the final text are dropped."""
    final = ("<|channel|>analysis<|message|>Secret plan.<|end|><|start|>assistant<|channel|>final<|message|>Hello"
             "<|channel|> <|reserved_200013|>world<|return|>")
    srv = scripted([final, final])
    c = client(srv.url, "unused")
    r = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
    m = r.choices[0].message
    assert (m.content, m.model_extra["reasoning_content"]) == ("Hello world", "Secret plan.")
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    chunks = list(c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                            stream=True))
    assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices) == "Hello world"


def test_stop_strings_cut_the_content_and_end_the_generation(scripted):
    long_final = "<|channel|>final<|message|>Sunny, 21 C. Then rain, rain and more rain all week long.<|return|>"
    srv = scripted([long_final] * 3)
    c = client(srv.url, "unused")
    kw = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stop": ["rain", " C."]}
    r = c.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Sunny, 21", "stop")
    assert r.usage.completion_tokens < 12  # generation stopped soon after the stop string
    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices) == "Sunny, 21"
    r = c.chat.completions.create(**{**kw, "stop": "nowhere"})
    assert r.choices[0].message.content.endswith("all week long.")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(**{**kw, "stop": ["a", "b", "c", "d", "e"]})


def test_a_stop_string_in_the_last_token_is_a_stop_and_nothing_is_generated_after_it(scripted):
    """The worker checks the stop strings itself before the next token: usage counts the tokens up to the one that
    completed the stop string, and finish_reason is "stop" even when that token was the last max_tokens allowed."""
    reply = "<|channel|>final<|message|>Sunny, 21 C. Then rain, rain and more rain all week long.<|return|>"
    upto = len(ENC.encode("<|channel|>final<|message|>Sunny, 21 C.", allowed_special="all"))
    srv = scripted([reply] * 4)
    c = client(srv.url, "unused")
    kw = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stop": " C."}
    for n, finish in ((300, "stop"), (upto, "stop"), (upto - 1, "length")):
        r = c.chat.completions.create(**kw, max_tokens=n)
        assert r.choices[0].finish_reason == finish, (n, r)
        assert r.usage.completion_tokens == min(n, upto), (n, r.usage)
    chunks = list(c.chat.completions.create(**kw, max_tokens=upto, stream=True))
    assert [k.choices[0].finish_reason for k in chunks if k.choices and k.choices[0].finish_reason] == ["stop"]


def test_a_requests_effort_sets_its_default_budget():
    """Without max_tokens of its own, a request's reasoning effort picks its budget as chat's /effort does (when
    the server was given no --max-tokens); an explicit max_tokens wins."""
    from types import SimpleNamespace

    from edgec.runtime.generate import Sampling
    from edgec.serve.app import Server

    srv = Server.__new__(Server)
    srv.engine = SimpleNamespace(session=SimpleNamespace(sampling=Sampling(max_tokens=8192), auto_max_tokens=True,
                                                         max_context=131072))
    keys = ("max_tokens",)
    assert [srv.sampling({}, e, keys).max_tokens for e in ("low", "medium", "high", None)] == [2048, 8192, 32768,
                                                                                                8192]
    assert srv.sampling({"max_tokens": 5}, "high", keys).max_tokens == 5
    srv.engine.session.max_context = 8192
    assert srv.sampling({}, "high", keys).max_tokens == 4096  # at most half the context
    srv.engine.session.auto_max_tokens = False  # --max-tokens given to the server: it is every request's default
    assert srv.sampling({}, "high", keys).max_tokens == 8192


def test_full_queue_is_429_and_a_waiting_client_that_leaves_gives_its_place_back(scripted):
    srv = scripted([], delay=0.02, max_queue=1)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "long"}], "max_tokens": 100}
    pool = ThreadPoolExecutor(2)
    running = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=60)
    t = time.time()
    while not srv.engine.busy and time.time() - t < 30:
        time.sleep(0.01)
    waiting = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=60)
    while srv.engine.waiting < 1 and time.time() - t < 30:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as e:
        client(srv.url, "unused").chat.completions.create(**body)
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
    assert running.result().status_code == waiting.result().status_code == 200
    assert len(srv.backend.prefills) == 2
    # a client that gives up while its request waits: its place is free at once, its request never runs
    running = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=60)
    while not srv.engine.busy and time.time() - t < 60:
        time.sleep(0.01)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 7}, timeout=0.5)
    while srv.engine.waiting and time.time() - t < 60:
        time.sleep(0.05)
    later = pool.submit(client(srv.url, "unused").chat.completions.create, **{**body, "max_tokens": 3})
    assert later.result().usage.completion_tokens == 3 and running.result().status_code == 200
    assert len(srv.backend.prefills) == 4  # the one that left was skipped
    # no job is left behind: the worker drops a job from `live` just after its reply is delivered, so wait (bounded)
    t = time.time()
    while srv.engine.live and time.time() - t < 60:
        time.sleep(0.05)
    assert not srv.engine.live
    pool.shutdown()


def test_a_client_that_leaves_a_whole_reply_request_stops_the_generation(scripted):
    srv = scripted([], delay=0.02)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "long"}], "max_tokens": 500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=1.0)
    t = time.time()
    while srv.engine.busy and time.time() - t < 5:
        time.sleep(0.05)
    assert not srv.engine.busy and len(srv.backend.ids) < 250  # 500 tokens would take 10 s
    assert client(srv.url, "x").chat.completions.create(**{**body, "max_tokens": 3}).usage.completion_tokens == 3


def test_a_backend_failure_is_a_500_and_the_next_request_is_served(scripted):
    srv = scripted([FINAL, FINAL])
    forward, calls = srv.backend.forward, []

    def failing(ids, all_logits=False):
        calls.append(1)
        if len(calls) == 3:  # in the first reply's decode
            raise RuntimeError("device lost")
        return forward(ids, all_logits)

    srv.backend.forward = failing
    c = client(srv.url, "x")
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
    assert "device lost" in e.value.message and e.value.type == "server_error"
    r = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Sunny, 21 C." and r.usage.prompt_tokens_details.cached_tokens > 0


def test_serve_cli_has_no_chat_only_options_and_refuses_missing_folders(tiny_mlx, tmp_path):
    from click.testing import CliRunner

    from edgec.cli import main

    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "--identity" in r.output
    for chat_only in ("--tools", "--system", "--developer", "--show-analysis"):
        assert chat_only not in r.output
        r = CliRunner().invoke(main, ["serve", str(tiny_mlx), chat_only, *([] if chat_only == "--show-analysis"
                                                                           else ["x"])])
        assert r.exit_code == 2 and "No such option" in r.output
    r = CliRunner().invoke(main, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 2


def test_ctrl_c_stops_the_server_with_exit_130(tiny_mlx):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgec", "serve", str(tiny_mlx), "--port", str(port),
                             "--max-context", "512"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130 and "interrupted" in proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_a_stream_ends_it_at_once_without_a_traceback(tiny_mlx, sig):
    """The running job and the waiting ones end (their streams close with a finish_reason chunk and [DONE]), the
    worker leaves the model, then exit 130: no graceful-shutdown timeout, no CancelledError traceback, no abort from
    the runtime's threads. SIGTERM (what systemd, launchd and docker stop send) takes the same path."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgec", "serve", str(tiny_mlx), "--port", str(port),
                             "--max-context", "4096", "--max-tokens", "2000"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    body = {"model": tiny_mlx.name, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    pool = ThreadPoolExecutor(2)
    first = threading.Event()

    def stream() -> list[str]:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = [] if r.status_code == 200 else [r.read().decode()]
            for line in r.iter_lines():
                lines.append(line)
                first.set()
            return lines

    streams = [pool.submit(stream) for _ in range(2)]  # one running, one waiting
    assert first.wait(60)
    t = time.monotonic()
    proc.send_signal(sig)
    rc, err = proc.wait(30), proc.stderr.read()
    assert rc == 130 and time.monotonic() - t < 4, (rc, err)
    assert "Traceback" not in err and "CancelledError" not in err and "terminate called" not in err, err
    finished = 0
    for f in streams:  # each ended properly (a request that came in after the signal gets a 503 instead)
        lines = [x for x in f.result(30) if x]
        if '"server_shutting_down"' in lines[-1]:
            continue
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] is not None, last
        finished += 1
    assert finished >= 1  # the stream that was running when the signal came


def test_web_page_is_served(live):
    url, _ = live
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<select id=\"effort\">" in page.text  # the page itself needs no key
    assert httpx.get(url + "/static/app.js").status_code == 200
