"""An output folder a run may use: creatable and writable (checked before any work), cleared of a killed run's
temporary files, and held by one run at a time (a lock file that the operating system releases when the process
ends, however it ends)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from ..errors import InputError

LOCK_NAME = ".crisp-ext.lock"


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` (and its parents) and check that files can be written in it; an :class:`InputError` naming
    ``option`` when it lies under a regular file, is read-only, or cannot be created."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{option} {path}: {parent} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = "it is read-only" if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else \
            (exc.strerror or exc.__class__.__name__)
        raise InputError(f"{option} {path}: cannot write there ({why}); give a folder you can write to") from None
    return path


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp<suffix>``) a killed run left under ``path``; returns
    them. Only call while holding the folder's lock: a running writer's temporary files look the same."""
    removed = []
    root = Path(path)
    if not root.is_dir():
        return removed
    for tmp in root.rglob(".*.tmp*"):
        if tmp.is_file() and ".tmp" in tmp.name:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


_HELD: set[str] = set()  # lock files this process holds (POSIX locks do not conflict within one process)
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def output_lock(path: str | Path, *, wait: bool = False, option: str = "--out",
                poll_s: float = 0.2) -> Iterator[Path]:
    """Hold ``path``'s lock for the duration; another run holding it is an :class:`InputError` (or, with
    ``wait``, waited for). A POSIX record lock: it belongs to this process alone (worker processes it forks do not
    keep it alive after it is killed) and ends with it. The lock file stays."""
    import fcntl

    lock = Path(path) / LOCK_NAME
    key = str(lock.resolve())
    fh = open(lock, "a+")
    locked = False
    try:
        while True:
            with _HELD_GUARD:
                if key not in _HELD:
                    try:
                        fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        _HELD.add(key)
                        locked = True
                    except OSError:
                        pass
            if locked:
                break
            if not wait:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise InputError(f"{option} {path} is in use by another crisp-ext run ({holder}); wait for it to "
                                 f"finish, give another folder, or add --wait")
            time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield lock
    finally:
        if locked:
            with _HELD_GUARD:
                _HELD.discard(key)
            with contextlib.suppress(OSError):
                fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
