"""`edgec harmony render` / `edgec harmony parse`: look at Harmony prompts and completions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EdgecError


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


def _read_tokens(path: Path) -> list[int]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EdgecError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = text.replace(",", " ").split()
    if isinstance(data, dict):
        data = data.get("tokens") or data.get("ids")
    try:
        ids = [int(t) for t in data]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise EdgecError(f"{path}: expected a JSON list (or whitespace-separated list) of token ids") from None
    return ids


@harmony.command("parse")
@click.option("--tokens-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="token ids (JSON list or whitespace-separated)")
@click.option("--text", help="completion text; special tokens like <|channel|> are written as their names")
@click.option("--role", default="auto", show_default=True,
              help="role already in the prompt (e.g. assistant); 'auto': none when the stream starts with "
                   "<|start|>, else assistant")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model folder whose tokenizer.json to use")
@click.option("--json", "as_json", is_flag=True, help="print the messages as JSON")
def parse_cmd(tokens_file: Path | None, text: str | None, role: str, model: Path | None, as_json: bool) -> None:
    """Parse a completion into Harmony messages (role, channel, recipient, content type, text)."""
    from .parser import parse_completion
    from .render import START

    if (tokens_file is None) == (text is None):
        raise EdgecError("give exactly one of --tokens-file or --text")
    tok = _tokenizer(model)
    ids = _read_tokens(tokens_file) if tokens_file else tok.encode(text or "", allowed_special="all")
    bad = [t for t in ids if not 0 <= t < tok.vocab_size]
    if bad:
        raise EdgecError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
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
