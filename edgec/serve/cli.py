"""`edgec serve MODEL`: the OpenAI-compatible server and the web chat page, on 127.0.0.1:8000 by default."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from ..errors import require
from ..progress import stderr
from ..runtime.cli import model_argument, sampling_options


@click.command()
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0 exposes it)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EDGEC_API_KEY", help="require `Authorization: Bearer KEY` on /v1 (or EDGEC_API_KEY)")
@click.option("--served-model-name", "--model-id", "served_names", multiple=True, metavar="NAME",
              help="a name clients send as `model` (repeatable; the first is the id replies carry). Also served: "
                   "gpt-oss-20b / gpt-oss:20b for that shape, the source checkpoint's name, the folder's name")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="requests waiting at most; more are answered 429")
@click.option("--max-body", type=click.IntRange(1024), default=4 << 20, show_default=True,
              help="largest request body in bytes (413 above)")
@click.option("--think-tokens", type=click.IntRange(0), default=None,
              help="with response_format / text.format / strict tools: end the analysis after this many tokens")
@sampling_options(conversation=False)
def serve(model: str, target: str | None, host: str, port: int, api_key: str | None, served_names: tuple[str, ...],
          max_queue: int, max_body: int, think_tokens: int | None, **kw) -> None:
    """Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/responses, /v1/models) with a chat page at /.

    One model is loaded; requests queue and generate one at a time, each reusing the KV cache of the longest prefix
    it shares with the one before (usage.prompt_tokens_details.cached_tokens). The sampling options are the defaults
    a request can override; --reasoning is the default effort, --identity the model identity."""
    require("uvicorn", "serve")
    require("starlette", "serve")
    import uvicorn

    from ..hub import is_hub_id
    from ..runtime.cli import open_session, resolve
    from . import common
    from .app import Settings, create_app
    from .engine import Engine

    folder = resolve(model, target)  # a folder or a Hugging Face id, as chat and generate take it
    if is_hub_id(model) and not Path(model).expanduser().exists():
        served_names += (model,)  # clients may send the id they started it with
    if kw.get("hosts") is not None:  # pipeline-parallel: only rank 0 gets past this line
        from ..runtime.pipeline import serve_ranks

        serve_ranks(kw["hosts"], kw["dist_backend"], lambda: open_session(folder, **kw))
    engine = Engine(lambda: open_session(folder, **kw), max_queue=max_queue)
    engine.start()
    s = engine.session
    primary, *aliases = common.served_names(folder, s.backend.config, served_names)
    settings = Settings(primary, api_key, max_body, aliases=tuple(aliases), think_tokens=think_tokens)
    app = create_app(engine, settings)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    also = f" (also {', '.join(map(repr, aliases))})" if aliases else ""
    stderr.print(f"edgec serve: {where}  model {settings.model_id!r}{also} ({s.backend.name}, context {s.max_context})"
                 f"{'  API key required' if api_key else ''}", highlight=False)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C / SIGTERM: end the jobs so open streams close now
            engine.shutdown(timeout=0)
            # SIGTERM (systemd, launchd, docker stop) takes Ctrl-C's path: uvicorn stops accepting, the streams
            # close with their final chunk and [DONE], and the signal it raises again once done is SIGINT, so edgec
            # exits 130 as after Ctrl-C (re-raised, SIGTERM would kill the process: 143)
            super().handle_exit(signal.SIGINT if sig == signal.SIGTERM else sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                              access_log=False)).run()
    finally:
        engine.shutdown()


COMMANDS = [serve]
