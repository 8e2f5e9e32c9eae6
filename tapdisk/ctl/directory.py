"""The control directory's safety rule, shared by the daemon and tap-ctl.

Root writes its log, minor locks and sockets in the control directory; if
another user could write there (or could swap a directory above it), a symlink
named ``tapdisk.log`` would make root append to any file.  So, as sshd's
StrictModes does for ``~/.ssh``: every directory from ``/`` down to the control
directory must be owned by root or by us and not writable by group or others,
except that a directory above it may be a sticky one (``/tmp``), whose entries
only their owners may replace; every symlink on the way must be owned by root
or by us.  Files in the directory are then opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import os
import stat


class UnsafeDirectoryError(PermissionError):
    """A control directory another user could write; the message says who and where."""


def prepare(directory: str) -> None:
    """Create ``directory`` (mode 0700) if needed and check that only we can write it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    check(directory)


def check(directory: str) -> None:
    """Raise UnsafeDirectoryError unless only root and we can change ``directory``."""
    trusted = {0, os.geteuid()}
    path = os.path.abspath(directory)
    prefix = "/"
    for part in path.split("/")[1:]:
        prefix = os.path.join(prefix, part)
        link = os.lstat(prefix)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
            raise UnsafeDirectoryError(
                f"control directory {path}: symlink {prefix} belongs to uid {link.st_uid}"
            )
    real = os.path.realpath(path)
    prefix = "/"
    for part in ["", *real.split("/")[1:]]:
        prefix = os.path.join(prefix, part)
        info = os.stat(prefix)
        last = prefix == real
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeDirectoryError(f"control directory {path}: {prefix} is not a directory")
        if info.st_uid not in trusted:
            raise UnsafeDirectoryError(
                f"control directory {path}: {prefix} belongs to uid {info.st_uid}, "
                "not to root or to us"
            )
        shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared and (last or not info.st_mode & stat.S_ISVTX):
            raise UnsafeDirectoryError(
                f"control directory {path}: {prefix} is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o})"
            )


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` a file of the control directory, refusing a symlink in its place."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeDirectoryError(f"{path} is a symlink; not following it") from exc
        raise
