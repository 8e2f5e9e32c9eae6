"""The undo journal of offline VHD edits (``vhd-util resize -j``, ``revert``), in blktap's format.

The layout is blktap's ``libvhd-journal``, so either tool reverts a journal the
other left (SM reverts leftover journals when it attaches an SR)::

    0    header, 512 bytes: "vjournal", the VHD's UUID, the offset of its trailing
         footer, the count and first offset of data entries and of metadata entries
         (big-endian), then the journal's end (little-endian: blktap writes it in host
         order), zero padding
    512  entries, each a 32-byte entry header (cookie, type, size, offset in the VHD,
         checksum over entry header and data) and ``size`` bytes copied from the VHD:
         metadata first (trailing footer, footer copy, header, each parent locator,
         BAT, batmap header, batmap), then data: the bitmap and the data of each
         block an edit moves, copied from where it was before.

A journal whose data offset is 0 holds nothing to restore: it was still being
written (the VHD is untouched) or it was committed (the edit finished).

Writing, with its crash ordering:

1. ``create`` copies the metadata, fsyncs, and only then marks it complete (data
   offset set) and fsyncs again; the caller then disables the VHD (``v_poison``
   footers), so no reader uses it half edited;
2. ``add_block`` copies a block and fsyncs before the caller overwrites it;
3. after the edit the caller enables the VHD, then ``commit`` empties the journal and
   removes it.

``revert`` keeps the VHD disabled until everything is restored: it poisons the
journaled footers, cuts the file back, writes back the metadata and data, fsyncs,
and only then writes the original footers and removes the journal.  Killed at any
point, either tool leaves a journal that ``revert`` completes.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

from ..base import ImageError
from ..fileio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, is_unsupported
from ..paths import open_disk
from .format import (
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    PLAT_NONE,
    POISON_COOKIE,
    SECTOR,
    TYPE_FIXED,
    Footer,
    checksum,
    has_batmap,
)
from .meta import Metadata, cut_to, read_at, write_at

JOURNAL_COOKIE = b"vjournal"
ENTRY_COOKIE = 0xAAAA12344321AAAA
JOURNAL_HEADER_SIZE = 512

FOOTER_P, FOOTER_C, HEADER, LOCATOR, BAT, BATMAP_H, BATMAP_M, DATA = range(1, 9)

_HEAD = struct.Struct(">8s16sQIIQQ")
_EOF = struct.Struct("<Q")
#: The C struct has 4 bytes of padding after the checksum; they count in the checksum.
_ENTRY = struct.Struct(">QIIQI4x")
ZERO_CHUNK = 1 << 20


class JournalError(ImageError):
    """A journal that cannot be used: malformed, or for another VHD."""

    errno = errno.EINVAL


@dataclass
class JournalHeader:
    uuid: bytes
    footer_offset: int
    data_entries: int = 0
    metadata_entries: int = 0
    data_offset: int = 0
    metadata_offset: int = 0
    eof: int = JOURNAL_HEADER_SIZE

    def pack(self) -> bytes:
        head = _HEAD.pack(
            JOURNAL_COOKIE,
            self.uuid,
            self.footer_offset,
            self.data_entries,
            self.metadata_entries,
            self.data_offset,
            self.metadata_offset,
        )
        return (head + _EOF.pack(self.eof)).ljust(JOURNAL_HEADER_SIZE, b"\x00")

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> JournalHeader:
        cookie, uuid, foot, dents, ments, doff, moff = _HEAD.unpack_from(raw)
        if cookie != JOURNAL_COOKIE:
            raise JournalError(f"{where}: not a VHD journal (cookie {cookie!r})")
        (eof,) = _EOF.unpack_from(raw, _HEAD.size)
        if doff > eof or moff > eof or eof < JOURNAL_HEADER_SIZE:
            raise JournalError(f"{where}: journal header offsets run past its end {eof:#x}")
        return cls(uuid, foot, dents, ments, doff, moff, eof)


@dataclass
class Entry:
    kind: int
    offset: int
    data: bytes


def entry_bytes(kind: int, offset: int, data: bytes) -> bytes:
    """An entry header with its checksum, followed by ``data``."""
    total = sum(_ENTRY.pack(ENTRY_COOKIE, kind, len(data), offset, 0)) + sum(data)
    return _ENTRY.pack(ENTRY_COOKIE, kind, len(data), offset, ~total & 0xFFFFFFFF) + data


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make bytes [offset, offset+length) read as zeros: punch a hole, else write zeros."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as exc:
        if not is_unsupported(exc):
            raise
    zeros = bytes(min(length, ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(end - offset, len(zeros))
        write_at(fd, zeros[:n], offset)
        offset += n


def set_enabled(fd: int, meta: Metadata, footer_at: int, enabled: bool) -> None:
    """Write the footer (and a dynamic image's copy at 0) with ``conectix`` or ``v_poison``.

    Readers go by the trailing footer: it is the first disabled and the last enabled.
    """
    footer = meta.footer
    footer.cookie = FOOTER_COOKIE if enabled else POISON_COOKIE
    _write_footers(fd, footer.pack(), footer_at, not meta.is_fixed, trailing_first=not enabled)


def _write_footers(
    fd: int, packed: bytes, footer_at: int, copy: bool, *, trailing_first: bool
) -> None:
    if trailing_first:
        write_at(fd, packed, footer_at)
    if copy:
        write_at(fd, packed, 0)
    if not trailing_first:
        write_at(fd, packed, footer_at)


class Journal:
    """A journal being written for an edit of the VHD open on ``vhd_fd``."""

    def __init__(self, path: str, fd: int, header: JournalHeader) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.is_block = is_block_device(fd)

    @classmethod
    def create(cls, path: str, vhd_fd: int, meta: Metadata) -> Journal:
        """Copy ``meta``'s structures into a new journal at ``path`` (an existing block
        device is reused, as SM's LVM journals are); fsynced and marked complete."""
        try:
            fd = open_disk(path, os.O_RDWR)
        except FileNotFoundError:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        else:
            if not is_block_device(fd):
                os.close(fd)
                raise FileExistsError(errno.EEXIST, "journal already exists", path)
        footer_at = meta.file_size - FOOTER_SIZE
        journal = cls(path, fd, JournalHeader(meta.footer.uuid, footer_at))
        try:
            write_at(fd, journal.header.pack(), 0)
            for kind, offset, length in metadata_regions(meta):
                data = meta.footer.pack() if kind == FOOTER_P else read_at(vhd_fd, offset, length)
                journal._append(kind, offset, data)
            os.fsync(fd)
            journal.header.data_offset = journal.header.eof
            journal._write_header()
            os.fsync(fd)
            if not journal.is_block:
                _sync_dir(path)
        except BaseException:
            journal.close()
            if not journal.is_block:
                os.unlink(path)
            raise
        return journal

    def _append(self, kind: int, offset: int, data: bytes) -> None:
        h = self.header
        write_at(self.fd, entry_bytes(kind, offset, data), h.eof)
        if kind == DATA:
            if not h.data_entries:
                h.data_offset = h.eof
            h.data_entries += 1
        else:
            if not h.metadata_entries:
                h.metadata_offset = h.eof
            h.metadata_entries += 1
        h.eof += _ENTRY.size + len(data)
        self._write_header()

    def _write_header(self) -> None:
        write_at(self.fd, self.header.pack(), 0)

    def add_block(self, vhd_fd: int, sector: int, bitmap_size: int, block_size: int) -> None:
        """Copy a block (its bitmap, then its data) that the edit is about to move."""
        at = sector * SECTOR
        self._append(DATA, at, read_at(vhd_fd, at, bitmap_size))
        self._append(DATA, at + bitmap_size, read_at(vhd_fd, at + bitmap_size, block_size))
        os.fsync(self.fd)

    def commit(self) -> None:
        """The edit finished (and the VHD is enabled): empty the journal and remove it."""
        self.header = JournalHeader(self.header.uuid, self.header.footer_offset)
        self._write_header()
        if not self.is_block:
            os.ftruncate(self.fd, JOURNAL_HEADER_SIZE)
        os.fsync(self.fd)
        self.close()
        if not self.is_block:
            os.unlink(self.path)
            _sync_dir(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def metadata_regions(meta: Metadata) -> list[tuple[int, int, int]]:
    """(entry type, offset, length) of each structure a journal copies, in blktap's order."""
    regions = [(FOOTER_P, meta.file_size - FOOTER_SIZE, FOOTER_SIZE)]
    if meta.is_fixed or meta.header is None:
        return regions
    h = meta.header
    regions.append((FOOTER_C, 0, FOOTER_SIZE))
    regions.append((HEADER, meta.footer.data_offset, HEADER_SIZE))
    for loc in h.locators:
        if loc.code != PLAT_NONE:
            regions.append((LOCATOR, loc.data_offset, loc.space_bytes))
    regions.append((BAT, h.table_offset, h.bat_bytes))
    if has_batmap(meta.footer) and meta.batmap_header is not None:
        regions.append((BATMAP_H, meta.batmap_offset, SECTOR))
        bh = meta.batmap_header
        regions.append((BATMAP_M, bh.offset, bh.size_sectors * SECTOR))
    return regions


def _sync_dir(path: str) -> None:
    """Make a file's creation or removal durable."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------
# Revert


def read_entries(fd: int, header: JournalHeader, where: str) -> list[Entry]:
    """Every entry between the header and the end of a complete journal, checked."""
    entries: list[Entry] = []
    pos = JOURNAL_HEADER_SIZE
    expected = header.metadata_entries + header.data_entries
    while len(entries) < expected:
        if pos + _ENTRY.size > header.eof:
            raise JournalError(f"{where}: entry {len(entries)} runs past the journal's end")
        raw = read_at(fd, pos, _ENTRY.size)
        cookie, kind, size, offset, stored = _ENTRY.unpack(raw)
        if cookie != ENTRY_COOKIE or not size or size % SECTOR or not FOOTER_P <= kind <= DATA:
            raise JournalError(f"{where}: entry at {pos:#x} is malformed")
        if pos + _ENTRY.size + size > header.eof:
            raise JournalError(f"{where}: entry at {pos:#x} runs past the journal's end")
        data = read_at(fd, pos + _ENTRY.size, size)
        blank = raw[:24] + bytes(4) + raw[28:]
        if checksum(blank + data) != stored:
            raise JournalError(f"{where}: entry at {pos:#x} fails its checksum")
        entries.append(Entry(kind, offset, data))
        pos += _ENTRY.size + size
    if pos != header.eof or (header.data_entries and header.data_offset < header.metadata_offset):
        raise JournalError(f"{where}: entry counts disagree with the journal's length")
    return entries


def revert(vhd_path: str, journal_path: str) -> None:
    """Undo the edit ``journal_path`` recorded on ``vhd_path`` and remove the journal."""
    jfd = open_disk(journal_path, os.O_RDWR)
    try:
        raw = read_at(jfd, 0, JOURNAL_HEADER_SIZE)
        # Killed between creating the file and writing its header: an empty journal.
        header = (
            JournalHeader(bytes(16), 0)
            if raw == bytes(JOURNAL_HEADER_SIZE)
            else JournalHeader.unpack(raw, journal_path)
        )
        vfd = open_disk(vhd_path, os.O_RDWR)
        try:
            if header.data_offset == 0:
                _finish_empty(vfd, vhd_path, header, journal_path)
            else:
                entries = read_entries(jfd, header, journal_path)
                _restore(vfd, vhd_path, header, entries, journal_path)
            os.fsync(vfd)
        finally:
            os.close(vfd)
        if is_block_device(jfd):
            write_at(jfd, JournalHeader(header.uuid, header.footer_offset).pack(), 0)
            os.fsync(jfd)
    finally:
        os.close(jfd)
    if not stat.S_ISBLK(os.stat(journal_path).st_mode):
        os.unlink(journal_path)
        _sync_dir(journal_path)


def _current_footer(fd: int, vhd_path: str) -> Footer | None:
    """The VHD's footer as it is now (trailing, else the copy at 0), if either parses."""
    size = os.lseek(fd, 0, os.SEEK_END)
    for at in (size - FOOTER_SIZE, 0):
        try:
            return Footer.unpack(read_at(fd, at, FOOTER_SIZE), vhd_path)
        except ImageError:
            continue
    return None


def _finish_empty(vfd: int, vhd_path: str, header: JournalHeader, where: str) -> None:
    """A journal with nothing to restore: still being written (the VHD is untouched) or
    committed (the edit finished; blktap may have died before enabling the VHD)."""
    footer = _current_footer(vfd, vhd_path)
    if footer is None or (footer.uuid != header.uuid and header.uuid != bytes(16)):
        raise JournalError(f"{where}: holds nothing to restore and {vhd_path} is not its VHD")
    if footer.cookie != POISON_COOKIE:
        return
    if header.metadata_entries or header.uuid == bytes(16):
        raise JournalError(f"{where}: incomplete, and {vhd_path} is disabled")
    footer.cookie = FOOTER_COOKIE
    packed = footer.pack()
    size = os.lseek(vfd, 0, os.SEEK_END)
    if footer.disk_type != TYPE_FIXED:
        write_at(vfd, packed, 0)
    write_at(vfd, packed, size - FOOTER_SIZE)


def _restore(
    vfd: int, vhd_path: str, header: JournalHeader, entries: list[Entry], where: str
) -> None:
    kinds = [e.kind for e in entries]
    if not kinds or kinds[0] != FOOTER_P:
        raise JournalError(f"{where}: does not start with the VHD's footer")
    footer = Footer.unpack(entries[0].data, f"{where} (journaled footer)")
    if footer.uuid != header.uuid:
        raise JournalError(f"{where}: journaled footer belongs to another VHD")
    now = _current_footer(vfd, vhd_path)
    if now is not None and now.uuid != header.uuid:
        raise JournalError(f"{where}: is the journal of another VHD than {vhd_path}")
    dynamic = footer.disk_type != TYPE_FIXED
    if dynamic and (len(kinds) < 4 or kinds[1] != FOOTER_C or kinds[2] != HEADER):
        raise JournalError(f"{where}: lacks the footer copy or header of a dynamic VHD")
    end = header.footer_offset + FOOTER_SIZE
    for e in entries[1:]:
        if e.offset + len(e.data) > header.footer_offset:
            raise JournalError(f"{where}: entry for {e.offset:#x} lies past the VHD's end")
    # 1. Disabled at its old size: no reader trusts it until everything is back.
    footer.cookie = POISON_COOKIE
    _write_footers(vfd, footer.pack(), header.footer_offset, dynamic, trailing_first=True)
    cut_to(vfd, end)
    os.fsync(vfd)
    # 2. Metadata and moved blocks where they were.
    for e in entries[1:]:
        if e.kind != FOOTER_C:
            write_at(vfd, e.data, e.offset)
    os.fsync(vfd)
    # 3. The original footers, the trailing one last: the VHD is usable again.
    if dynamic:
        write_at(vfd, entries[1].data, 0)
    write_at(vfd, entries[0].data, header.footer_offset)
