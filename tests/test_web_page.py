"""`edgec web OUT` (issue 21 part 3): the chat page computes in headless Chromium's WebGPU (SwiftShader here).

One browser session for the module: the tiny fixture converted with `--target onnx-webgpu --dense fp32` is served by
edgec/web/server.py; onnx-cpu with the same weights (int4 experts, fp32 dense and lm_head) is the peer.
Chromium + chromedriver come from .ci/run (apt), onnxruntime-web from `make setup` (npm ci --prefix edgec/web).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner

from edgec.cli import main
from edgec.harmony.conversation import Conversation, Message, system_message
from edgec.harmony.parser import StreamParser
from edgec.harmony.render import render_conversation
from edgec.harmony.tokenizer import Tokenizer
from edgec.web import browser, server

DATE = "2026-01-02"
EDGEC = [sys.executable, "-m", "edgec"]


@pytest.fixture(scope="module")
def outs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    web, cpu = root / "w32", root / "c32"
    subprocess.run([*EDGEC, "convert", str(tiny), "--target", "onnx-webgpu", "--dense", "fp32", "-o", str(web)],
                   check=True)
    subprocess.run([*EDGEC, "convert", str(tiny), "--target", "onnx-cpu", "--experts", "int4", "--dense", "fp32",
                    "--lm-head", "fp32", "-o", str(cpu)], check=True)
    return web, cpu


@pytest.fixture(scope="module")
def site(outs):
    srv = server.make_server(outs[0])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def page(site):
    with browser.chrome(script_timeout_s=120) as driver:
        driver.get(f"{site}/?date={DATE}&context=256")
        _until(driver, "window.edgec.ready || window.edgec.error", 120)
        assert driver.execute_script("return window.edgec.error") is None
        yield driver


def _until(driver, js, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if driver.execute_script(f"return !!({js})"):
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {js}")


def _set(driver, **fields):
    for k, v in fields.items():
        driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", k, str(v))


def _send(driver, text):
    driver.find_element("id", "reset").click()
    box = driver.find_element("id", "prompt")
    box.send_keys(text + "\n")  # Enter sends
    _until(driver, "window.edgec.running", 10)


def _get(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_server_serves_only_files_with_types_and_ranges(site, outs):
    web = outs[0]
    status, head, body = _get(site + "/")
    assert status == 200 and head["Content-Type"].startswith("text/html") and b"edgec web" in body
    assert _get(site + "/chat.js")[1]["Content-Type"] == "text/javascript"
    assert _get(site + "/ort/ort.webgpu.min.mjs")[1]["Content-Type"] == "text/javascript"
    wasm = [p.name for p in browser.require_js().glob("*.wasm")]
    assert wasm and _get(f"{site}/ort/{wasm[0]}")[1]["Content-Type"] == "application/wasm"
    data = (web / "model.onnx.data").read_bytes()
    status, head, body = _get(site + "/model/model.onnx.data", {"Range": "bytes=100-4195"})
    assert status == 206 and body == data[100:4196] and head["Content-Range"] == f"bytes 100-4195/{len(data)}"
    assert _get(site + "/model/model.onnx.data", {"Range": "bytes=-10"})[2] == data[-10:]
    assert _get(site + "/model/model.onnx.data", {"Range": f"bytes={len(data)}-"})[0] == 416
    assert _get(site + "/model/model.onnx.data")[2] == data
    (web / "model.onnx.data.1").write_bytes(b"part")  # a split output's next data file (max_data_file_bytes)
    status, head, body = _get(site + "/model/model.onnx.data.1")
    assert status == 200 and head["Content-Type"] == "application/octet-stream" and body == b"part"
    (web / "model.onnx.data.1").unlink()
    (web / ".hidden").write_text("x")
    for bad in ("/model/", "/ort/", "/model/.hidden", "/model/%2e%2e/w32/edgec.json", "/../etc/passwd",
                "/model/../../etc/passwd", "/nope.js"):
        assert _get(site + bad)[0] == 404, bad


def test_cli_hints(tmp_path, outs, tiny, monkeypatch):
    r = CliRunner().invoke(main, ["web", str(tmp_path)])
    assert r.exit_code == 2 and "not an edgec output" in r.output and "--target onnx-webgpu" in r.output
    monkeypatch.setattr(browser, "ORT_DIST", tmp_path / "absent")
    r = CliRunner().invoke(main, ["web", str(outs[0])])
    assert r.exit_code == 3 and "npm ci --prefix edgec/web" in r.output


def test_cli_serves_and_ctrl_c_exits_130(outs):
    import signal

    proc = subprocess.Popen([*EDGEC, "web", str(outs[0]), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert _get(url + "model/edgec.json")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc == 130 and "Traceback" not in proc.stderr.read()


def test_page_shows_adapter_and_variant(page):
    got = browser.adapter(page)
    device, variant = page.find_element("id", "device").text, page.find_element("id", "variant").text
    assert device == (got["description"] or " ".join(x for x in (got["vendor"], got["architecture"]) if x))
    has_f16 = "shader-f16" in got["features"]
    assert variant == f"fp32 (adapter {'has' if has_f16 else 'has no'} shader-f16)"
    assert "nodes on WebGPU" in page.find_element("id", "status").text


STRINGS = ["hello world", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n", "1234567 3.14159 -42",
           "naïve café — über straße", "日本語のテキスト、中文字符", "emoji 🤖👍🏽 and ZWJ 👩‍💻", "DON'T I'LL we'Re",
           "x\u00a0y\u2003z\u0085w\ufeffv", "<|start|>user<|message|>hi<|end|>", "code: def f(x):\n    return x**2",
           "", " ", "a" * 300, "Ωmega ΣIGMA ǅ ǈ", "１２３ full-width, ٣٤٥ arabic digits"]


def test_tokenizer_ids_equal_edgec(page, outs):
    tok = Tokenizer.from_folder(outs[0])
    got = page.execute_script("""const t = window.edgec.tokenizer;
        return arguments[0].map(s => [t.encodeOrdinary(s), t.encode(s), t.decode(t.encode(s))]);""", STRINGS)
    for s, (ordinary, special, back) in zip(STRINGS, got, strict=True):
        assert ordinary == tok.encode_ordinary(s), s
        assert special == tok.encode(s, allowed_special="all"), s
        assert back == s


def test_sampling_in_the_page(page):
    """chat.js's sample(): greedy at temperature 0 (first of equal maxima, as numpy), top-p keeps the smallest set
    reaching p, and draws follow softmax(logits / T). 4,000 draws: each frequency is within 5 binomial sigmas of
    its probability (a false alarm ~1e-6 per bin)."""
    logits = [0.0, 2.0, 2.0, 1.0, -3.0]
    got = page.execute_async_script("""const done = arguments[arguments.length - 1];
        import('/chat.js').then(({sample}) => {
          const l = Float32Array.from(arguments[0]), counts = new Array(l.length).fill(0);
          for (let i = 0; i < arguments[1]; i++) counts[sample(l, 0.7, 1, Math.random)]++;
          const nucleus = new Set();
          for (let i = 0; i < 200; i++) nucleus.add(sample(l, 1, 0.5, Math.random));
          done({greedy: sample(l, 0, 1, Math.random), counts, nucleus: [...nucleus].sort()});
        }, e => done({error: String(e)}));""", logits, 4000)
    assert got.get("error") is None and got["greedy"] == 1
    p = np.exp(np.asarray(logits) / 0.7)
    p /= p.sum()
    n = 4000
    assert np.all(np.abs(np.asarray(got["counts"]) - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1)
    assert got["nucleus"] == [1, 2]  # the two at 2.0 hold 0.40 each: together the smallest set reaching 0.5


def test_harmony_stream_parse_in_the_page(page, outs):
    """harmony.js's StreamParser on a well-formed reply (reasoning, then the final answer, split mid-character) gives
    edgec's StreamParser's messages; the page shows the analysis apart from the final text."""
    tok = Tokenizer.from_folder(outs[0])
    reply = tok.encode("<|channel|>analysis<|message|>User asks: think… 🤔<|end|><|start|>assistant<|channel|>final"
                       "<|message|>Paris — naïve café.<|return|>", allowed_special="all")
    got = page.execute_async_script("""const done = arguments[arguments.length - 1];
        import('/harmony.js').then(({StreamParser}) => {
          const p = new StreamParser(window.edgec.tokenizer), texts = [];
          for (const id of arguments[0]) for (const ev of p.feed(id)) if (ev.kind === 'text') texts.push(ev.text);
          p.finish();
          done({messages: p.messages.map(m => [m.channel, m.text]), texts});
        }, e => done({error: String(e)}));""", reply)
    parser = StreamParser(tok)
    for t in reply:
        parser.feed(t)
    parser.finish()
    assert got.get("error") is None
    assert got["messages"] == [[m.channel, m.text] for m in parser.messages]
    assert got["messages"] == [["analysis", "User asks: think… 🤔"], ["final", "Paris — naïve café."]]
    assert len(got["texts"]) > 2  # streamed in pieces, never a broken character
    assert "\ufffd" not in "".join(got["texts"])


def _conversation(text):
    return Conversation([system_message("medium", DATE), Message("user", text)])


@pytest.mark.float_sensitive
def test_typed_prompt_streams_and_greedy_ids_equal_onnx_cpu(page, outs, tmp_path):
    """At temperature 0 the page's first 16 ids equal `edgec generate` on onnx-cpu with the same weights. Both run
    float32 from identical weights and differ only by summation order: the error model of
    tests/test_webgpu.py (reductions of <= 128 terms, a few dozen steps) bounds the logits' difference by ~1e-4, so
    1e-3 is asserted on the top-5 logits of every step. A near-tie closer than that may flip one argmax: then
    the ids must agree up to that step and the flipped pair must be within the bound there."""
    web, cpu = outs
    text = "What is the capital of France?"
    _set(page, temperature=0, max_tokens=16)
    _send(page, text)
    seen = set()
    while page.execute_script("return window.edgec.running"):
        seen.add(page.execute_script("return window.edgec.last.tokens.length"))
        time.sleep(0.1)
    last = page.execute_script("return window.edgec.last")
    assert page.execute_script("return window.edgec.error") is None
    assert any(0 < n < len(last["tokens"]) for n in seen)  # streamed: seen part-way
    tok = Tokenizer.from_folder(web)
    assert last["prompt"] == render_conversation(_conversation(text), tok)
    raw = page.find_element("css selector", ".turn:last-child .raw").get_attribute("textContent")
    assert raw == tok.decode(last["tokens"])
    # the page's parse is edgec's StreamParser's
    parser = StreamParser(tok)
    for t in last["tokens"]:
        parser.feed(t)
    parser.finish()
    final = "".join(m.text for m in parser.messages if m.channel != "analysis")
    analysis = "".join(m.text for m in parser.messages if m.channel == "analysis")
    turn = page.find_element("css selector", ".turn:last-child")
    assert turn.find_element("css selector", ".final").get_attribute("textContent") == final
    assert turn.find_element("css selector", ".reasoning").get_attribute("textContent") == analysis

    _greedy_equals_cpu(last, cpu, text, tmp_path)


def _greedy_equals_cpu(last, cpu, text, tmp_path):
    """The page's greedy ids and top-5 logits per step (`last`) vs `edgec generate` / `edgec logits` on `cpu`."""
    conv = tmp_path / "conv.json"
    conv.write_text(_conversation(text).to_json())
    run = subprocess.run([*EDGEC, "generate", str(cpu), "--conversation", str(conv), "--temperature", "0",
                          "--max-tokens", "16", "--max-context", "256", "--json"],
                         check=True, capture_output=True, text=True)
    ref = json.loads(run.stdout)["tokens"]
    steps = last["top"]
    ids = last["prompt"] + last["tokens"][:len(steps) - 1]
    subprocess.run([*EDGEC, "logits", str(cpu), "--ids", ",".join(map(str, ids)), "--last", str(len(steps)),
                    "--out", str(tmp_path / "cpu.npy")], check=True)
    cpu_logits = np.load(tmp_path / "cpu.npy")
    for k, top in enumerate(steps):
        for i, v in top:
            assert abs(cpu_logits[k, i] - v) <= 1e-3, (k, i)
    flip = next((k for k, (a, b) in enumerate(zip(last["tokens"], ref, strict=False)) if a != b), None)
    if flip is None:
        assert last["tokens"] == ref and len(ref) == 16  # the same 16 ids (no stop token came first)
    else:
        a, b = last["tokens"][flip], ref[flip]
        assert abs(cpu_logits[flip, a] - cpu_logits[flip, b]) <= 1e-3, "not a near-tie"


