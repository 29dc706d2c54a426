"""`edgec web OUT`: serve the in-browser chat page for an onnx-webgpu output (edgec/web/server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True, help="0 picks a free port")
@click.option("--open", "open_browser", is_flag=True, help="open the page in the default browser")
def web(out: Path, host: str, port: int, open_browser: bool) -> None:
    """Serve a chat page that runs OUT (an onnx-webgpu output) in the browser on WebGPU: tokenizer, Harmony, KV
    cache and sampling all run in the page; this process only serves files. Ctrl-C stops it."""
    from ..progress import stderr
    from .server import check_output, make_server

    manifest = check_output(out)
    server = make_server(out, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    io = manifest.get("recipe", {}).get("io_dtype", "fp16")
    stderr.print(f"serving {out} ({io} activations) at [bold]{url}[/] (Ctrl-C stops)", highlight=False)
    click.echo(url)
    sys.stdout.flush()
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()


COMMANDS = [web]
