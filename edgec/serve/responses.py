"""POST /v1/responses (plain and streamed: reasoning items, function calls, previous_response_id) and GET by id."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..harmony.conversation import Message
from ..harmony.openai import (
    Item,
    Reply,
    RequestError,
    effort_of,
    from_responses,
    new_id,
    output_item,
    parse_tools,
    tool_choice,
)
from .common import constraint_of, flag, output_format, read_body, refuse, refuse_unsupported, sse, timings
from .engine import Done, Job

STORED_RESPONSES = 256  # responses kept for previous_response_id, oldest dropped first


@dataclass
class Stored:
    """A finished response: the Harmony messages after the developer message (input + output), its tool calls."""

    messages: list[Message]
    calls: dict[str, str]
    body: dict


def usage_responses(done: Done) -> dict:
    st = done.stats
    return {"input_tokens": st.prompt, "input_tokens_details": {"cached_tokens": st.reused, "cache_write_tokens": 0},
            "output_tokens": st.decode, "output_tokens_details": {"reasoning_tokens": done.reasoning_tokens},
            "total_tokens": st.prompt + st.decode}


class Responses:
    """The responses routes of `Server`."""

    async def responses(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body)
        self.check_model(body)
        refuse(body, "background", (None, False))
        refuse_unsupported(body)
        stream = flag(body, "stream")
        text = body.get("text")
        if text is not None and not isinstance(text, dict):
            raise RequestError("text must be an object", "text", "invalid_type")
        fmt = (text or {}).get("format")
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
        sampling = self.sampling(body, effort, ("max_output_tokens",))
        final = output_format(fmt, "text.format", nested=False)
        constraint = constraint_of(final, "text.format.schema", body.get("tools"), True, choice,
                                   self.settings.think_tokens)
        guard = await self.guard_of(constraint, body.get("tools"), True)
        forced = self.forced(choice) if guard is None else []  # a guard holds tool_choice itself
        prompt = await self.prompt_of(messages, effort, "input", forced)
        job = self.engine.submit(prompt, sampling, forced, guard=guard)
        resp = {"id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "model": self.settings.model_id, "output": [], "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "previous_response_id": prev_id, "parallel_tool_calls": False,
                "reasoning": {"effort": effort or self.session.reasoning, "summary": None},
                "temperature": sampling.temperature, "top_p": sampling.top_p,
                "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
                "text": {"format": {"type": "text"} if final is None else fmt}, "truncation": "disabled",
                "usage": None, "metadata": body.get("metadata") or {}, "store": body.get("store", True)}
        history = messages[1:] if messages and messages[0].role == "developer" else messages
        if stream:
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
        except Exception as e:
            resp.update(status="failed", error={"code": "server_error", "message": str(e)})
            yield event("response.failed", response=resp)

    async def get_response(self, request: Request) -> Response:
        """GET returns a stored response, DELETE forgets it (a later previous_response_id naming it is a 400)."""
        rid = request.path_params["id"]
        stored = self.stored.get(rid)
        if stored is None:
            raise RequestError(f"Response with id {rid!r} not found.", "id", "response_not_found", status=404)
        if request.method == "DELETE":
            del self.stored[rid]
            return JSONResponse({"id": rid, "object": "response", "deleted": True})
        return JSONResponse(stored.body)
