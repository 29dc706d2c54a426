"""`edgec chat` on a terminal: line editing, history and multi-line input through prompt_toolkit (its pipe input
and dummy output), and the real command in a pseudo-terminal: keys in, Harmony turns out, the line ended at EOF."""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time

import pytest


def test_reader_edits_lines_recalls_history_and_takes_multi_line_input():
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from edgec.runtime.cli import TerminalReader

    keys = [("first\r", "first"),
            ("\x1b[A\r", "first"),  # up arrow: the previous line, not an escape code
            ("abc\x1b[D\x1b[DZ\x1b[F!\r", "aZbc!"),  # left, left, insert, End, append
            ("\x1b[200~pasted\nlines\x1b[201~\r", "pasted\nlines"),  # bracketed paste: one message
            ("one\\\rtwo\r", "one\ntwo"),  # a trailing backslash continues the message
            ("three\x1b\rfour\r", "three\nfour"),  # Esc+Enter (Meta+Enter) inserts a newline
            # history holds whole multi-line messages; up walks the lines of one, then goes to the one before
            ("\x1b[A\r", "three\nfour"),
            ("\x1b[A\x1b[A\x1b[A\r", "one\ntwo"),
            ("\x04", None)]  # Ctrl-D
    with create_pipe_input() as inp:
        read = TerminalReader(input=inp, output=DummyOutput())
        for sent, want in keys:
            inp.send_text(sent)
            assert read("> ") == want, sent


def _clean(raw: bytearray) -> str:
    """The terminal's text without escape sequences, backspaces and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|[\x08\r]", "", raw.decode("utf-8", "replace"))


def _read_until(fd: int, pattern: str, buf: bytearray, timeout: float = 60.0) -> str:
    """Read the pseudo-terminal into `buf` until `pattern` (a regex) matches its text (escape codes removed)."""
    end = time.monotonic() + timeout
    while True:
        text = _clean(buf)
        if re.search(pattern, text):
            return text
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} in {text[-800:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                text = _clean(buf)
                if re.search(pattern, text):
                    return text
                raise AssertionError(f"terminal closed before {pattern!r}: {text[-800:]!r}")
            buf += chunk


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX (Windows runs the pipe tests)")
def test_chat_in_a_terminal(tiny_mlx, tmp_path):
    import pty

    saved = tmp_path / "c.json"
    pid, fd = pty.fork()
    if pid == 0:  # the child: edgec chat on the terminal
        os.environ.update(PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="200", LINES="50")
        os.execv(sys.executable, [sys.executable, "-m", "edgec", "chat", str(tiny_mlx), "--max-tokens", "3",
                                  "--temperature", "0", "--max-context", "1024", "--stats"])
    buf = bytearray()
    try:
        _read_until(fd, r"/exit.*\n>\s*$", buf)  # the banner, then the prompt
        n = 0
        for keys in ("hi\r", "\x1b[A\r", "\x1b[200~one\ntwo\x1b[201~\r", "three\\\rfour\r"):
            os.write(fd, keys.encode())
            n += 1
            _read_until(fd, rf"(prefill=\d+ reused=\d+ decode=3 tok/s=[\d.]+[\s\S]*){{{n}}}\n>\s*$", buf)
        os.write(fd, f"/save {saved}\r".encode())
        _read_until(fd, r"saved [\s\S]*\n>\s*$", buf)
        os.write(fd, b"\x04")  # Ctrl-D
        end = time.monotonic() + 30
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    raw = buf.decode("utf-8", "replace")
    text = _clean(buf)
    assert "Traceback" not in text
    after_last_prompt = raw[raw.rindex(">"):]
    assert "\n" in after_last_prompt  # Ctrl-D ended the prompt's line: the shell's prompt starts on its own
    users = [m["content"][0]["text"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["hi", "hi", "one\ntwo", "three\nfour"]  # arrows and pastes reached the model as text
    stats = [tuple(map(int, m)) for m in re.findall(r"prefill=(\d+) reused=(\d+)", text)]
    assert stats[1][1] >= stats[0][0]  # the recalled "hi" reused the first turn's whole prompt
