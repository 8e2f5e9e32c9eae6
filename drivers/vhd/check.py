"""Consistency check and repair of one VHD (what ``vhd-util check`` and ``repair`` run).

``check_chain`` yields a verdict per image of a chain (problems, each naming
the field or block, and the errno a tool reports); ``check_vhd`` returns the
problems alone, an empty list when the image is valid.  The checks cover what
the driver needs at open time (through ``meta.load``) plus the stricter rules
blktap checks: both footers, reserved fields, geometry, timestamps, the batmap,
parent locators and UUID.
``repair_vhd`` rewrites what can be rebuilt without guessing: a damaged
trailing or backup footer, and an invalid batmap.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..backing import extend_chain, file_identity
from ..base import ImageError, ImageFormatError
from ..paths import open_disk
from . import bitmap as bits
from .chain import cluster_parent, find_parent
from .format import (
    BAT_UNUSED,
    BATMAP_VERSION,
    FEATURES_RESERVED,
    FILE_FORMAT_VERSION,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_VERSION,
    NO_DATA_OFFSET,
    SECTOR,
    TAP_VERSION,
    TYPE_DIFF,
    TYPE_FIXED,
    BatmapHeader,
    Footer,
    batmap_checksum,
    chs_geometry,
    has_batmap,
    pad_sector,
    vhd_now,
)
from .meta import Metadata, cut_to, load, read_at

#: blktap allows timestamps this far in the future (clock skew with NFS servers).
TIMESTAMP_SLACK = 1800


@dataclass(frozen=True)
class CheckOptions:
    """What to check, as ``vhd-util check``'s flags say."""

    parents: bool = False  # -p: every ancestor too
    bitmaps: bool = False  # -b: sectors whose bitmap bit is clear hold zeros
    ignore_footer: bool = False  # -i: a torn trailing footer is fine if the copy is good
    ignore_parent_uuid: bool = False  # -I
    ignore_timestamps: bool = False  # -t
    stats: bool = False  # -s: collect which sectors each image holds


@dataclass
class ImageCheck:
    """The verdict on one image of a chain."""

    path: str
    problems: list[str] = field(default_factory=list)
    #: Exit status a tool reports: 0, ENOENT (a parent is missing) or EINVAL.
    errno: int = 0
    fixed: bool = False
    #: With ``stats``: sectors in allocated blocks, and block -> bitmap of sectors held.
    sectors_allocated: int = 0
    written: dict[int, int] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problems


def check_chain(
    path: str, options: CheckOptions, allowed_dirs: tuple[str, ...] = ()
) -> Iterator[ImageCheck]:
    """Check ``path`` then, with ``options.parents``, each ancestor in turn.

    Yields one ``ImageCheck`` per image, ``path`` named as given and ancestors by
    the absolute path their child's locator leads to; stops after the first
    invalid image.
    """
    current = os.path.abspath(path)
    shown = path
    roots = allowed_dirs or (os.path.dirname(current),)
    chain = (file_identity(current),)
    while True:
        result, backing = _check_one(current, shown, options, roots)
        yield result
        if not result.valid or not options.parents or backing is None:
            return
        try:
            chain = extend_chain(chain, current, backing, "parent locator")
        except ImageFormatError as exc:
            yield ImageCheck(backing, [str(exc)], errno.EINVAL)
            return
        current = shown = backing


def check_vhd(
    path: str,
    *,
    parents: bool = False,
    bitmaps: bool = False,
    ignore_footer: bool = False,
    allowed_dirs: tuple[str, ...] = (),
) -> list[str]:
    """Problems found in ``path`` (and its ancestors with ``parents``); [] when valid."""
    options = CheckOptions(parents=parents, bitmaps=bitmaps, ignore_footer=ignore_footer)
    for result in check_chain(path, options, allowed_dirs):
        if not result.valid:
            return result.problems
    return []


