"""Minors: the host-wide numbers of VBDs, as blktap's marker files ``<dir>/tapdisk/tapdisk-<N>``.

``tap-ctl`` and the daemons share this module; the life of a minor is blktap's, the one
XCP-ng's storage manager drives:

1. ``allocate`` (tap-ctl): the lowest N without a marker gets one, created while the
   directory itself is locked (``flock``), so two allocations never pick the same N.
2. ``bind`` (a tapdisk, at ``attach``): the tapdisk opens the marker and holds an
   ``flock`` on it for as long as the minor is attached to it.  While the minor is
   connected to the kernel, the marker holds the device's path (``/dev/nbdN``).
3. ``unbind`` (at ``detach``, or when the process dies): the lock is dropped; the marker
   stays, the minor is still allocated.
4. ``free`` (tap-ctl): the marker is removed, unless a tapdisk holds it.

A minor whose tapdisk died keeps its marker, unlocked, until it is freed.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from . import directory as control_directory

#: Minors run from 0 below this.
MINOR_LIMIT = 1 << 20

_MARKER = re.compile(r"tapdisk-([0-9]+)")


class MinorError(OSError):
    """A minor cannot be allocated, bound or freed; ``errno`` says why, the message names it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


def minors_dir(directory: str) -> str:
    """The directory of the markers, below the control directory."""
    return f"{directory}/tapdisk"


def marker_path(directory: str, minor: int) -> str:
    """The marker file of ``minor`` (what ``tap-ctl allocate`` prints)."""
    return f"{minors_dir(directory)}/tapdisk-{minor}"


def allocated(directory: str) -> list[int]:
    """Every allocated minor, in the order of their marker names (as blktap's glob sorts)."""
    found = []
    for path in sorted(glob.glob(glob.escape(minors_dir(directory)) + "/tapdisk-*")):
        match = _MARKER.fullmatch(os.path.basename(path))
        if match:
            found.append(int(match[1]))
    return found


def allocate(directory: str, wanted: int | None = None) -> int:
    """Create the marker of ``wanted`` (None: the lowest free minor); the minor."""
    if wanted is not None and not 0 <= wanted < MINOR_LIMIT:
        raise MinorError(errno.EINVAL, f"minor {wanted} is out of range (0..{MINOR_LIMIT - 1})")
    with _locked_dir(directory):
        for minor in range(MINOR_LIMIT) if wanted is None else (wanted,):
            try:
                fd = _open(marker_path(directory, minor), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            os.close(fd)
            return minor
    if wanted is not None:
        raise MinorError(errno.EEXIST, f"minor {wanted} is already allocated")
    raise MinorError(errno.ENOSPC, f"all {MINOR_LIMIT} minors are allocated")


def free(directory: str, minor: int) -> None:
    """Remove the marker of ``minor``; refused while a tapdisk has it attached."""
    path = marker_path(directory, minor)
    with _locked_dir(directory):
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise MinorError(errno.ENOENT, f"minor {minor} is not allocated") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MinorError(
                    errno.EBUSY, f"minor {minor} is attached to a tapdisk: detach it first"
                ) from None
            os.unlink(path)
        finally:
            os.close(fd)


def bind(directory: str, minor: int) -> int:
    """Lock the marker of an allocated ``minor`` for this process; the locked descriptor."""
    path = marker_path(directory, minor)
    try:
        fd = _open(path, os.O_RDWR)
    except FileNotFoundError:
        raise MinorError(
            errno.ENOENT, f"minor {minor} is not allocated (tap-ctl allocate first)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)  # freed, and perhaps allocated again, meanwhile
    except BlockingIOError:
        os.close(fd)
        raise MinorError(errno.EBUSY, f"minor {minor} is attached to another tapdisk") from None
    except FileNotFoundError:
        os.close(fd)
        raise MinorError(errno.ENOENT, f"minor {minor} was freed while attaching it") from None
    return fd


def unbind(fd: int) -> None:
    """Drop the lock of a bound minor (its marker stays: the minor is still allocated)."""
    os.close(fd)


def record_device(fd: int, device: str | None) -> None:
    """Write ``device`` (``/dev/nbdN``) into a bound minor's marker, or empty it (None)."""
    os.ftruncate(fd, 0)
    if device is not None:
        os.pwrite(fd, f"{device}\n".encode(), 0)


def _open(path: str, flags: int) -> int:
    """Open a marker (or their directory) without following a symlink in its place."""
    try:
        return control_directory.open_file(path, flags)
    except control_directory.UnsafeDirectoryError as exc:
        raise MinorError(errno.ELOOP, str(exc)) from None


@contextmanager
def _locked_dir(directory: str) -> Iterator[None]:
    """Hold an ``flock`` on the marker directory (created 0700 if needed), in a control
    directory only root and we can write (``directory.py``)."""
    path = minors_dir(directory)
    try:
        control_directory.prepare(directory)
    except control_directory.UnsafeDirectoryError as exc:
        raise MinorError(errno.EPERM, str(exc)) from None
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = _open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
