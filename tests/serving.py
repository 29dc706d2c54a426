"""Helpers for the `edgec serve` tests: ports, readiness, openai-harmony prompts, and an in-process server (real
uvicorn, real HTTP) over a scripted backend that speaks Harmony."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import openai_harmony as oh

from edgec.harmony.tokenizer import Tokenizer
from edgec.runtime.base import Backend
from edgec.runtime.generate import Sampling
from edgec.spec import preset

KEY = "test-key"
ENC = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"edgec serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def live_server(folder: Path, *args: str):
    """For a fixture: `edgec serve FOLDER` (API key KEY, context 1024, greedy) in its own process on a free port;
    yields (url, model id: the first name /v1/models lists) and stops it after (SIGTERM: exit 130)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgec", "serve", str(folder), "--port", str(port), "--api-key",
                             KEY, "--max-context", "1024", "--temperature", "0", *args],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        yield url, models["data"][0]["id"]
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 130, proc.stderr.read()  # SIGTERM takes Ctrl-C's path


def harmony_prompt(messages: list, effort=oh.ReasoningEffort.MEDIUM) -> list[int]:
    """openai-harmony's prompt for a system message (today's date) followed by `messages`."""
    sc = oh.SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(
        datetime.date.today().isoformat())
    conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.SYSTEM, sc), *messages])
    return list(ENC.render_conversation_for_completion(conv, oh.Role.ASSISTANT))


def user(text: str):
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


# ---- in-process server over a scripted backend ----------------------------------------------------------------------
class Scripted(Backend):
    """Speaks Harmony from a script: each prefill starts the next reply (a completion text with special tokens), each
    decode step emits its next token; a real KV length so the Generator's reuse and rollback run as for a model."""

    name = "scripted"

    def __init__(self, replies: list[str], delay: float = 0.0):
        self.config = preset("tiny")
        tok = Tokenizer.default()
        self.replies = [tok.encode(r, allowed_special="all") for r in replies]
        self.ids: list[int] = []
        self.prefills: list[tuple[int, list[int]]] = []  # (position, tokens) of each prefill
        self.script: list[int] = []
        self.last: int | None = None
        self.delay = delay

    @property
    def length(self) -> int:
        return len(self.ids)

    def forward(self, ids, all_logits=False):
        ids = [int(t) for t in ids]
        if not (len(ids) == 1 and ids[0] == self.last):  # a prefill (not the token just emitted): the next reply
            self.prefills.append((len(self.ids), ids))
            self.script = list(self.replies.pop(0)) if self.replies else []
        self.ids += ids
        time.sleep(self.delay)
        self.last = self.script.pop(0) if self.script else 1000 + len(self.ids) % 50
        out = np.zeros((1, self.config.vocab_size), np.float32)
        out[0, self.last] = 100.0
        return out

    def truncate(self, n):
        del self.ids[n:]


class InProcess:
    def __init__(self, backend: Backend, **settings):
        import uvicorn

        from edgec.runtime.session import ChatSession
        from edgec.serve.app import Settings, create_app
        from edgec.serve.engine import Engine

        self.backend = backend
        max_queue = settings.pop("max_queue", 8)
        self.engine = Engine(lambda: ChatSession(backend, Tokenizer.default(), max_context=4096,
                                                 sampling=Sampling(temperature=0, max_tokens=64)), max_queue)
        self.engine.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.engine, Settings("scripted", **settings))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()


def scripted_servers():
    """For a fixture: yields make(replies, delay=0, **settings) -> InProcess, and closes every server made."""
    servers = []

    def make(replies: list[str], **kw) -> InProcess:
        servers.append(InProcess(Scripted(replies, kw.pop("delay", 0.0)), **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


CALL = ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary'
        ' to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>')
FINAL = ("<|channel|>analysis<|message|>It is sunny.<|end|><|start|>assistant<|channel|>final<|message|>Sunny, 21 C."
         "<|return|>")


