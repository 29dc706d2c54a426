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

from ..harmony.openai import Reply, RequestError
from ..harmony.parser import StreamParser
from ..runtime.generate import Sampling, Stats


class StopText:
    """Cuts the answer's text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.keep = stops, max((len(x) for x in stops), default=1) - 1
        self.pending, self.hit = "", False

    def feed(self, text: str) -> str:
        """The text that can go out now."""
        if self.hit:
            return ""
        self.pending += text
        cuts = [i for i in (self.pending.find(x) for x in self.stops) if i >= 0]
        if cuts:
            out, self.pending, self.hit = self.pending[:min(cuts)], "", True
            return out
        n = len(self.pending) - self.keep
        out, self.pending = (self.pending[:n], self.pending[n:]) if n > 0 else ("", self.pending)
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


@dataclass
class Done:
    """The end of a job: statistics (stop: return|call|max_tokens|context|stop_string|cancelled), messages, reasoning
    tokens."""

    stats: Stats
    messages: list = field(default_factory=list)
    reasoning_tokens: int = 0
    error: BaseException | None = None


@dataclass(eq=False)  # identity: jobs live in a set
class Job:
    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    forced: list[int] = field(default_factory=list)  # the end of the prompt that starts the reply (tool_choice)
    stops: list[str] = field(default_factory=list)  # stop strings: generation ends where the content holds one
    guard: Any = None  # a compiled constraint (runtime.constrain.Guard) for this reply, or None
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
        self.live: set[Job] = set()  # submitted and not yet done
        self.closing = False  # shutdown began: no more jobs
        self._thread = threading.Thread(target=self._run, name="edgec-generate", daemon=True)

    def start(self) -> None:
        """Start the worker and wait until the model is loaded (a load error is raised here)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def cancel(self, job: Job) -> None:
        """The job's client is gone: a waiting job gives its place in the queue back at once, a running one stops
        before its next token."""
        with self._lock:
            if not job.started and not job.cancel.is_set():
                self.waiting -= 1
            job.cancel.set()

    def submit(self, prompt: list[int], sampling: Sampling, forced: list[int] | None = None,
               stops: list[str] | None = None, guard: Any = None) -> Job:
        """Queue a job (`forced`: tokens already at the end of `prompt` that open the reply; `stops`: stop strings;
        `guard`: the reply's compiled constraint); a full queue is a 429."""
        job = Job(prompt, sampling, asyncio.get_running_loop(), list(forced or []), list(stops or []), guard=guard)
        with self._lock:
            if self.closing:
                raise RequestError("the server is shutting down", code="server_shutting_down", status=503,
                                   type="server_error")
            if self.waiting >= self.max_queue:
                raise RequestError(f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                                   code="rate_limit_exceeded", status=429, type="rate_limit_error")
            self.waiting += 1
            self.live.add(job)
        self._jobs.put(job)
        return job

    def shutdown(self, timeout: float = 30.0) -> None:
        """Server exit: end every job (a waiting one gets its Done now, the running one stops before its next token,
        so open streams close at once), then wait for the worker to leave the model (the runtime's own threads must
        not be torn down under a running step)."""
        with self._lock:
            self.closing = True
            jobs = list(self.live)
        for job in jobs:
            waiting = not job.started
            self.cancel(job)
            if waiting:
                job.put(Done(Stats(stop="cancelled")))
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

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
                    self.live.discard(job)
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
                with self._lock:
                    self.live.discard(job)

    def _generate(self, job: Job) -> Done:
        gen = self.session.gen
        parser = StreamParser(self.session.tokenizer, role="assistant", special_text=False)
        reply, cut = Reply(), StopText(job.stops)  # the content as the routes see it, for the stop strings
        reasoning = 0
        if events := parser.feed_many(job.forced):
            job.put(events)
        tokens = gen.stream(job.prompt, job.sampling, job.guard)
        for tok in tokens:
            if job.cancel.is_set():
                tokens.close()  # before the next forward: the cache holds exactly gen.tokens
                gen.stats.stop = "cancelled"
                break
            events = parser.feed(tok)
            reasoning += parser.current_channel == "analysis"
            if events:
                job.put(events)
            if job.stops:
                for _, it, delta in (x for e in events for x in reply.feed(e)):
                    if it.kind == "text":
                        cut.feed(delta)
                if cut.hit:  # the content holds a stop string: nothing after it is generated
                    tokens.close()
                    gen.stats.stop = "stop_string"
                    break
        # a tool call forced by tool_choice whose header the model left unfinished is dropped, not shown as text
        if events := parser.finish(header_as_text=not job.forced):
            job.put(events)
        return Done(gen.stats, list(parser.messages), reasoning)
