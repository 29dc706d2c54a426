"""The browser room: onnxruntime-web (npm, edgec/web/node_modules) runs an onnx-webgpu output in Chromium's WebGPU.

browser.py starts headless Chromium and serves files on 127.0.0.1; static/ holds the JavaScript (model.js is the one
in-browser model runner). Nothing here is imported by `edgec --help`; the JS parts come from `make setup`
(`npm ci --prefix edgec/web`).
"""
