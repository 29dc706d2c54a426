"""`edgec web OUT`'s static server: the chat page (edgec/web/page), model.js, onnxruntime-web and OUT's files, on
127.0.0.1. No model compute here: the page runs everything in the browser.

Only regular files under the four roots are served (no directory listing, no dot-files, nothing outside a root),
with their MIME types, single Range requests (206) and bodies streamed in 1 MiB pieces (model.onnx.data can be GBs).
"""

from __future__ import annotations

import http.server
import mimetypes
import re
from pathlib import Path

from ..errors import EdgecError
from ..jsonio import read_json
from . import browser

PAGE = Path(__file__).resolve().parent / "page"
CHUNK = 1 << 20
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
         ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream",
         ".data": "application/octet-stream", ".jinja": "text/plain; charset=utf-8"}


def check_output(out: Path) -> dict:
    """OUT's manifest when it is an onnx-webgpu output whose page can run (exit 2 / exit 3 with one line if not)."""
    manifest = out / "edgec.json"
    if not manifest.is_file():
        raise EdgecError(f"{out}: not an edgec output (no edgec.json); make one with "
                         f"`edgec convert SRC --target onnx-webgpu --dense fp32 -o {out}`")
    m = read_json(manifest)
    if m.get("target") != "onnx-webgpu":
        raise EdgecError(f"{manifest}: target is {m.get('target')!r}, the page runs onnx-webgpu outputs: "
                         f"`edgec convert SRC --target onnx-webgpu -o OUT` (add --dense fp32 for adapters without "
                         f"shader-f16)")
    for name in ("model.edgec.onnx", "tokenizer.json"):
        if not (out / name).is_file():
            raise EdgecError(f"{out / name}: missing; convert again with a current edgec")
    browser.require_js()
    return m


def routes(out: Path) -> dict[str, Path]:
    return {"/": PAGE, "/static/": browser.STATIC, "/ort/": browser.require_js(), "/model/": out}


class Handler(http.server.BaseHTTPRequestHandler):
    roots: dict[str, Path] = {}
    protocol_version = "HTTP/1.1"

    def _file(self) -> Path | None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if "%" in path or "\\" in path:  # no encoded or backslash paths: nothing to decode, nothing to escape
            return None
        if path == "/":
            path = "/index.html"
        for prefix, root in sorted(self.roots.items(), key=lambda kv: -len(kv[0])):
            if path.startswith(prefix):
                parts = [p for p in path[len(prefix):].split("/") if p]
                if not parts or any(p.startswith(".") for p in parts):
                    return None
                target = root.joinpath(*parts).resolve()
                inside = root in target.parents
                return target if inside and target.is_file() else None
        return None

    def do_HEAD(self) -> None:
        self.do_GET(body=False)

    def do_GET(self, body: bool = True) -> None:
        f = self._file()
        if f is None:
            return self._status(404, "not found")
        size = f.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or m.group(1) == m.group(2) == "":
                return self._status(416, "bad range", size)
            if m.group(1) == "":
                start = max(0, size - int(m.group(2)))
            else:
                start = int(m.group(1))
                end = min(end, int(m.group(2))) if m.group(2) else end
            if start > end or start >= size:
                return self._status(416, "range not satisfiable", size)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", TYPES.get(f.suffix) or mimetypes.guess_type(f.name)[0]
                         or "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with f.open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                piece = fh.read(min(CHUNK, left))
                if not piece:
                    break
                self.wfile.write(piece)
                left -= len(piece)

    def _status(self, code: int, text: str, size: int | None = None) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def end_headers(self) -> None:
        # cross-origin isolation lets onnxruntime-web use SharedArrayBuffer (threads); the page is never cached
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


def make_server(out: Path, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """The server for OUT (not started); `server.server_address` has the port it got."""
    handler = type("Handler", (Handler,), {"roots": {p: f.resolve() for p, f in routes(out.resolve()).items()}})
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise EdgecError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    return server

