"""Nothing half-done on disk, nothing lost: outputs are built in a hidden temporary folder and renamed into place.

`atomic_dir` is the one guard every command that writes a folder (convert, synth) goes through: it refuses an
output that would replace the source or a folder edgec did not write, holds a lock on the destination, removes the
temporary folder a killed run left behind, and leaves nothing behind itself on any failure.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgecError, Interrupted

SYNTH_MARKER = ".edgec-synth"  # written into every `edgec synth` checkpoint
OWNED_MARKERS = ("edgec.json", SYNTH_MARKER)  # a folder holding one of these was written by edgec


def check_output(out: Path, force: bool | str = False, keep: Iterable[Path] = ()) -> None:
    """Refuse (one-line EdgecError) an output path whose replacement would touch a file in `keep` (the source),
    an existing output without `force`, or, unless force == "foreign", a folder edgec did not write."""
    out = Path(out)
    real = out.resolve()
    keep = [Path(k).resolve() for k in keep]
    for k in keep:
        if k == real or real in k.parents:
            raise EdgecError(f"{out}: replacing it would destroy the source {k}; choose another output folder")
    if not out.exists() and not out.is_symlink():
        return
    owned = out.is_dir() and not out.is_symlink() and any((out / m).is_file() for m in OWNED_MARKERS)
    for folder in {k if k.is_dir() else k.parent for k in keep}:  # the source's folder: only edgec's outputs there
        if (real == folder or folder in real.parents) and not owned:
            raise EdgecError(f"{out}: is inside the source folder {folder} and not an edgec output; edgec replaces "
                             f"nothing else there, whatever --force says")
    if out.is_symlink() or not out.is_dir():
        raise EdgecError(f"{out}: is a {'symbolic link' if out.is_symlink() else 'file'}, not an output folder; "
                         "edgec will not replace it")
    if not force:
        raise EdgecError(f"{out}: output folder exists (use --force to replace it)")
    if force != "foreign" and not owned and any(out.iterdir()):
        raise EdgecError(f"{out}: not written by edgec (no edgec.json); --force replaces only edgec outputs, "
                         "--force-foreign replaces any folder")


@contextmanager
def atomic_dir(out: str | Path, force: bool | str = False, keep: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure it is removed.

    `check_output` rules first (force: False, True, or "foreign"; keep: the source files). While inside, the
    destination is locked against a second edgec, Ctrl-C and SIGTERM are interrupts (exit 130, even where a library
    swallowed one), and a full disk becomes a one-line EdgecError naming the output; in every failure case no partial
    output remains.
    """
    out = Path(out)
    keep = list(keep)
    check_output(out, force, keep)
    made = [p for p in reversed(out.parents) if not p.exists()]  # parent folders this run creates
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.edgec-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    trash = out.parent / f".{out.name}.edgec-old-{os.getpid()}"

    hit: list[int] = []

    def _stop(signum, frame):
        hit.append(signum)
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both interrupt, and both are recorded: a library may swallow the KeyboardInterrupt (Cython's
    # generated module init wraps `Sequence.register` in a bare `except: pass`, so a Ctrl-C landing while numpy.random
    # is first imported vanished), and an interrupted run must never put its output in place
    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    try:
        with _locked(out, tmp, trash) as lock:  # both names are recorded before either exists
            try:
                os.mkdir(tmp, 0o777)  # permissions as a folder the user makes (umask)
                yield tmp
                if hit:
                    raise KeyboardInterrupt
                if out.exists() or out.is_symlink():  # again, under the lock: it may have appeared meanwhile
                    check_output(out, force, keep)
                if out.exists():
                    os.replace(out, trash)
                    os.replace(tmp, out)
                    try:
                        shutil.rmtree(trash, ignore_errors=True)
                    except KeyboardInterrupt:  # the new output is in place; the lock file keeps the old one's name
                        lock["leftovers"] = True
                        raise Interrupted(f"{out}: interrupted after the new output was in place; what is left of "
                                          f"the old one ({trash.name}) is removed by the next edgec run here") \
                            from None
                else:
                    os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if trash.is_dir() and not out.exists():  # stopped between the two renames: the old output returns
                    os.replace(trash, out)
                raise
    except KeyboardInterrupt:
        raise Interrupted(f"{out}: interrupted; no partial output was left behind") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            inside = [Path(f) for f in (e.filename, e.filename2) if f and tmp in Path(f).parents]
            where = out / inside[0].relative_to(tmp) if inside else out
            raise EdgecError(f"{where}: disk full while writing the output; no partial output was left behind") \
                from None
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if not out.exists():  # failed: the parent folders this run made go too (those still empty)
            for p in reversed(made):
                try:
                    p.rmdir()
                except OSError:
                    break


@contextmanager
def _locked(out: Path, *folders: Path) -> Iterator[dict]:
    """Hold `.NAME.edgec-lock` beside `out` (an OS lock: released even when the process is killed). The file names
    the temporary `folders` its holder writes; a holder that was killed leaves it behind, and the next holder removes
    the folders it names (those are provably edgec's) and says so."""
    path = out.parent / f".{out.name}.edgec-lock"
    state = {"leftovers": False}  # set by the holder when it leaves a recorded folder behind
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise EdgecError(f"{out}: another edgec process is writing this output right now")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: take the new one
    try:
        _remove_stale(out, os.read(fd, 1 << 16).decode("utf-8", "replace").splitlines())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, "".join(f"{p.name}\n" for p in folders).encode())
        yield state
    finally:
        if not state["leftovers"]:  # else the record stays, for the next holder to clean up
            try:
                os.unlink(path)  # while still locked (POSIX); Windows cannot delete an open file: after closing
            except OSError:
                pass
        os.close(fd)
        if path.exists() and os.name == "nt" and not state["leftovers"]:
            try:
                os.unlink(path)
            except OSError:
                pass


def _remove_stale(out: Path, names: list[str]) -> None:
    """Remove the temporary folders a killed edgec recorded in the lock file (only names edgec gives them)."""
    from .progress import stderr

    for name in names:
        p = out.parent / name
        if name.startswith((f".{out.name}.edgec-tmp-", f".{out.name}.edgec-old-")) and Path(name).name == name \
                and p.is_dir() and not p.is_symlink():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(p, ignore_errors=True)
            stderr.print(f"[yellow]note:[/] removed {p} ({size / 1e6:.1f} MB), left by an edgec run that was killed",
                         highlight=False, soft_wrap=True)


def _try_lock(fd: int) -> bool:
    """A non-blocking exclusive lock on an open file: flock on POSIX, msvcrt.locking on Windows."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
    try:
        import msvcrt
    except ImportError:  # neither: a platform without file locks, write unlocked
        return True
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


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


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (and waited-for children are not included)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
