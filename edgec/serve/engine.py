"""One loaded model, one worker thread, a bounded queue of jobs.

Generation is serialized: the worker takes one job at a time and runs the chat loop's `Generator` on it, so every
request reuses the longest common prefix of its prompt with what the KV cache holds (the same rollback as chat).
Between two tokens the worker checks whether the job was cancelled (its client went away): it then closes the token
stream, which leaves the cache holding exactly the tokens it knows (`Generator.tokens`), and takes the next job.

The model is loaded on the worker thread itself (MLX streams belong to the thread that made them). The worker hands
results to the event loop with `call_soon_threadsafe`: per token, the parser events it produced; at the end, the
statistics and the parsed Harmony messages.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from ..harmony.openai import RequestError
from ..harmony.parser import StreamParser
from ..runtime.generate import Sampling, Stats


@dataclass
class Done:
    """The end of a job: statistics (stop: return|call|max_tokens|context|cancelled), messages, reasoning tokens."""

    stats: Stats
    messages: list = field(default_factory=list)
    reasoning_tokens: int = 0
    error: BaseException | None = None


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    forced: list[int] = field(default_factory=list)  # the end of the prompt that starts the reply (tool_choice)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of parser events, then one Done
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # taken by the worker (until then it holds a place in the queue)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel.set()


class Engine:
    """`open()` (run on the worker thread) returns a ChatSession: its Generator, tokenizer and defaults are used."""

    def __init__(self, open: Callable[[], Any], max_queue: int = 64):
        self._open = open
        self.max_queue = max_queue
        self._jobs: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.busy = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.session: Any = None
        self._thread = threading.Thread(target=self._run, name="edgec-generate", daemon=True)

    def start(self) -> None:
        """Start the worker and wait until the model is loaded (a load error is raised here)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._jobs.put(None)

    def cancel(self, job: Job) -> None:
        """The job's client is gone: a waiting job gives its place in the queue back at once, a running one stops
        before its next token."""
        with self._lock:
            if not job.started and not job.cancel.is_set():
                self.waiting -= 1
            job.cancel.set()

    def submit(self, prompt: list[int], sampling: Sampling, forced: list[int] | None = None) -> Job:
        """Queue a job (`forced`: tokens already at the end of `prompt` that open the reply); a full queue is a
        429."""
        job = Job(prompt, sampling, asyncio.get_running_loop(), list(forced or []))
        with self._lock:
            if self.waiting >= self.max_queue:
                raise RequestError(f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                                   code="rate_limit_exceeded", status=429, type="rate_limit_error")
            self.waiting += 1
        self._jobs.put(job)
        return job

    # ---- the worker ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.session = self._open()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.cancel.is_set():  # its client left while it waited (its place is already given back)
                    continue
                self.waiting -= 1
                job.started = self.busy = True
            try:
                job.put(self._generate(job))
            except Exception as e:
                traceback.print_exc()
                job.put(Done(self.session.gen.stats, error=e))
            finally:
                self.busy = False

    def _generate(self, job: Job) -> Done:
        gen = self.session.gen
        parser = StreamParser(self.session.tokenizer, role="assistant", special_text=False)
        reasoning = 0
        if events := parser.feed_many(job.forced):
            job.put(events)
        tokens = gen.stream(job.prompt, job.sampling)
        for tok in tokens:
            if job.cancel.is_set():
                tokens.close()  # before the next forward: the cache holds exactly gen.tokens
                gen.stats.stop = "cancelled"
                break
            events = parser.feed(tok)
            reasoning += parser.current_channel == "analysis"
            if events:
                job.put(events)
        if events := parser.finish():
            job.put(events)
        return Done(gen.stats, list(parser.messages), reasoning)
