"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/chat/completions, /v1/responses, and the web page.

Every request is mapped to Harmony by `edgec.harmony.openai`, rendered, checked against the context, and queued on
the `Engine`; the reply streams back as Server-Sent Events or comes back whole. Errors have OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) and status.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import EdgecError
from ..harmony.conversation import Message
from ..harmony.openai import (
    Item,
    Reply,
    RequestError,
    conversation,
    effort_of,
    forced_start,
    from_chat,
    from_responses,
    new_id,
    output_item,
    parse_tools,
    tool_call,
    tool_choice,
)
from ..harmony.render import render_conversation
from ..runtime.generate import Sampling
from .engine import Done, Engine, Job

STATIC = Path(__file__).parent / "static"
STORED_RESPONSES = 256  # responses kept for previous_response_id, oldest dropped first


@dataclass
class Settings:
    model_id: str
    api_key: str | None = None
    max_body: int = 4 << 20
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Stored:
    """A finished response: the Harmony messages after the developer message (input + output), its tool calls."""

    messages: list[Message]
    calls: dict[str, str]
    body: dict


# ---- request helpers ----------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(f"request body is {size} bytes; the limit is {limit}", code="request_too_large", status=413)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestError(f"request body exceeds {limit} bytes", code="request_too_large", status=413)
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise RequestError(f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, kind: type, lo: float, hi: float | None = None) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}", key, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise RequestError(f"{key} must be between {lo} and {hi if hi is not None else 'the context'} (got {v})", key,
                           "invalid_value")
    return v


def sampling_of(body: dict, default: Sampling, max_keys: tuple[str, ...]) -> Sampling:
    max_tokens = next((_number(body, k, int, 1) for k in max_keys if body.get(k) is not None), None)
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1)
    if top_p == 0:
        raise RequestError("top_p must be greater than 0", "top_p", "invalid_value")
    top_k = _number(body, "top_k", int, 0)
    seed = _number(body, "seed", int, -(2**63))
    return Sampling(temperature=default.temperature if temperature is None else float(temperature),
                    top_p=default.top_p if top_p is None else float(top_p),
                    top_k=default.top_k if top_k is None else top_k,
                    seed=default.seed if seed is None else seed % 2**63,
                    max_tokens=default.max_tokens if max_tokens is None else max_tokens)


def refuse(body: dict, key: str, allowed: tuple = (None,)) -> None:
    """A parameter this server does not implement must not be silently ignored."""
    if body.get(key) not in allowed:
        raise RequestError(f"{key}={json.dumps(body.get(key))[:80]} is not supported by this server", key,
                           "unsupported_value")


def usage_chat(done: Done) -> dict:
    st = done.stats
    return {"prompt_tokens": st.prompt, "completion_tokens": st.decode, "total_tokens": st.prompt + st.decode,
            "prompt_tokens_details": {"cached_tokens": st.reused},
            "completion_tokens_details": {"reasoning_tokens": done.reasoning_tokens}}


def usage_responses(done: Done) -> dict:
    st = done.stats
    return {"input_tokens": st.prompt, "input_tokens_details": {"cached_tokens": st.reused, "cache_write_tokens": 0},
            "output_tokens": st.decode, "output_tokens_details": {"reasoning_tokens": done.reasoning_tokens},
            "total_tokens": st.prompt + st.decode}


def timings(done: Done) -> dict:
    """edgec's own figures (beside `usage`), for the web page and the benchmark."""
    st = done.stats
    return {"prompt": st.prompt, "reused": st.reused, "prefill": st.prefill, "prefill_s": round(st.prefill_s, 4),
            "ttft_s": round(st.ttft_s, 4), "decode": st.decode, "decode_s": round(st.decode_s, 4),
            "tok_s": round(st.tok_s, 2), "stop": st.stop}


def finish_reason(reply: Reply, done: Done) -> str:
    if done.stats.stop in ("max_tokens", "context"):
        return "length"
    return "tool_calls" if any(i.kind == "call" for i in reply.items) else "stop"


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return head + "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


