"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/chat/completions, /v1/responses, and the web page.

Every request is mapped to Harmony by `edgec.harmony.openai`, rendered, checked against the context, and queued on
the `Engine`; the reply streams back as Server-Sent Events or comes back whole. Errors have OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) and status. This module holds what the routes share and the small
routes; `chat.py` and `responses.py` hold the two generation routes, `common.py` the request helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import hmac
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import EdgecError
from ..harmony.conversation import Message
from ..harmony.openai import RequestError, conversation, forced_start
from ..harmony.render import render_conversation
from ..runtime.constrain import Constraint, ConstraintError, Guard
from ..runtime.generate import Sampling
from ..runtime.session import default_max_tokens
from .chat import ChatCompletions
from .common import Settings, sampling_of, tool_param
from .engine import Done, Engine, Job
from .responses import Responses, Stored

STATIC = Path(__file__).parent / "static"


# ---- the application ----------------------------------------------------------------------------------------------
class Server(ChatCompletions, Responses):
    """The routes over one Engine; the chat completions and responses routes come from their modules."""

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
        self.known(model)

    def known(self, model: object) -> None:
        if model not in self.settings.names:
            served = ", ".join(repr(n) for n in self.settings.names)
            raise RequestError(f"The model {model!r} does not exist; this server serves {served}", "model",
                               "model_not_found", status=404)

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

    def sampling(self, body: dict, effort: str | None, max_keys: tuple[str, ...]) -> Sampling:
        """The request's sampling over the server's defaults; without a max_tokens of its own (and none given to
        the server) a request's reasoning effort sets its budget, as chat's /effort does."""
        s = self.session
        default = s.sampling
        if effort and getattr(s, "auto_max_tokens", False):
            default = dataclasses.replace(default, max_tokens=default_max_tokens(effort, s.max_context))
        return sampling_of(body, default, max_keys)

    def forced(self, choice: str | None) -> list[int]:
        text = forced_start(choice)
        return self.session.tokenizer.encode(text, allowed_special="all") if text else []

    async def guard_of(self, constraint: Constraint | None, tools: object, flat: bool) -> Guard | None:
        """Compile the request's constraint before it is queued: one the engine cannot compile is a 400 naming the
        field (and the JSON pointer of the keyword), never a failure mid-generation."""
        if constraint is None:
            return None
        try:
            return await run_in_threadpool(constraint.compile, self.session.tokenizer)
        except ConstraintError as e:
            raise RequestError(e.message, tool_param(e.param, tools, flat), "invalid_value") from None

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
                    if item.error is not None:  # the worker logged it; the client gets a 500 in OpenAI's shape
                        e = item.error
                        raise RequestError(f"generation failed: {type(e).__name__}: {e}", code="server_error",
                                           status=500, type="server_error")
                    return
        finally:
            self.engine.cancel(job)  # a no-op once the job is done

    # ---- routes ----
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "ok", "waiting": e.waiting, "busy": e.busy,
                             "cached_tokens": len(self.session.gen.tokens)})

    def model_card(self, name: str) -> dict:
        s = self.session
        return {"id": name, "object": "model", "created": self.settings.created, "owned_by": "edgec",
                "root": self.settings.model_id, "backend": s.backend.name, "context_length": s.max_context}

    async def models(self, request: Request) -> Response:  # every served name, as vLLM lists them; the id first
        return JSONResponse({"object": "list", "data": [self.model_card(n) for n in self.settings.names]})

    async def model(self, request: Request) -> Response:
        self.known(request.path_params["model"])
        return JSONResponse(self.model_card(request.path_params["model"]))


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
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.key}".encode()):
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
        Route("/v1/responses/{id}", s.get_response, methods=["GET", "DELETE"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, exception_handlers={
        RequestError: on_request_error, EdgecError: on_edgec_error, HTTPException: on_http_error,
        ClientDisconnect: on_disconnect, Exception: on_server_error})
    app.add_middleware(ApiKey, key=settings.api_key)
    app.state.server = s
    return app
