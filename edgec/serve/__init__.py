"""`edgec serve`: a local OpenAI-compatible server (chat completions, responses, models) and a web chat page.

`engine.py` holds the one loaded model and its worker thread; `app.py` (with `chat.py`, `responses.py`, `common.py`)
the HTTP API on Starlette; `static/` the page.
The OpenAI <-> Harmony mapping itself is `edgec.harmony.openai`, shared with `edgec generate` and chat.
"""
