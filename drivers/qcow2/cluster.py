"""Guest-to-host mapping: L2 entry decoding and the L2 table cache.

An L2 table is held as an ``array('Q')`` of native integers (two per guest
cluster with extended L2: the entry, then the subcluster bitmap).  The cache
keeps clean tables in LRU order and pins dirty ones until the image's flush
writes them back, so a write never has to wait for metadata I/O of its own.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from ..base import ImageFormatError
from .format import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO

#: Kinds of guest byte ranges.
DATA = 0  # host data at a known offset
ZERO = 1  # reads as zeros
BACKING = 2  # not allocated here: backing file, or zeros
COMPRESSED = 3  # a compressed cluster (the value is the raw L2 entry)

STD_RESERVED = 0x3F000000000001FE
EXT_RESERVED = 0x3F000000000001FF


def decode_table(raw: bytes | bytearray | memoryview) -> array:
    """Big-endian table bytes -> array of native ints."""
    table = array("Q", raw)
    table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    """Inverse of ``decode_table``."""
    out = array("Q", table)
    out.byteswap()
    return out.tobytes()


def classify(
    entry: int, within: int, length: int, cluster_size: int, v3: bool, where: str
) -> tuple[int, int, int]:
    """Decode a standard L2 entry for ``length`` bytes at ``within`` in its cluster.

    Returns (kind, host offset or raw entry, length).
    """
    if entry & OFLAG_COMPRESSED:
        if entry & OFLAG_COPIED:
            raise ImageFormatError(f"{where}: compressed L2 entry has the COPIED flag")
        return COMPRESSED, entry, length
    if entry & STD_RESERVED:
        raise ImageFormatError(f"{where}: L2 entry {entry:#x} has reserved bits set")
    off = entry & L2E_OFFSET_MASK
    if off & (cluster_size - 1):
        raise ImageFormatError(f"{where}: L2 entry {entry:#x} is not cluster aligned")
    if entry & OFLAG_ZERO:
        if not v3:
            raise ImageFormatError(f"{where}: L2 entry has the zero flag in a version 2 image")
        return ZERO, 0, length
    if not off:
        return BACKING, 0, length
    return DATA, off + within, length


def classify_ext(
    entry: int, bitmap: int, within: int, length: int, cluster_size: int, where: str
) -> tuple[int, int, int]:
    """Decode an extended L2 entry: the run of like subclusters from ``within``."""
    if entry & OFLAG_COMPRESSED:
        if entry & OFLAG_COPIED:
            raise ImageFormatError(f"{where}: compressed L2 entry has the COPIED flag")
        return COMPRESSED, entry, length
    if entry & EXT_RESERVED:
        raise ImageFormatError(f"{where}: extended L2 entry {entry:#x} has reserved bits set")
    alloc = bitmap & 0xFFFFFFFF
    zero = bitmap >> 32
    if alloc & zero:
        raise ImageFormatError(f"{where}: subcluster bitmap {bitmap:#x} is both zero and allocated")
    off = entry & L2E_OFFSET_MASK
    if off & (cluster_size - 1):
        raise ImageFormatError(f"{where}: L2 entry {entry:#x} is not cluster aligned")
    if alloc and not off:
        raise ImageFormatError(f"{where}: subclusters allocated in an unallocated cluster")
    sc_size = cluster_size >> 5
    sub = within // sc_size

    def state(i: int) -> int:
        if (alloc >> i) & 1:
            return DATA
        if (zero >> i) & 1:
            return ZERO
        return BACKING

    kind = state(sub)
    end_sub = sub + 1
    while end_sub < 32 and end_sub * sc_size < within + length and state(end_sub) == kind:
        end_sub += 1
    run = min(length, end_sub * sc_size - within)
    return kind, (off + within if kind == DATA else 0), run


class L2Cache:
    """L2 tables by host offset: LRU for clean tables, dirty ones pinned."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 4)
        self.tables: OrderedDict[int, array] = OrderedDict()
        self.dirty: set[int] = set()

    def get(self, offset: int) -> array | None:
        return self.tables.get(offset)

    def put(self, offset: int, table: array, dirty: bool = False) -> array:
        """Insert unless present (the cached copy may be newer than disk); return the cached."""
        have = self.tables.get(offset)
        if have is not None:
            return have
        self.tables[offset] = table
        if dirty:
            self.dirty.add(offset)
        self._evict()
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def _evict(self) -> None:
        if len(self.tables) <= self.capacity:
            return
        for off in list(self.tables):
            if len(self.tables) <= self.capacity:
                break
            if off not in self.dirty:
                del self.tables[off]

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) of every dirty table; marks them clean."""
        out = [(off, encode_table(self.tables[off])) for off in sorted(self.dirty)]
        self.dirty.clear()
        self._evict()
        return out

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)
