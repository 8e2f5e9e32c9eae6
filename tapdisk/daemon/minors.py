"""Minors: the host-wide numbers of VBDs, each held by an ``flock`` while its VBD is open.

The lock file of minor N is ``<dir>/minor<N>.lock``.  A process that dies loses
its locks with it, so the minors of crashed processes are free again at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from tapdisk.ctl import directory as control_directory

from .errors import ControlError

#: Minors run from 0 below this.
MINOR_LIMIT = 1 << 20


def lock_minor(directory: str, wanted: int | None) -> tuple[int, int]:
    """Take the lock of ``wanted`` (or of the lowest free minor); (minor, fd)."""
    if wanted is not None:
        if not 0 <= wanted < MINOR_LIMIT:
            raise ControlError("invalid", f"minor {wanted} is out of range")
        fd = _try_lock(directory, wanted)
        if fd is None:
            raise ControlError("state", f"minor {wanted} is in use")
        return wanted, fd
    minor = 0
    while True:
        fd = _try_lock(directory, minor)
        if fd is not None:
            return minor, fd
        minor += 1


def unlock_minor(directory: str, minor: int, fd: int) -> None:
    """Remove the lock file of ``minor`` and drop its lock."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(directory, minor))
    os.close(fd)


def _lock_path(directory: str, minor: int) -> str:
    return f"{directory}/minor{minor}.lock"


def _try_lock(directory: str, minor: int) -> int | None:
    path = _lock_path(directory, minor)
    while True:
        fd = control_directory.open_file(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its owner just unlinked; try again