@pytest.mark.float_sensitive
def test_default_fp16_output_greedy_ids_equal_its_widened_graph_on_cpu(tiny, tmp_path):
    """The page on a default (fp16) output, SwiftShader (no shader-f16): model.js runs model.f32.edgec.onnx with the
    fp16 weights widened in the page. The honest peer is that same graph and those same widened weights on
    onnxruntime's CPU provider (tests/widened.py materialises them; onnx-cpu's own conversion rounds bf16 to fp32,
    other weights): both float32 from identical weights, so the rule of the test above holds (top-5 logits within
    1e-3 at every step, the same 16 ids but for a near-tie)."""
    from widened import widened_folder

    w16 = tmp_path / "w16"
    subprocess.run([*EDGEC, "convert", str(tiny), "--target", "onnx-webgpu", "-o", str(w16)], check=True)
    cpu = widened_folder(w16, tmp_path / "cpu")
    srv = server.make_server(w16)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with browser.chrome(script_timeout_s=120) as driver:
            driver.get(f"http://127.0.0.1:{srv.server_address[1]}/?date={DATE}&context=256")
            _until(driver, "window.edgec.ready || window.edgec.error", 120)
            assert driver.execute_script("return window.edgec.error") is None
            variant = driver.find_element("id", "variant").text
            assert variant == "fp32 widened from fp16 (adapter has no shader-f16)", variant
            text = "What is the capital of France?"
            _set(driver, temperature=0, max_tokens=16)
            _send(driver, text)
            _until(driver, "!window.edgec.running", 120)
            assert driver.execute_script("return window.edgec.error") is None
            last = driver.execute_script("return window.edgec.last")
    finally:
        srv.shutdown()
        srv.server_close()
    _greedy_equals_cpu(last, cpu, text, tmp_path)


def test_stop_button(page):
    _set(page, temperature=1, max_tokens=500)
    _send(page, "Tell me a long story.")
    _until(page, "window.edgec.last.tokens.length >= 3", 120)
    page.find_element("id", "stop").click()
    _until(page, "!window.edgec.running", 60)
    last = page.execute_script("return window.edgec.last")
    assert last["stop"] == "stopped" and 3 <= len(last["tokens"]) < 10
    assert page.find_element("id", "send").is_enabled() and not page.find_element("id", "stop").is_enabled()
    # the next turn reuses the cached prefix (the system message at least)
    _set(page, max_tokens=2)
    _send(page, "Shorter, please.")
    _until(page, "!window.edgec.running", 120)
    last = page.execute_script("return window.edgec.last")
    assert last["reused"] > 0 and last["stop"] == "max_tokens" and len(last["tokens"]) == 2
