"""Two-level cluster tables as QCOW v1 and QCOW2 share them.

What a guest lookup finds (the kinds below), the big-endian table codec, and
the L2 table cache.  A table is held as an ``array('Q')`` of native integers
(two per guest cluster with QCOW2's extended L2: the entry, then the
subcluster bitmap).  The cache keeps clean tables in LRU order and pins dirty
ones until the image's flush writes them back, so a write never has to wait
for metadata I/O of its own.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

#: Kinds of guest byte ranges.
DATA = 0  # host data at a known offset
ZERO = 1  # reads as zeros
BACKING = 2  # not allocated here: backing file, or zeros
COMPRESSED = 3  # a compressed cluster (the value is the raw L2 entry)


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
