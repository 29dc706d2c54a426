"""Nothing half-done on disk: outputs are built in a hidden temporary folder and renamed into place."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgecError


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure it is removed.

    Refuses an existing `out` unless `force`. SIGTERM is turned into KeyboardInterrupt while inside, and a
    full disk becomes a one-line EdgecError; in every failure case no partial output remains.
    """
    out = Path(out)
    if out.exists() and not force:
        raise EdgecError(f"{out}: output folder exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.edgec-tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)

    def _term(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.edgec-old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgecError(f"{out}: interrupted; no partial output was left behind") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise EdgecError(f"{out}: disk full while writing {e.filename or 'output'}; "
                             "no partial output was left behind") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def fsync_folder(folder: Path) -> None:
    """Make the files in `folder` and its entries durable (before `atomic_dir` renames it into place)."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "r+b") as f:  # Windows flushes only files opened for writing
                os.fsync(f.fileno())
    if os.name == "posix":  # a folder cannot be opened, nor needs this, on Windows
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
