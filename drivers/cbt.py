"""blktap's changed-block tracking (CBT) log: its layout and the edits ``cbt-util`` makes.

A log is a 48-byte little-endian header followed by a bitmap, one bit per
64 KiB block of the disk (block ``b`` is bit ``b % 8``, least significant
first, of bitmap byte ``b // 8``)::

    0   parent UUID   16 raw bytes (RFC 4122 order), zeros for none
    16  child UUID    16 raw bytes
    32  consistent    int32: 0 while a tapdisk tracks into the log, 1 after a clean close
    36  padding       4 bytes, written as zeros
    40  size          uint64: the disk size in bytes
    48  bitmap        ceil(ceil(size / 64 KiB) / 8) bytes

Nothing after the bitmap is read, and the file's length is never trusted: on
LVM the log is a logical volume, larger than the log it holds.  A file shorter
than its header and bitmap is an error.  Logs are edited in place (same inode,
no temporary file and rename) because a running tapdisk maps them and logical
volumes cannot be renamed; every edit reads and checks everything it needs
before it writes a byte.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from struct import Struct
from typing import Final

from .base import ImageError, ImageFormatError
from .fileio import pwrite_full
from .paths import open_disk

BLOCK_SHIFT: Final = 16
#: Bytes of disk one bitmap bit stands for.
BLOCK_SIZE: Final = 1 << BLOCK_SHIFT
#: parent, child, consistent, padding, size.
HEADER: Final = Struct("<16s16si4xQ")
NULL_UUID: Final = uuid.UUID(int=0)
#: The size field is a uint64.
MAX_SIZE: Final = (1 << 64) - 1
#: Largest piece of bitmap read or zeroed at once.
_CHUNK: Final = 1 << 22


class LogFormatError(ImageFormatError):
    """A log file is shorter than its header and bitmap."""


class LogSizeError(ImageError):
    """A resize or coalesce that the logs' sizes forbid (shrinking, a longer parent)."""


def bitmap_size(size: int) -> int:
    """Bytes of bitmap for a disk of ``size`` bytes."""
    blocks = (size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
    return (blocks + 7) >> 3


@dataclass(frozen=True, slots=True)
class LogHeader:
    """The header fields; ``consistent`` is kept as the int32 it is on disk."""

    parent: uuid.UUID = NULL_UUID
    child: uuid.UUID = NULL_UUID
    consistent: int = 0
    size: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.parent.bytes, self.child.bytes, self.consistent, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> LogHeader:
        parent, child, consistent, size = HEADER.unpack(data)
        return cls(uuid.UUID(bytes=parent), uuid.UUID(bytes=child), consistent, size)

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.size)


def read_exact(fd: int, path: str, offset: int, length: int, what: str) -> bytes:
    """``length`` bytes at ``offset``, or LogFormatError naming ``path`` and ``what`` was short."""
    parts: list[bytes] = []
    done = 0
    while done < length:
        # Bounded reads: a hostile header may claim an exabyte disk.
        piece = os.pread(fd, min(length - done, _CHUNK), offset + done)
        if not piece:
            raise LogFormatError(
                f"{path}: CBT log ends at byte {offset + done}, inside its {what} "
                f"(bytes {offset} to {offset + length})"
            )
        parts.append(piece)
        done += len(piece)
    return b"".join(parts)


def read_log(fd: int, path: str) -> tuple[LogHeader, bytes]:
    """The header and bitmap of the open log ``fd``, each checked to be all there."""
    header = LogHeader.unpack(read_exact(fd, path, 0, HEADER.size, "header"))
    bitmap = read_exact(fd, path, HEADER.size, header.bitmap_size, "bitmap")
    return header, bitmap


def load(path: str) -> tuple[LogHeader, bytes]:
    """Read the log at ``path``: its header and bitmap."""
    fd = open_disk(path, os.O_RDONLY)
    try:
        return read_log(fd, path)
    finally:
        os.close(fd)


def _check_size(path: str, size: int) -> None:
    if not 0 < size <= MAX_SIZE:
        raise LogSizeError(f"{path}: disk size must be 1 to {MAX_SIZE} bytes, not {size}")


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = memoryview(bytes(min(length, _CHUNK)))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


def create(path: str, size: int) -> None:
    """Write a new log for a disk of ``size`` bytes: null UUIDs, inconsistent, nothing marked.

    An existing file is overwritten in place (an LV keeps its length; a file is
    cut to exactly header + bitmap).
    """
    _check_size(path, size)
    try:
        fd = open_disk(path, os.O_WRONLY | os.O_TRUNC)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        header = LogHeader(size=size)
        pwrite_full(fd, memoryview(header.pack()), 0)
        _write_zeros(fd, HEADER.size, header.bitmap_size)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def update(
    path: str,
    *,
    parent: uuid.UUID | None = None,
    child: uuid.UUID | None = None,
    consistent: int | None = None,
    size: int | None = None,
) -> LogHeader:
    """Change the given header fields of the log at ``path``; returns the new header.

    A larger ``size`` grows the bitmap with zeros and keeps its bits; a smaller
    one is a LogSizeError and nothing is written.  The bitmap is never
    rewritten, so a tapdisk marking blocks meanwhile loses none.
    """
    fd = open_disk(path, os.O_RDWR)
    try:
        old, _ = read_log(fd, path)
        new = old
        if parent is not None:
            new = replace(new, parent=parent)
        if child is not None:
            new = replace(new, child=child)
        if consistent is not None:
            new = replace(new, consistent=consistent)
        if size is not None:
            _check_size(path, size)
            if size < old.size:
                raise LogSizeError(
                    f"{path}: cannot shrink the CBT log from {old.size} to {size} bytes"
                )
            new = replace(new, size=size)
        # The grown bitmap is zeroed before the header says it exists.
        _write_zeros(fd, HEADER.size + old.bitmap_size, new.bitmap_size - old.bitmap_size)
        pwrite_full(fd, memoryview(new.pack()), 0)
        os.fdatasync(fd)
        return new
    finally:
        os.close(fd)


def coalesce(parent_path: str, child_path: str) -> None:
    """OR the bitmap of the log at ``parent_path`` into the one at ``child_path``.

    A parent bitmap longer than the child's is a LogSizeError and nothing is written.
    """
    _, parent_bits = load(parent_path)
    fd = open_disk(child_path, os.O_RDWR)
    try:
        _, child_bits = read_log(fd, child_path)
        if len(parent_bits) > len(child_bits):
            raise LogSizeError(
                f"{parent_path}: its bitmap ({len(parent_bits)} bytes) is longer than that "
                f"of {child_path} ({len(child_bits)} bytes); cannot coalesce"
            )
        n = len(parent_bits)
        merged = (int.from_bytes(parent_bits) | int.from_bytes(child_bits[:n])).to_bytes(n)
        if merged != child_bits[:n]:
            pwrite_full(fd, memoryview(merged), HEADER.size)
            os.fdatasync(fd)
    finally:
        os.close(fd)
