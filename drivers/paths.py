"""The one rule for which files a path may lead to.

Paths come from people (image specs given to the daemon, the configuration's
devices) and from images (qcow2/qcow backing files, VHD parent locators); the
second kind is untrusted input.  Every caller asks the same question here: with
every symlink resolved, is the path one of the allowed directories or below one?
Comparing resolved paths by whole components keeps ``/srv/images-evil`` out of
``/srv/images``, and a symlink inside an allowed directory cannot lead out of it.

And the one rule for what such a file may be: a disk image lives in a regular
file or a block device.  ``open_disk`` opens nothing else (a FIFO would block the
open, a character device such as ``/dev/zero`` reads as a disk of 0 bytes, a
device may act on being opened), and a refusal names the path, never anything
read from the file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from .base import ImageError


def is_inside(path: str, allowed_dirs: Iterable[str]) -> bool:
    """Whether ``path``, symlinks resolved, is an allowed directory or lies below one.

    A path that cannot name a file (empty, or holding a NUL byte) is inside nothing.
    """
    if not path or "\0" in path:
        return False
    real = os.path.realpath(path)
    for top in allowed_dirs:
        if not top or "\0" in top:
            continue
        root = os.path.realpath(top)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def refused_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it cannot hold a disk image, else None."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def open_disk(path: str, flags: int) -> int:
    """``os.open`` for a file that holds a disk image: a regular file or a block device.

    The path is checked with stat before it is opened, and the descriptor again after
    (opened O_NONBLOCK, so a FIFO swapped in meanwhile cannot block the open either).
    Raises ImageError naming the path and what it is.
    """
    kind = refused_kind(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            kind = refused_kind(os.fstat(fd).st_mode)
            if kind is None:
                os.set_blocking(fd, True)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise ImageError(f"{path} is {kind}, not a regular file or block device")
