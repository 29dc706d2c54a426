"""Rich progress bars for long work (bytes with a rate), written to stderr so stdout stays machine-readable."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

stderr = Console(stderr=True)
if not stderr.is_terminal:  # logs and CI: wide enough for the tables
    stderr = Console(stderr=True, width=140)


@contextmanager
def byte_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(nbytes)`; shows a bar with bytes/s when enabled and stderr is a terminal."""
    if not enabled:
        yield lambda n: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn()]
    with Progress(*cols, console=stderr, transient=False, disable=not stderr.is_terminal) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)
