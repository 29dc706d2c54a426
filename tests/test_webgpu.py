"""Browser room (issue 21): headless Chromium's WebGPU adapter through edgec/web/browser.py.

Chromium + chromedriver are installed by .ci/run (apt), onnxruntime-web by `make setup` (npm ci --prefix edgec/web).
"""

import pytest

from edgec.errors import MissingBackend
from edgec.web import browser


def test_missing_js_is_a_one_line_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "ORT_DIST", tmp_path / "absent")
    with pytest.raises(MissingBackend) as e:
        browser.require_js()
    assert e.value.exit_code == 3 and "npm ci --prefix edgec/web" in str(e.value) and "\n" not in str(e.value)


def test_adapter_and_served_files(tmp_path):
    (tmp_path / "blank.html").write_text("<!doctype html><title>edgec</title>")
    dist = browser.require_js()
    with browser.serve({"/": tmp_path, "/ort/": dist}) as base, browser.chrome(script_timeout_s=30) as driver:
        driver.get(base + "/blank.html")
        got = browser.adapter(driver)
        # onnxruntime-web's module is served with a JavaScript type from the local node_modules
        typ = driver.execute_async_script(
            "const d = arguments[1]; fetch(arguments[0]).then(r => d([r.status, r.headers.get('content-type')]))",
            "/ort/ort.webgpu.min.mjs")
        outside = driver.execute_async_script(
            "const d = arguments[0]; fetch('/%2e%2e/%2e%2e/etc/passwd').then(r => d(r.status))")
    assert typ == [200, "text/javascript"]
    assert outside == 404
    # WebGPU's spec floor for every adapter: 128 MiB binding, 256 MiB buffer
    assert got["limits"]["maxStorageBufferBindingSize"] >= 128 << 20
    assert got["limits"]["maxBufferSize"] >= 256 << 20
    assert isinstance(got["features"], list)
