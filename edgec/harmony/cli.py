"""`edgec harmony render` / `edgec harmony parse`: look at Harmony prompts and completions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import EdgecError
from ..spec import check_token_ids


def _tokenizer(model: Path | None):
    from .tokenizer import Tokenizer

    return Tokenizer.from_folder(model) if model else Tokenizer.default()


@click.group()
def harmony() -> None:
    """Harmony chat format: render conversations to tokens, parse completions."""


@harmony.command("render")
@click.argument("conversation", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tokens", "as_tokens", is_flag=True, help="print the token ids as a JSON list")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model or converted folder whose tokenizer.json to use (default: the vendored o200k_harmony)")
@click.option("--next-role", default="assistant", show_default=True,
              help="role of the turn to complete (<|start|>ROLE is appended); 'none' renders only the messages")
@click.option("--keep-analysis", is_flag=True, help="do not drop earlier analysis messages")
def render_cmd(conversation: Path, as_tokens: bool, model: Path | None, next_role: str, keep_analysis: bool) -> None:
    """Render CONVERSATION (openai-harmony's to_json form, or a list of {role, content}) as a Harmony prompt."""
    from .conversation import Conversation
    from .render import render_conversation

    conv = Conversation.load(conversation)
    tok = _tokenizer(model)
    ids = render_conversation(conv, tok, next_role=None if next_role.lower() == "none" else next_role,
                              auto_drop_analysis=not keep_analysis)
    if as_tokens:
        click.echo(json.dumps(ids))
    else:
        click.echo(tok.decode(ids))


def _token_ids(text: str) -> list[int] | None:
    """Token ids written as a JSON list, `{"tokens": [...]}` (generate --json's output) or whitespace/comma-separated
    integers; None when the text is not that."""
    try:
        data = json.loads(text)
    except ValueError:
        data = text.replace(",", " ").split()
    if isinstance(data, dict):
        data = data.get("tokens") or data.get("ids")
    if not isinstance(data, list) or not data:
        return None
    if not all(type(t) is int or (isinstance(t, str) and t.strip().lstrip("-").isdigit()) for t in data):
        return None  # 1e999, 1.5, true, null: not token ids
    return [int(t) for t in data]


def _read_tokens(path: Path) -> list[int]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as e:
        raise EdgecError(f"{path}: cannot read ({e.strerror})") from None
    ids = _token_ids(text)
    if ids is None:
        raise EdgecError(f"{path}: expected a JSON list (or whitespace-separated list) of token ids")
    return ids


@harmony.command("parse")
@click.option("--tokens-file", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
              help="token ids (JSON list or whitespace-separated; '-' reads stdin)")
@click.option("--text", help="completion text; special tokens like <|channel|> are written as their names")
@click.option("--role", default="auto", show_default=True,
              help="role already in the prompt (e.g. assistant); 'auto': none when the stream starts with "
                   "<|start|>, else assistant")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model folder whose tokenizer.json to use")
@click.option("--json", "as_json", is_flag=True, help="print the messages as JSON")
def parse_cmd(tokens_file: Path | None, text: str | None, role: str, model: Path | None, as_json: bool) -> None:
    """Parse a completion into Harmony messages (role, channel, recipient, content type, text).

    With neither --tokens-file nor --text it reads stdin: token ids (as --tokens-file takes them, e.g. the output of
    `edgec generate --json`) or else completion text."""
    from .parser import parse_completion
    from .render import START

    if tokens_file is not None and text is not None:
        raise EdgecError("give one of --tokens-file or --text (or pipe the completion on stdin)")
    ids: list[int] | None = None
    if tokens_file is None and text is None:
        stdin = sys.stdin
        if stdin.isatty():
            raise EdgecError("give --tokens-file or --text, or pipe a completion (token ids or text) on stdin")
        text = stdin.read().removesuffix("\n")
        ids = _token_ids(text)
        if ids is None and not text.strip():
            raise EdgecError("stdin was empty: nothing to parse")
    tok = _tokenizer(model)
    if ids is None:
        ids = _read_tokens(tokens_file) if tokens_file else tok.encode(text or "", allowed_special="all")
    check_token_ids(ids, tok.vocab_size)
    if role == "auto":
        start_role: str | None = None if ids[:1] == [START] else "assistant"
    else:
        start_role = None if role.lower() == "none" else role
    msgs = parse_completion(ids, tok, start_role)
    rows = [{"role": m.role, "name": m.name, "channel": m.channel, "recipient": m.recipient,
             "content_type": m.content_type, "text": m.text} for m in msgs]
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(show_lines=True)
    for col in ("role", "channel", "recipient", "content_type", "text"):
        t.add_column(col, overflow="fold")
    for r in rows:
        role_s = r["role"] + (f" ({r['name']})" if r["name"] else "")
        t.add_row(*(Text(x) for x in (role_s, r["channel"] or "", r["recipient"] or "", r["content_type"] or "",
                                      r["text"])))
    Console().print(t)


COMMANDS = [harmony]
