"""Connected sockets handed to this process by name, for ``nbd:NAME`` images.

xapi connects to a remote NBD server itself and passes the socket to tapdisk
over its ``nbdclient<pid>`` Unix socket (SCM_RIGHTS, the name as the message);
the daemon's receiver stores it here and the NBD driver takes it when an image
``nbd:NAME`` is opened.  As in blktap, a name given twice replaces (and closes)
the older descriptor, at most ``MAX_PASSED`` wait at once, and a descriptor is
taken once.
"""

from __future__ import annotations

import os
import threading

#: Descriptors waiting at once (blktap keeps 10).
MAX_PASSED = 10
#: Longest name kept (blktap keeps 39 bytes); longer names are cut, as there.
MAX_NAME = 39

_passed: dict[str, int] = {}
_lock = threading.Lock()  # openers run in a worker thread


class TooManyPassed(Exception):
    """``MAX_PASSED`` descriptors already wait to be taken."""


def stash(name: str, fd: int) -> None:
    """Keep ``fd`` under ``name`` (this module owns it from now on)."""
    name = name[:MAX_NAME]
    with _lock:
        old = _passed.pop(name, None)
        if old is None and len(_passed) >= MAX_PASSED:
            os.close(fd)
            raise TooManyPassed(f"{MAX_PASSED} passed descriptors already wait to be used")
        _passed[name] = fd
    if old is not None:
        os.close(old)


def take(name: str) -> int | None:
    """The descriptor passed under ``name``, now the caller's; None if there is none."""
    with _lock:
        return _passed.pop(name[:MAX_NAME], None)


def close_all() -> None:
    """Close every descriptor nobody took (at shutdown)."""
    with _lock:
        fds = list(_passed.values())
        _passed.clear()
    for fd in fds:
        os.close(fd)
