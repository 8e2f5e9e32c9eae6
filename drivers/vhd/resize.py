"""Growing a VHD's virtual size: in place (``vhd-util resize -f``) or journaled (``-j``).

A dynamic image grows in whole blocks, as blktap's does.  In place, the BAT must
already have entries for the new size (``create -S``): only the footers change.
Journaled, the BAT may grow past the room reserved at create:

1. the journal copies the metadata (``journal.Journal.create``); the VHD is
   disabled (``v_poison`` footers) so nothing uses it half grown;
2. blocks lying where the larger BAT, batmap and parent locators will go are
   copied into the journal, then to the end of the data (data areas 4 KiB aligned);
3. the new layout is written: BAT, batmap, locators, header, a disabled footer at the
   new end; the space the moved blocks left is punched;
4. after an fsync the footers are enabled with the new size; the journal is
   committed and removed.

A kill at any point leaves a disabled VHD whose journal ``journal.revert`` undoes,
or (after step 4 began) a grown VHD that ``revert`` also takes back to its old
size.  An error during the edit reverts it at once, as blktap does.  Shrinking is
refused (blktap implements it for no dynamic image and loses data for fixed ones),
and so, as by blktap, are images another tool made.
"""

from __future__ import annotations

import errno
import os
from array import array

from ..paths import open_disk
from .edit import EditError
from .format import (
    BAT_UNUSED,
    DATA_ALIGN,
    FOOTER_SIZE,
    MAX_TABLE_ENTRIES,
    MAX_VIRTUAL_SIZE,
    PLAT_NONE,
    POISON_COOKIE,
    SECTOR,
    batmap_checksum,
    encode_geometry,
    has_batmap,
    pad_sector,
)
from .journal import Journal, is_block_device, revert, set_enabled, zero_range
from .meta import Metadata, bat_to_bytes, cut_to, load, read_at, write_at