# ---- the application ----------------------------------------------------------------------------------------------
class Server:
    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self.stored: OrderedDict[str, Stored] = OrderedDict()

    @property
    def session(self):
        return self.engine.session

    # ---- shared steps ----
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise RequestError("you must provide a model parameter", "model", "missing_required_parameter")
        if model != self.settings.model_id:
            raise RequestError(f"The model {model!r} does not exist; this server serves "
                               f"{self.settings.model_id!r}", "model", "model_not_found", status=404)

    async def prompt_of(self, messages: list[Message], effort: str | None, param: str, forced: list[int]
                        ) -> list[int]:
        s = self.session
        conv = conversation(messages, effort or s.reasoning, _dt.date.today().isoformat(), s.identity)
        try:
            prompt = await run_in_threadpool(render_conversation, conv, s.tokenizer) + forced
        except RequestError:
            raise
        except EdgecError as e:
            raise RequestError(str(e), param, "invalid_value") from None
        if len(prompt) >= s.max_context:
            raise RequestError(f"This model's maximum context length is {s.max_context} tokens. However, your "
                               f"messages resulted in {len(prompt)} tokens.", param, "context_length_exceeded")
        return prompt

    def forced(self, choice: str | None) -> list[int]:
        text = forced_start(choice)
        return self.session.tokenizer.encode(text, allowed_special="all") if text else []

    async def events(self, job: Job, request: Request, watch: bool) -> AsyncIterator[list | Done]:
        """The job's parser-event lists, then its Done. Cancels the job if this is cancelled (the client left a
        stream) or, with watch=True, when the client disconnects while waiting for a whole reply."""
        check = time.monotonic() + 0.5
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.out.get(), 0.5) if watch else await job.out.get()
                except TimeoutError:
                    item = None
                if watch and time.monotonic() >= check:
                    if await request.is_disconnected():
                        return
                    check = time.monotonic() + 0.5
                if item is None:
                    continue
                yield item
                if isinstance(item, Done):
                    if item.error is not None:
                        raise item.error
                    return
        finally:
            job.cancel.set()  # a no-op once the job is done

    # ---- routes ----
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "ok", "waiting": e.waiting, "busy": e.busy,
                             "cached_tokens": len(self.session.gen.tokens)})

    def model_card(self) -> dict:
        s = self.session
        return {"id": self.settings.model_id, "object": "model", "created": self.settings.created,
                "owned_by": "edgec", "backend": s.backend.name, "context_length": s.max_context}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model"] != self.settings.model_id:
            raise RequestError(f"The model {request.path_params['model']!r} does not exist", "model",
                               "model_not_found", status=404)
        return JSONResponse(self.model_card())

    async def chat_completions(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body)
        self.check_model(body)
        refuse(body, "n", (None, 1))
        refuse(body, "logprobs", (None, False))
        refuse(body, "stop", (None, "", []))
        refuse(body, "response_format", (None, {"type": "text"}))
        effort = effort_of(body.get("reasoning_effort"), "reasoning_effort") or effort_of(
            (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None,
            "reasoning.effort")
        choice = tool_choice(body.get("tool_choice"), parse_tools(body.get("tools")))
        messages = from_chat(body.get("messages"), None if choice == "none" else body.get("tools"))
        sampling = sampling_of(body, self.session.sampling, ("max_completion_tokens", "max_tokens"))
        forced = self.forced(choice)
        prompt = await self.prompt_of(messages, effort, "messages", forced)
        stream = bool(body.get("stream"))
        opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        job = self.engine.submit(prompt, sampling, forced)
        head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": self.settings.model_id,
                "system_fingerprint": f"edgec-{self.session.backend.name}"}
        if stream:
            return StreamingResponse(self.chat_stream(job, request, head, bool(opts.get("include_usage"))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        reply, done = Reply(), None
        async for item in self.events(job, request, watch=True):
            if isinstance(item, Done):
                done = item
            else:
                for ev in item:
                    reply.feed(ev)
        if done is None:  # the client left
            return Response(status_code=499)
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": reply.chat_message(), "finish_reason": finish_reason(reply, done),
             "logprobs": None}], "usage": usage_chat(done), "timings": timings(done)})

    async def chat_stream(self, job: Job, request: Request, head: dict, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            c = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return sse({**c, "usage": None} if include_usage else c)

        reply = Reply()
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for item in self.events(job, request, watch=False):
                if isinstance(item, Done):
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {}, "finish_reason": finish_reason(reply, item), "logprobs": None}],
                        "timings": timings(item), **({"usage": None} if include_usage else {})})
                    if include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage_chat(item)})
                    break
                for ev in item:
                    for what, it, delta in reply.feed(ev):
                        if it.kind == "call":
                            k = sum(1 for i in reply.items if i.kind == "call") - 1
                            if what == "start":
                                yield chunk({"tool_calls": [tool_call(it, k, "")]})
                            elif what == "delta":
                                yield chunk({"tool_calls": [{"index": k, "function": {"arguments": delta}}]})
                        elif what == "delta":
                            yield chunk({"reasoning_content" if it.kind == "reasoning" else "content": delta})
        except Exception as e:  # noqa: BLE001 - the stream has started: report the error in it
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        yield sse("[DONE]")

    # ---- responses ----
    async def responses(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body)
        self.check_model(body)
        refuse(body, "background", (None, False))
        refuse(body, "text", (None, {"format": {"type": "text"}}))
        prev_id = body.get("previous_response_id")
        prev = None
        if prev_id is not None:
            prev = self.stored.get(prev_id)
            if prev is None:
                raise RequestError(f"Previous response with id {prev_id!r} not found.", "previous_response_id",
                                   "previous_response_not_found")
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        effort = effort_of(reasoning.get("effort"), "reasoning.effort")
        choice = tool_choice(body.get("tool_choice"), parse_tools(body.get("tools"), flat=True))
        messages = from_responses(body.get("input"), body.get("instructions"),
                                  None if choice == "none" else body.get("tools"),
                                  prev.messages if prev else None, prev.calls if prev else None)
        sampling = sampling_of(body, self.session.sampling, ("max_output_tokens",))
        forced = self.forced(choice)
        prompt = await self.prompt_of(messages, effort, "input", forced)
        job = self.engine.submit(prompt, sampling, forced)
        resp = {"id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "model": self.settings.model_id, "output": [], "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "previous_response_id": prev_id, "parallel_tool_calls": False,
                "reasoning": {"effort": effort or self.session.reasoning, "summary": None},
                "temperature": sampling.temperature, "top_p": sampling.top_p,
                "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": None, "metadata":
                body.get("metadata") or {}, "store": body.get("store", True)}
        history = messages[1:] if messages and messages[0].role == "developer" else messages
        if body.get("stream"):
            return StreamingResponse(self.responses_stream(job, request, resp, history, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        reply, done = Reply(), None
        async for item in self.events(job, request, watch=True):
            if isinstance(item, Done):
                done = item
            else:
                for ev in item:
                    reply.feed(ev)
        if done is None:
            return Response(status_code=499)
        return JSONResponse(self.finish_response(resp, reply, done, history, body))

    def finish_response(self, resp: dict, reply: Reply, done: Done, history: list[Message], body: dict) -> dict:
        incomplete = done.stats.stop in ("max_tokens", "context")
        resp.update(status="incomplete" if incomplete else "completed",
                    incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                    output=reply.output_items("incomplete" if incomplete else "completed"),
                    usage=usage_responses(done), timings=timings(done), completed_at=int(time.time()))
        if body.get("store", True):
            self.stored[resp["id"]] = Stored(history + done.messages, reply.calls, resp)
            while len(self.stored) > STORED_RESPONSES:
                self.stored.popitem(last=False)
        return resp

    async def responses_stream(self, job: Job, request: Request, resp: dict, history: list[Message],
                               body: dict) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            return sse({"type": kind, "sequence_number": seq - 1, **fields}, kind)

        def part(it: Item, text: str) -> dict:
            if it.kind == "reasoning":
                return {"type": "reasoning_text", "text": text}
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        reply = Reply()
        yield event("response.created", response=resp)
        yield event("response.in_progress", response=resp)
        try:
            async for item in self.events(job, request, watch=False):
                if isinstance(item, Done):
                    final = self.finish_response(resp, reply, item, history, body)
                    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
                    yield event(kind, response=final)
                    break
                for ev in item:
                    for what, it, delta in reply.feed(ev):
                        idx, ids = len(reply.items) - 1, {"item_id": it.id, "output_index": len(reply.items) - 1}
                        if what == "start":
                            yield event("response.output_item.added", output_index=idx,
                                        item=output_item(it, "in_progress"))
                            if it.kind != "call":
                                yield event("response.content_part.added", **ids, content_index=0, part=part(it, ""))
                        elif what == "delta":
                            if it.kind == "call":
                                yield event("response.function_call_arguments.delta", **ids, delta=delta)
                            elif it.kind == "reasoning":
                                yield event("response.reasoning_text.delta", **ids, content_index=0, delta=delta)
                            else:
                                yield event("response.output_text.delta", **ids, content_index=0, delta=delta,
                                            logprobs=[])
                        else:
                            if it.kind == "call":
                                yield event("response.function_call_arguments.done", **ids, arguments=it.text)
                            else:
                                kind = "reasoning_text" if it.kind == "reasoning" else "output_text"
                                extra = {} if it.kind == "reasoning" else {"logprobs": []}
                                yield event(f"response.{kind}.done", **ids, content_index=0, text=it.text, **extra)
                                yield event("response.content_part.done", **ids, content_index=0,
                                            part=part(it, it.text))
                            yield event("response.output_item.done", output_index=idx, item=output_item(it))
        except Exception as e:  # noqa: BLE001 - the stream has started: report the error in it
            resp.update(status="failed", error={"code": "server_error", "message": str(e)})
            yield event("response.failed", response=resp)

    async def get_response(self, request: Request) -> Response:
        stored = self.stored.get(request.path_params["id"])
        if stored is None:
            raise RequestError(f"Response with id {request.path_params['id']!r} not found.", "id",
                               "response_not_found", status=404)
        return JSONResponse(stored.body)


# ---- errors, authentication, the app ------------------------------------------------------------------------------
def error_response(status: int, message: str, type: str, code: str | None = None, param: str | None = None
                   ) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


async def on_request_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, RequestError)
    return JSONResponse(e.body(), e.status)


async def on_http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error",
                          kind)


async def on_edgec_error(request: Request, e: Exception) -> Response:
    return error_response(400, str(e), "invalid_request_error", "invalid_value")


async def on_disconnect(request: Request, e: Exception) -> Response:
    return Response(status_code=499)


async def on_server_error(request: Request, e: Exception) -> Response:
    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


class ApiKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY` when the server has a key (the page itself is open)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {self.key}":
                given = "no API key" if not auth else "an incorrect API key"
                resp = error_response(401, f"You provided {given}; pass the server's key as 'Authorization: Bearer "
                                      "KEY'.", "invalid_request_error", "invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, settings: Settings) -> Starlette:
    s = Server(engine, settings)
    routes = [
        Route("/", s.index),
        Route("/health", s.health),
        Route("/v1/models", s.models),
        Route("/v1/models/{model:path}", s.model),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/responses", s.responses, methods=["POST"]),
        Route("/v1/responses/{id}", s.get_response),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, exception_handlers={
        RequestError: on_request_error, EdgecError: on_edgec_error, HTTPException: on_http_error,
        ClientDisconnect: on_disconnect, Exception: on_server_error})
    app.add_middleware(ApiKey, key=settings.api_key)
    app.state.server = s
    return app