def _check_one(
    path: str, shown: str, options: CheckOptions, roots: tuple[str, ...]
) -> tuple[ImageCheck, str | None]:
    result = ImageCheck(shown)
    fd = open_disk(path, os.O_RDONLY)
    try:
        try:
            meta = load(fd, path)
        except ImageFormatError as exc:
            result.problems.append(str(exc))
            result.errno = errno.EINVAL
            return result, None
        result.fixed = meta.is_fixed
        problems = [f"{path}: {p}" for p in _footer_problems(meta.footer, options)]
        if meta.footer_recovered and not options.ignore_footer:
            problems.append(f"{path}: primary footer invalid (the backup footer is intact)")
        if not meta.is_fixed:
            problems += [f"{path}: {p}" for p in _dynamic_problems(fd, meta, options)]
            if options.stats:
                _collect_stats(fd, meta, result)
        backing = None
        if meta.is_diff and meta.header is not None and cluster_parent(fd, meta) is None:
            try:
                backing = find_parent(path, fd, meta, roots)
                if meta.header.parent_uuid == bytes(16):
                    backing = None
                elif not options.ignore_parent_uuid:
                    _check_parent_uuid(path, meta, backing, problems)
            except ImageError as exc:
                problems.append(str(exc))
                result.errno = getattr(exc, "errno", None) or errno.EINVAL
                backing = None
            except OSError as exc:
                problems.append(f"{path}: invalid parent: {exc}")
                result.errno = getattr(exc, "errno", None) or errno.EINVAL
                backing = None
        result.problems = problems
        if problems and not result.errno:
            result.errno = errno.EINVAL
        return result, backing
    finally:
        os.close(fd)


def _check_parent_uuid(path: str, meta: Metadata, backing: str, problems: list[str]) -> None:
    assert meta.header is not None
    backing_fd = open_disk(backing, os.O_RDONLY)
    try:
        backing_meta = load(backing_fd, backing)
    finally:
        os.close(backing_fd)
    if backing_meta.footer.uuid != meta.header.parent_uuid:
        problems.append(f"{path}: header.parent_uuid does not match parent {backing}")


def _collect_stats(fd: int, meta: Metadata, result: ImageCheck) -> None:
    """Which sectors the image holds, block by block (``check -s``)."""
    assert meta.header is not None and meta.bat is not None
    spb = meta.header.block_size // SECTOR
    for b in range(meta.blocks):
        if meta.bat[b] == BAT_UNUSED:
            continue
        result.sectors_allocated += spb
        bm = read_at(fd, meta.bat[b] * SECTOR, meta.bitmap_size)
        result.written[b] = int.from_bytes(bm, "big") >> (len(bm) * 8 - spb)


def _footer_problems(f: Footer, options: CheckOptions) -> list[str]:
    out = []
    if f.cookie != FOOTER_COOKIE:
        out.append(f"footer.cookie is {f.cookie!r} (image disabled)")
    if not f.features & FEATURES_RESERVED or f.features & ~0x3:
        out.append(f"footer.features {f.features:#x} invalid")
    if f.version != FILE_FORMAT_VERSION:
        out.append(f"footer.version {f.version:#x} invalid")
    if f.disk_type == TYPE_FIXED and f.data_offset != NO_DATA_OFFSET:
        out.append(f"footer.data_offset {f.data_offset:#x} invalid for a fixed disk")
    if not options.ignore_timestamps and f.timestamp > vhd_now() + TIMESTAMP_SLACK:
        out.append("footer.timestamp is in the future")
    if f.is_tap and f.creator_version > TAP_VERSION:
        out.append(f"footer.creator_version {f.creator_version:#x} unsupported")
    c, h, s = chs_geometry(f.current_size)
    if f.geometry > (c << 16 | h << 8 | s) and f.creator_app not in (b"qem2", b"qemu"):
        out.append("footer.geometry too large")
    if f.saved_state not in (0, 1):
        out.append(f"footer.saved_state {f.saved_state} invalid")
    if f.hidden not in (0, 1):
        out.append(f"footer.hidden {f.hidden} invalid")
    if any(f.reserved):
        out.append("footer.reserved is not zero")
    if f.uuid == bytes(16):
        out.append("footer.uuid is null")
    return out


