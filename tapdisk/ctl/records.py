"""VBD records: what each minor's tapdisk serves, kept on disk for when that tapdisk dies.

A live tapdisk can be asked what it serves; a dead one cannot.  So the daemon keeps,
for every minor with an image open, a record ``<dir>/vbds/<minor>.json``: its pid, the
image and the options it was opened with, its NBD socket path, its ``/dev/nbdN`` and
its pause state.  The daemon rewrites it after every control operation that changed it
(a temporary file renamed over it: a reader never sees half a record) and removes it
when the image closes.  ``tap-ctl restart`` reads the records of a tapdisk that died
(``control/tapctl/recovery.py``) and a new tapdisk opens the same VBDs from them
(``tapdisk/daemon/recovery.py``).

Whether a record's tapdisk still runs is told by the minor's marker, not by the pid
(pids are reused): a tapdisk holds the ``flock`` of each minor attached to it
(``minors.py``), and the kernel drops it when the process dies.  ``marker_locked``
reads ``/proc/locks``, so that looking never takes the lock away from a tapdisk
attaching the minor at that moment.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from . import directory as control_directory
from . import minors


@dataclass(frozen=True)
class Record:
    """One VBD as its tapdisk opened and serves it."""

    pid: int
    minor: int
    #: The minor was allocated by the tapdisk itself (an open without a minor).
    owned: bool
    spec: str
    read_only: bool
    #: The per-request retry deadline in seconds.
    timeout: float
    cbt_log: str | None
    secondary: str | None
    standby: bool
    nbd_socket: str
    #: ``/dev/nbdN`` while connected to the kernel.
    device: str | None
    paused: bool

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """Raises ValueError (or TypeError) for anything but a whole record."""
        fields: dict[str, Any] = json.loads(data)
        return cls(**fields)

    @property
    def kernel_index(self) -> int | None:
        return None if self.device is None else int(self.device.removeprefix("/dev/nbd"))


def records_dir(directory: str) -> str:
    return f"{directory}/vbds"


def record_path(directory: str, minor: int) -> str:
    return f"{records_dir(directory)}/{minor}.json"


def read(directory: str, minor: int) -> Record | None:
    """The record of ``minor``; None if there is none (or it is damaged)."""
    try:
        fd = control_directory.open_file(record_path(directory, minor), os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        data = file.read()
    try:
        record = Record.decode(data)
    except (ValueError, TypeError):
        return None
    return record if record.minor == minor else None


def read_all(directory: str) -> list[Record]:
    """Every record, by minor; those of minors no longer allocated are left out."""
    try:
        names = os.listdir(records_dir(directory))
    except FileNotFoundError:
        return []
    allocated = set(minors.allocated(directory))
    found = []
    for name in names:
        number, dot, suffix = name.partition(".")
        if number.isdigit() and dot and suffix == "json" and int(number) in allocated:
            record = read(directory, int(number))
            if record is not None:
                found.append(record)
    return sorted(found, key=lambda record: record.minor)


def write(directory: str, record: Record) -> None:
    """Replace the record of ``record.minor`` unless it already says the same."""
    data = record.encode()
    path = record_path(directory, record.minor)
    with (
        contextlib.suppress(FileNotFoundError),
        os.fdopen(control_directory.open_file(path, os.O_RDONLY), "rb") as file,
    ):
        if file.read() == data:
            return
    os.makedirs(records_dir(directory), mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = control_directory.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def remove(directory: str, minor: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(directory, minor))


def marker_locked(directory: str, minor: int) -> bool:
    """A process holds the ``flock`` of ``minor``'s marker: its tapdisk runs (or is stopped)."""
    try:
        info = os.stat(minors.marker_path(directory, minor))
    except FileNotFoundError:
        return False
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; blocked waiters start "->"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                return True
    return False


def orphans(directory: str) -> list[Record]:
    """The records of minors no process holds: their tapdisk died, or was killed."""
    return [r for r in read_all(directory) if not marker_locked(directory, r.minor)]
