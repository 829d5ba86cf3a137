"""One writer per results file: a rollout job holds an exclusive lock on `<output>.lock` while it
checks and appends to its output, so a second job on the same output.path is refused instead of
interleaving (and duplicating) lines with the first.

The lock is an advisory `flock` on a small sidecar file next to the output: the kernel drops it when
the process dies (Ctrl-C, crash, kill -9), so a stale lock file never blocks a later run.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from atom.rollout.job_errors import JobError

# What the job writes into a lock file it creates: only a file holding exactly this is ever removed
# (a user's own `<output>.lock`, however unlikely, is locked but never written or deleted).
LOCK_MARK = b"atom rollout lock\n"


def lock_path(out: Path) -> Path:
    """The sidecar lock of `out`, next to the real file (a symlinked output.path shares its target's)."""
    real = out.resolve()
    return real.with_name(real.name + ".lock")


def _make_dirs(folder: Path, what: str) -> list[Path]:
    """Create `folder` and its missing parents; returns those created (deepest first), for cleanup."""
    missing = []
    d = folder
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"output.path {what!r}: cannot create its folder {str(folder)!r} ({e.strerror})") from None
    return missing


def _open_lock(path: Path, what: str) -> tuple[int, bool]:
    """(fd, created): the lock file, opened without truncating what may already be there."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, LOCK_MARK)
        return fd, True
    except FileExistsError:
        pass
    except OSError as e:
        raise JobError(f"output.path {what!r}: cannot write in {str(path.parent)!r} ({e.strerror})") from None
    try:
        return os.open(path, os.O_RDONLY), False
    except OSError as e:
        raise JobError(f"output.path {what!r}: cannot open its lock file {str(path)!r} ({e.strerror})") from None


def _is_ours(path: Path) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(len(LOCK_MARK) + 1) == LOCK_MARK
    return False


def _acquire(path: Path, what: str) -> tuple[int, bool]:
    """Lock `path` (non-blocking); JobError when another job holds it."""
    for _ in range(10):  # another job may remove the file between our open and our flock: retry
        fd, created = _open_lock(path, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise JobError(f"output.path {what!r} is in use by another rollout job (lock {str(path)!r} "
                               "is held); wait for it to finish or choose another output.path") from None
            raise JobError(f"output.path {what!r}: cannot lock {str(path)!r} ({e.strerror})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)  # we locked a file the previous holder had just removed
    raise JobError(f"output.path {what!r}: could not take the lock {str(path)!r}")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of results file `out` (its folder is created if need be).

    On exit the lock file is removed when it is ours, and the folders this call created are
    removed again when the job left them empty (a job that wrote nothing leaves nothing)."""
    what = str(out)
    path = lock_path(out)
    created_dirs = _make_dirs(path.parent, what)
    try:
        fd, _ = _acquire(path, what)
    except JobError:
        _remove_empty(created_dirs)
        raise
    try:
        yield
    finally:
        if _is_ours(path):
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a waiting job re-checks the inode (see _acquire)
        os.close(fd)
        _remove_empty(created_dirs)


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return