def _dynamic_problems(fd: int, meta: Metadata, options: CheckOptions) -> list[str]:
    h = meta.header
    assert h is not None and meta.bat is not None
    out = []
    backup = read_at(fd, 0, FOOTER_SIZE)
    if backup != meta.footer.pack() and not meta.footer_recovered:
        try:
            Footer.unpack(backup, "backup")
            out.append("primary and backup footers do not match")
        except ImageFormatError as exc:
            out.append(f"backup footer invalid: {str(exc).removeprefix('backup: ')}")
    if h.version != HEADER_VERSION:
        out.append(f"header.version {h.version:#x} invalid")
    if h.data_offset != NO_DATA_OFFSET:
        out.append(f"header.data_offset {h.data_offset:#x} should be all ones")
    if h.reserved1 or any(h.reserved2):
        out.append("header.reserved is not zero")
    if meta.footer.disk_type != TYPE_DIFF and (
        h.parent_uuid != bytes(16) or h.parent_name or any(loc.code for loc in h.locators)
    ):
        out.append("header has parent fields but the disk is not differencing")
    if (
        meta.footer.disk_type == TYPE_DIFF
        and not options.ignore_timestamps
        and h.parent_timestamp > vhd_now() + TIMESTAMP_SLACK
    ):
        out.append("header.parent_timestamp is in the future")
    if has_batmap(meta.footer):
        if meta.batmap_error:
            out.append(f"batmap is invalid: {meta.batmap_error}")
        elif meta.batmap is not None:
            for b in range(meta.blocks):
                if bits.test_bit(meta.batmap, b) and meta.bat[b] == BAT_UNUSED:
                    out.append(f"batmap shows unallocated block {b} full")
    if options.bitmaps:
        out += _bitmap_problems(fd, meta)
    return out


def _bitmap_problems(fd: int, meta: Metadata) -> list[str]:
    """In a dynamic disk, sectors whose bitmap bit is clear must hold zeros."""
    assert meta.bat is not None and meta.header is not None
    if meta.is_diff:
        return []
    out = []
    spb = meta.header.block_size // SECTOR
    zero = bytes(SECTOR)
    for b in range(meta.blocks):
        entry = meta.bat[b]
        if entry == BAT_UNUSED:
            continue
        bm = read_at(fd, entry * SECTOR, meta.bitmap_size)
        if bits.is_full(bm, spb):
            continue
        data = read_at(fd, entry * SECTOR + meta.bitmap_size, meta.header.block_size)
        for s in range(spb):
            if not bits.test_bit(bm, s) and data[s * SECTOR : (s + 1) * SECTOR] != zero:
                out.append(f"sector {s:#x} of block {b:#x} has data where bitmap is clear")
                break
    return out


def repair_vhd(path: str) -> list[str]:
    """Fix what can be rebuilt; returns a line per repair made."""
    done: list[str] = []
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        meta = load(fd, path)
        packed = meta.footer.pack()
        if meta.footer_recovered:
            os.pwrite(fd, packed, meta.data_end)
            cut_to(fd, meta.data_end + FOOTER_SIZE)
            done.append("rewrote the primary footer from the backup")
        if not meta.is_fixed and read_at(fd, 0, FOOTER_SIZE) != packed:
            os.pwrite(fd, packed, 0)
            done.append("rewrote the backup footer")
        if has_batmap(meta.footer) and meta.batmap_error:
            _rebuild_batmap(fd, meta)
            done.append("rebuilt the batmap")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return done


def _rebuild_batmap(fd: int, meta: Metadata) -> None:
    """Write a fresh batmap header and map right after the BAT, from the bitmaps."""
    assert meta.header is not None and meta.bat is not None
    hoff = meta.batmap_offset
    sectors = pad_sector(-(-meta.header.max_table_entries // 8)) // SECTOR
    first_block = min(
        (meta.bat[b] * SECTOR for b in range(meta.blocks) if meta.bat[b] != BAT_UNUSED),
        default=meta.data_end,
    )
    if hoff + SECTOR + sectors * SECTOR > first_block:
        raise ImageFormatError(f"{meta.path}: no room for a batmap after the BAT")
    bmap = bytearray(sectors * SECTOR)
    spb = meta.header.block_size // SECTOR
    for b in range(meta.blocks):
        if meta.bat[b] != BAT_UNUSED:
            bm = read_at(fd, meta.bat[b] * SECTOR, meta.bitmap_size)
            if bits.is_full(bm, spb):
                bits.set_bit(bmap, b)
    old = meta.batmap_header
    hdr = BatmapHeader(
        offset=hoff + SECTOR,
        size_sectors=sectors,
        version=BATMAP_VERSION,
        marker=old.marker if old else 0,
    )
    hdr.checksum = batmap_checksum(bmap, meta.footer.current_size, BATMAP_VERSION)
    os.pwrite(fd, hdr.pack() + bytes(bmap), hoff)
