"""POST /v1/chat/completions, plain and streamed: content, reasoning_content and tool_calls apart, stop strings."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..harmony.openai import Reply, RequestError, effort_of, from_chat, new_id, parse_tools, tool_call, tool_choice
from .common import constraint_of, flag, output_format, read_body, refuse, refuse_unsupported, sse, timings
from .engine import Done, Job, StopText


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None
    if stop is not None and (stops is None or len(stops) > 4 or not all(isinstance(x, str) for x in stops)):
        raise RequestError("stop must be a string or a list of at most 4 strings", "stop", "invalid_value")
    return [x for x in stops or [] if x]


def usage_chat(done: Done) -> dict:
    st = done.stats
    return {"prompt_tokens": st.prompt, "completion_tokens": st.decode, "total_tokens": st.prompt + st.decode,
            "prompt_tokens_details": {"cached_tokens": st.reused},
            "completion_tokens_details": {"reasoning_tokens": done.reasoning_tokens}}


def finish_reason(reply: Reply, done: Done, cut: bool) -> str:
    if cut:  # a stop string ended the content (the worker stopped there too: stats.stop "stop_string")
        return "stop"
    if done.stats.stop in ("max_tokens", "context"):
        return "length"
    return "tool_calls" if any(i.kind == "call" for i in reply.items) else "stop"


class ChatCompletions:
    """The chat completions route of `Server`."""

    async def chat_completions(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body)
        self.check_model(body)
        refuse(body, "n", (None, 1))
        refuse(body, "logprobs", (None, False))
        refuse_unsupported(body)
        stream = flag(body, "stream")
        if body.get("stream_options") is not None and not stream:
            raise RequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                               "stream_options", "invalid_value")
        effort = effort_of(body.get("reasoning_effort"), "reasoning_effort") or effort_of(
            (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None,
            "reasoning.effort")
        choice = tool_choice(body.get("tool_choice"), parse_tools(body.get("tools")))
        messages = from_chat(body.get("messages"), None if choice == "none" else body.get("tools"))
        sampling = self.sampling(body, effort, ("max_completion_tokens", "max_tokens"))
        final = output_format(body.get("response_format"), "response_format", nested=True)
        constraint = constraint_of(final, "response_format.json_schema.schema", body.get("tools"), False, choice,
                                   self.settings.think_tokens)
        guard = await self.guard_of(constraint, body.get("tools"), False)
        forced = self.forced(choice) if guard is None else []  # a guard holds tool_choice itself
        prompt = await self.prompt_of(messages, effort, "messages", forced)
        opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        stops = stop_strings(body)
        job = self.engine.submit(prompt, sampling, forced, stops, guard)
        head = {"id": new_id("chatcmpl").replace("_", "-", 1), "created": int(time.time()),
                "model": self.settings.model_id, "system_fingerprint": f"edgec-{self.session.backend.name}"}
        if stream:
            return StreamingResponse(self.chat_stream(job, request, head, bool(opts.get("include_usage")), stops),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        reply, done, cut, content = Reply(), None, StopText(stops), ""
        async for item in self.events(job, request, watch=True):
            if isinstance(item, Done):
                done = item
                continue
            for ev in item:
                for what, it, delta in reply.feed(ev):
                    if it.kind == "text":
                        content += cut.feed(delta) + (cut.flush() if what == "done" else "")
        if done is None:  # the client left
            return Response(status_code=499)
        message = {**reply.chat_message(), "content": (content + cut.flush()) or None}
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(reply, done, cut.hit), "logprobs": None}],
            "usage": usage_chat(done), "timings": timings(done)})

    async def chat_stream(self, job: Job, request: Request, head: dict, include_usage: bool, stops: list[str]
                          ) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            c = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return sse({**c, "usage": None} if include_usage else c)

        reply, cut = Reply(), StopText(stops)
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for item in self.events(job, request, watch=False):
                if isinstance(item, Done):
                    if rest := cut.flush():
                        yield chunk({"content": rest})
                    finish = finish_reason(reply, item, cut.hit)
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}],
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
                        elif it.kind == "reasoning":
                            if delta:
                                yield chunk({"reasoning_content": delta})
                        elif text := cut.feed(delta) + (cut.flush() if what == "done" else ""):
                            yield chunk({"content": text})
        except Exception as e:
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        yield sse("[DONE]")
