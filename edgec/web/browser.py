"""Headless Chromium on WebGPU (SwiftShader here, the real adapter where one exists), driven by selenium.

`serve(routes)` serves folders on 127.0.0.1 (routes: URL prefix -> folder; nothing else is reachable);
`chrome()` starts Debian's chromium through /usr/bin/chromedriver with the WebGPU flags; `adapter(driver)` reports
the adapter's info, features and limits. Nothing is fetched from anywhere: onnxruntime-web comes from
edgec/web/node_modules (`make setup`). A missing part is one line, exit 3 (errors.MissingBackend).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

from edgec.errors import MissingBackend

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
ORT_DIST = HERE / "node_modules" / "onnxruntime-web" / "dist"
SETUP_HINT = "run `make setup` (npm ci --prefix edgec/web)"

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--enable-features=Vulkan",
    "--use-vulkan=swiftshader",
    "--use-webgpu-adapter=swiftshader",
    "--disable-vulkan-surface",
)
SOFTWARE = ("--use-vulkan=swiftshader", "--use-webgpu-adapter=swiftshader")  # EDGEC_WEBGPU_ADAPTER=gpu: without


def require_js() -> Path:
    """The onnxruntime-web dist folder, or one line naming the set-up command (exit 3)."""
    if not (ORT_DIST / "ort.webgpu.min.mjs").is_file():
        raise MissingBackend(f"onnxruntime-web is not installed in {HERE / 'node_modules'}: {SETUP_HINT}")
    return ORT_DIST


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    raise MissingBackend(f"{names[0]} is not installed: apt-get install chromium chromium-driver")


class _Handler(http.server.SimpleHTTPRequestHandler):
    routes: dict[str, Path] = {}

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        for prefix, folder in sorted(self.routes.items(), key=lambda kv: -len(kv[0])):
            if path.startswith(prefix):
                rel = Path(path[len(prefix):].lstrip("/"))
                target = (folder / rel).resolve()
                if target == folder or folder in target.parents:
                    return str(target)
        return str(Path("/nonexistent"))

    def end_headers(self) -> None:
        # cross-origin isolation lets onnxruntime-web use SharedArrayBuffer (threads); nothing is cached
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


_Handler.extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                           ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}


@contextlib.contextmanager
def serve(routes: dict[str, Path], port: int = 0):
    """Serve `routes` (URL prefix -> folder) on 127.0.0.1; yields the base URL ("http://127.0.0.1:PORT")."""
    handler = type("Handler", (_Handler,), {"routes": {p: Path(f).resolve() for p, f in routes.items()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def chrome(script_timeout_s: float = 600):
    """Headless Chromium with WebGPU; yields the selenium driver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise MissingBackend("selenium is not installed: pip install 'edgec[web]'") from None
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "/usr/bin/chromium", "google-chrome", "chrome")
    gpu = os.environ.get("EDGEC_WEBGPU_ADAPTER") == "gpu"  # the machine's own GPU (bench/gpu_check.py)
    for flag in FLAGS:
        if not (gpu and flag in SOFTWARE):
            options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(_binary("chromedriver", "/usr/bin/chromedriver")))
    driver.set_script_timeout(script_timeout_s)
    try:
        yield driver
    finally:
        driver.quit()


ADAPTER_JS = """
const done = arguments[arguments.length - 1];
(async () => {
  if (!navigator.gpu) return {error: 'navigator.gpu is absent (WebGPU disabled)'};
  const a = await navigator.gpu.requestAdapter();
  if (!a) return {error: 'no WebGPU adapter'};
  const info = a.info || {};
  const limits = {};
  for (const k in a.limits) limits[k] = a.limits[k];
  return {vendor: info.vendor, architecture: info.architecture, description: info.description,
          features: [...a.features].sort(), limits};
})().then(done, e => done({error: String(e)}));
"""


def adapter(driver) -> dict:
    """The WebGPU adapter's info, features and limits, as the page (served over http://127.0.0.1) sees them."""
    got = driver.execute_async_script(ADAPTER_JS)
    if "error" in got:
        raise MissingBackend(f"WebGPU is not available in chromium: {got['error']}")
    return got
