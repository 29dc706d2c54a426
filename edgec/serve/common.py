"""What the API routes share: settings, reading and checking a request body, sampling, SSE framing, timings."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ..harmony.openai import RequestError
from ..runtime.constrain import Constraint
from ..runtime.generate import Sampling
from .engine import Done


@dataclass
class Settings:
    model_id: str  # the id /v1/models lists first and replies carry
    api_key: str | None = None
    max_body: int = 4 << 20
    created: int = field(default_factory=lambda: int(time.time()))
    aliases: tuple[str, ...] = ()  # other names a request's `model` may use
    think_tokens: int | None = None  # the analysis budget of a constrained request (serve --think-tokens)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys((self.model_id, *self.aliases)))


def served_names(folder: Path, config, given: tuple[str, ...] = ()) -> list[str]:
    """The names a server of `folder` answers to, the id it reports first: `--served-model-name` values as given,
    then the published model the config has the shape of (`gpt-oss-20b`, and Ollama's `gpt-oss:20b`), the source
    checkpoint's own name (the manifest's, for an output), and the folder's name."""
    from ..hub import model_name
    from ..manifest import NAME
    from ..spec import family

    names = list(given)
    if fam := family(config):
        names += [fam, fam.replace("gpt-oss-", "gpt-oss:")]
    source = None
    if (folder / NAME).is_file():
        from ..manifest import read

        source = read(folder).source.get("name")
    names += [source if isinstance(source, str) and source else model_name(folder), folder.resolve().name]
    return list(dict.fromkeys(n for n in names if n))


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
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)) or (
            not math.isfinite(v)):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a finite number'}", key, "invalid_type")
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


def describe(value: Any) -> str:
    """What a request value is, in a few words, never the value itself cut off mid-object: `true`, `3`, an object
    of type 'json_schema', an object, a list of 2 items, a string."""
    if isinstance(value, dict):
        kind = value.get("type")
        return f"an object of type {kind!r}" if isinstance(kind, str) and len(kind) <= 40 else "an object"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else "a string"
    return json.dumps(value)


def refuse(body: dict, key: str, allowed: tuple = (None,)) -> None:
    """A parameter this server does not implement must not be silently ignored."""
    if body.get(key) not in allowed:
        raise RequestError(f"{key}: {describe(body.get(key))} is not supported by this server", key,
                           "unsupported_value")


def flag(body: dict, key: str) -> bool:
    """A boolean parameter (absent = false); "false" is not false."""
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise RequestError(f"{key} must be a boolean", key, "invalid_type")
    return bool(v)


def refuse_unsupported(body: dict) -> None:
    """The sampling parameters both APIs share that this server does not implement (their neutral values pass)."""
    for key in ("frequency_penalty", "presence_penalty"):
        refuse(body, key, (None, 0))
    refuse(body, "logit_bias", (None, {}))


# ---- structured outputs --------------------------------------------------------------------------------------------
def output_format(fmt: Any, param: str, nested: bool) -> dict | None:
    """Constraint.final of Chat's `response_format` (nested: `{"type": "json_schema", "json_schema": {name, schema,
    strict}}`) or Responses' `text.format` (`{"type": "json_schema", name, schema, strict}`); None for text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise RequestError(f"{param}.type must be 'text', 'json_object' or 'json_schema' (got {describe(kind)})",
                           f"{param}.type", "invalid_value")
    spec = fmt.get("json_schema") if nested else fmt
    where = f"{param}.json_schema" if nested else param
    if not isinstance(spec, dict):
        raise RequestError(f"{where} must be an object", where, "missing_required_parameter")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.name must be a non-empty string", f"{where}.name", "missing_required_parameter")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise RequestError(f"{where}.schema must be a JSON schema object", f"{where}.schema", "invalid_type")
    return {"json_schema": schema}


def constraint_of(final: dict | None, param: str, tools: Any, flat: bool, choice: str | None,
                  think_tokens: int | None) -> Constraint | None:
    """The request's Constraint, or None when nothing is constrained (no format, no strict tool). Once anything is
    constrained, every tool is a branch of the reply's grammar: a strict one's arguments match its `parameters`,
    another's are any JSON object; tool_choice picks the branches (instead of forcing the reply's first tokens)."""
    fns = [t if flat else t.get("function") or {} for t in tools or []]  # parse_tools has checked their shape
    if final is None and not any(f.get("strict") is True for f in fns):
        return None
    schemas = {} if choice == "none" else {
        f["name"]: (f.get("parameters") or {"type": "object"}) if f.get("strict") is True else {"type": "object"}
        for f in fns}
    pick = {None: "auto", "none": "none", "required": "required"}.get(choice, {"name": choice})
    return Constraint(final=final, tools=schemas, tool_choice=pick, think_tokens=think_tokens, param=param)


def tool_param(param: str, tools: Any, flat: bool) -> str:
    """A ConstraintError's `tools.NAME.parameters...` as the request's field: `tools[i].function.parameters...`."""
    for i, t in enumerate(tools or []):
        name = (t if flat else t.get("function") or {}).get("name")
        head = f"tools.{name}.parameters"
        if param == head or param.startswith(head + "/"):
            return f"tools[{i}]{'' if flat else '.function'}.parameters{param[len(head):]}"
    return param


def timings(done: Done) -> dict:
    """edgec's own figures (beside `usage`), for the web page and the benchmark."""
    st = done.stats
    return {"prompt": st.prompt, "reused": st.reused, "prefill": st.prefill, "prefill_s": round(st.prefill_s, 4),
            "ttft_s": round(st.ttft_s, 4), "decode": st.decode, "decode_s": round(st.decode_s, 4),
            "tok_s": round(st.tok_s, 2), "stop": st.stop}


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return head + "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"