def target_size(meta: Metadata, size: int, shrink_errno: int) -> int:
    """The size ``size`` bytes becomes: whole blocks for a dynamic image, as blktap rounds.
    Shrinking fails with ``shrink_errno`` (blktap's: EINVAL in place, ENOSYS journaled)."""
    if size <= 0 or size % SECTOR:
        raise EditError(f"{meta.path}: size {size} is not a positive multiple of 512")
    if meta.header is not None:
        bs = meta.header.block_size
        size = -(-size // bs) * bs
    if size > MAX_VIRTUAL_SIZE:
        raise EditError(f"{meta.path}: {size} bytes exceeds the VHD limit {MAX_VIRTUAL_SIZE}")
    if size < meta.footer.current_size:
        raise EditError(
            f"{meta.path}: cannot shrink from {meta.footer.current_size} to {size} bytes",
            shrink_errno,
        )
    return size


def _open(path: str) -> tuple[int, Metadata]:
    path = os.path.abspath(path)
    fd = open_disk(path, os.O_RDWR)
    try:
        meta = load(fd, path)
        if not meta.footer.is_tap:
            # qemu sizes its own VHDs by CHS geometry, which a new size would not match.
            raise EditError(f"{path} not created by xen; resize not supported")
        if meta.footer.cookie == POISON_COOKIE:
            raise EditError(f"{path} is disabled: an edit did not finish (vhd-util revert)")
        if meta.footer_recovered or meta.file_size % SECTOR:
            raise EditError(f"{path}: the trailing footer is damaged (vhd-util repair)")
        if meta.batmap_error:
            raise EditError(f"{path}: {meta.batmap_error} (vhd-util repair)")
    except BaseException:
        os.close(fd)
        raise
    return fd, meta


def resize_fast(path: str, size: int) -> None:
    """Grow without a journal: within the BAT entries reserved at create, or a fixed VHD."""
    fd, meta = _open(path)
    try:
        new = target_size(meta, size, errno.EINVAL)
        if new == meta.footer.current_size:
            return
        if meta.header is None:
            _grow_fixed(fd, meta, new)
        else:
            needed = -(-new // meta.header.block_size)
            if needed > meta.header.max_table_entries or needed > _batmap_room(meta):
                raise EditError(
                    f"{meta.path}: {new} bytes needs {needed} BAT entries, "
                    f"{meta.header.max_table_entries} are reserved "
                    "(create -S reserves more; resize -j moves data to make room)"
                )
            meta.footer.current_size = new
            meta.footer.geometry = encode_geometry(new)
            packed = meta.footer.pack()
            write_at(fd, packed, meta.file_size - FOOTER_SIZE)
            write_at(fd, packed, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _batmap_room(meta: Metadata) -> int:
    """Blocks the batmap can describe (unlimited without one)."""
    if not has_batmap(meta.footer) or meta.batmap_header is None:
        return MAX_TABLE_ENTRIES
    return meta.batmap_header.size_sectors * SECTOR * 8


def resize_journaled(path: str, size: int, journal_path: str) -> None:
    """Grow the virtual size to ``size`` bytes through an undo journal at ``journal_path``."""
    fd, meta = _open(path)
    try:
        new = target_size(meta, size, errno.ENOSYS)
        journal = Journal.create(journal_path, fd, meta)
        try:
            if new != meta.footer.current_size:
                set_enabled(fd, meta, meta.file_size - FOOTER_SIZE, enabled=False)
                os.fsync(fd)
                if meta.header is None:
                    footer_at = _grow_fixed(fd, meta, new)
                else:
                    footer_at = _grow_dynamic(fd, meta, new, journal)
                os.fsync(fd)
                set_enabled(fd, meta, footer_at, enabled=True)
                os.fsync(fd)
        except Exception as exc:
            journal.close()
            try:
                revert(meta.path, journal_path)
            except Exception as undo:
                exc.add_note(f"undoing it failed too ({undo}): vhd-util revert -j {journal_path}")
            raise
        journal.commit()
    finally:
        os.close(fd)


def _grow_fixed(fd: int, meta: Metadata, new: int) -> int:
    """Preallocate the new data, move the footer past it; returns the footer's offset."""
    if is_block_device(fd):
        raise EditError(f"{meta.path}: a fixed VHD on a block device cannot grow")
    old_at = meta.file_size - FOOTER_SIZE
    try:
        os.posix_fallocate(fd, old_at, new + FOOTER_SIZE - old_at)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
    meta.footer.current_size = new
    meta.footer.geometry = encode_geometry(new)
    # The new footer first: the file always ends in one; the old one becomes zeros.
    write_at(fd, meta.footer.pack(), new)
    write_at(fd, bytes(FOOTER_SIZE), old_at)
    return new


def _grow_dynamic(fd: int, meta: Metadata, new: int, journal: Journal) -> int:
    """Steps 2 and 3 of the module docstring; returns the trailing footer's offset."""
    h = meta.header
    assert h is not None and meta.bat is not None
    if meta.footer.data_offset > h.table_offset:
        raise EditError(f"{meta.path}: the header lies after the BAT; cannot grow the BAT")
    entries = max(h.max_table_entries, -(-new // h.block_size))
    if entries > MAX_TABLE_ENTRIES:
        raise EditError(f"{meta.path}: {entries} BAT entries exceed {MAX_TABLE_ENTRIES}")
    old_bat_end = h.table_offset + h.bat_bytes
    pos = h.table_offset + pad_sector(entries * 4)
    batmap = meta.batmap_header if has_batmap(meta.footer) else None
    map_at = map_sectors = 0
    if batmap is not None:
        map_sectors = max(batmap.size_sectors, pad_sector(-(-entries // 8)) // SECTOR)
        map_at = pos + SECTOR
        pos = map_at + map_sectors * SECTOR
    moved_locators: list[tuple[int, bytes]] = []
    for i, loc in sorted(enumerate(h.locators), key=lambda item: item[1].data_offset):
        if loc.code != PLAT_NONE and loc.data_offset >= old_bat_end:
            moved_locators.append((i, read_at(fd, loc.data_offset, loc.space_bytes)))
            loc.data_offset = pos
            pos += loc.space_bytes
    meta_end = pos

    span = meta.bitmap_size + h.block_size
    bat: array[int] = array("I", meta.bat)
    bat.extend([BAT_UNUSED] * (entries - len(bat)))
    in_the_way = sorted(
        (bat[b] * SECTOR, b)
        for b in range(len(bat))
        if bat[b] != BAT_UNUSED
        if bat[b] * SECTOR < meta_end
    )
    next_free = max(meta.data_end, pad_sector(meta_end))
    freed: list[tuple[int, int]] = []
    for start, b in in_the_way:
        dest = -(-(next_free + meta.bitmap_size) // DATA_ALIGN) * DATA_ALIGN - meta.bitmap_size
        journal.add_block(fd, bat[b], meta.bitmap_size, h.block_size)
        if dest > next_free:  # the alignment gap: no stale footer left in it
            zero_range(fd, next_free, dest - next_free)
        write_at(fd, read_at(fd, start, span), dest)
        bat[b] = dest // SECTOR
        next_free = dest + span
        freed.append((start, start + span))

    data_end = max([pad_sector(meta_end), *(e * SECTOR + span for e in bat if e != BAT_UNUSED)])
    raw_bat = bat_to_bytes(bat).ljust(pad_sector(entries * 4), b"\xff")
    write_at(fd, raw_bat, h.table_offset)
    if batmap is not None:
        assert meta.batmap is not None
        bmap = bytes(meta.batmap).ljust(map_sectors * SECTOR, b"\x00")
        batmap.offset, batmap.size_sectors = map_at, map_sectors
        batmap.checksum = batmap_checksum(bmap, new, batmap.version)
        write_at(fd, batmap.pack() + bmap, map_at - SECTOR)
    for i, data in moved_locators:
        write_at(fd, data, h.locators[i].data_offset)
    h.max_table_entries = entries
    write_at(fd, h.pack(), meta.footer.data_offset)

    meta.footer.current_size = new
    meta.footer.geometry = encode_geometry(new)
    if is_block_device(fd):
        footer_at = meta.file_size - FOOTER_SIZE
        if data_end > footer_at:
            raise EditError(f"{meta.path}: the volume is too small", errno.ENOSPC)
    else:
        footer_at = data_end
    write_at(fd, meta.footer.pack(), footer_at)
    cut_to(fd, footer_at + FOOTER_SIZE)
    for lo, hi in freed:
        lo = max(lo, meta_end)
        if hi > lo:
            zero_range(fd, lo, hi - lo)
    return footer_at
