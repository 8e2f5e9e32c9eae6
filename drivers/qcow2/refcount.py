"""Refcount table and blocks: lookup, cluster allocation, deferred frees, table growth.

Refcounts are kept in memory (blocks loaded on first use) and written back by
the image's flush in qemu's crash-safe order: blocks that count new clusters
reach disk before anything that references those clusters, and decrements are
held back (``free_later``) until the references to the freed clusters are gone
on disk, so the disk never shows a reference to a cluster counted 0.  The
refcount blocks and table enter the image's metadata map (``overlap``) as they
are placed, and a cluster leaves it when its count drops to 0; a cluster found
free that the map says holds metadata means the refcounts are damaged, and
nothing is allocated.
"""

from __future__ import annotations

from array import array

from ..base import ImageFormatError
from ..fileio import pread_full
from .format import MAX_REFTABLE_BYTES, REFT_OFFSET_MASK
from .overlap import REFCOUNT_BLOCK, REFCOUNT_TABLE, MetadataMap, Qcow2Corruption

_NARROW_CODE = {3: "B", 4: "H", 5: "I", 6: "Q"}


def decode_block(raw: bytes, order: int) -> array:
    """Refcount block bytes -> one int per cluster (big-endian, LSB-first sub-byte)."""
    if order >= 3:
        values = array(_NARROW_CODE[order], raw)
        if order > 3:
            values.byteswap()
        return array("Q", values)
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    table = [
        bytes((byte >> (bits * slot)) & mask for slot in range(per_byte)) for byte in range(256)
    ]
    return array("Q", array("B", b"".join([table[byte] for byte in raw])))


def encode_block(values: array, order: int) -> bytes:
    """Inverse of ``decode_block``."""
    if order >= 3:
        out = array(_NARROW_CODE[order], values)
        if order > 3:
            out.byteswap()
        return out.tobytes()
    bits = 1 << order
    per_byte = 8 // bits
    raw = bytearray(len(values) // per_byte)
    for slot in range(per_byte):
        shift = bits * slot
        for i, value in enumerate(values[slot::per_byte]):
            if value:
                raw[i] |= value << shift
    return bytes(raw)


def read_table(
    fd: int,
    path: str,
    cluster_bits: int,
    offset: int,
    clusters: int,
    file_size: int,
    meta: MetadataMap,
) -> array:
    """The refcount table at ``offset``, every entry checked; its blocks enter ``meta``, which
    they must not overlap."""
    cluster_size = 1 << cluster_bits
    raw = bytearray(clusters << cluster_bits)
    pread_full(fd, memoryview(raw), offset)
    table = array("Q", bytes(raw))
    table.byteswap()
    for block_index, entry in enumerate(table):
        if entry & ~REFT_OFFSET_MASK:
            raise ImageFormatError(
                f"{path}: refcount table entry {block_index} has reserved bits set"
            )
        off = entry & REFT_OFFSET_MASK
        if not off:
            continue
        if off % cluster_size:
            raise ImageFormatError(
                f"{path}: refcount table entry {block_index} ({off:#x}) is not cluster aligned"
            )
        if off + cluster_size > file_size:
            raise ImageFormatError(
                f"{path}: refcount table entry {block_index} ({off:#x}) lies past the end of file"
            )
        have = meta.get(off >> cluster_bits)
        if have is not None:
            raise ImageFormatError(
                f"{path}: refcount table entry {block_index} ({off:#x}) points at the {have} "
                "(refcount loop)"
            )
        meta[off >> cluster_bits] = REFCOUNT_BLOCK
    return table


class Refcounts:
    """In-memory refcounts of one image with write-back to its file.

    ``table`` is the refcount table as ``read_table`` returned it, ``meta`` the
    image's metadata map, which the refcount structures placed later join.
    """

    def __init__(
        self,
        fd: int,
        path: str,
        cluster_bits: int,
        order: int,
        table_offset: int,
        table: array,
        file_size: int,
        meta: MetadataMap,
    ) -> None:
        self.fd = fd
        self.path = path
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = order
        self.max_refcount = (1 << (1 << order)) - 1
        self.block_bits = cluster_bits + 3 - order
        self.table_offset = table_offset
        self.table_clusters = (len(table) * 8) >> cluster_bits
        self.table = table
        self.blocks: dict[int, array] = {}
        self.dirty_blocks: set[int] = set()
        self.dirty_entries: set[int] = set()
        #: The table moved (grew): write all of it and switch the header.
        self.table_moved = False
        self.pending_free: list[tuple[int, int]] = []
        self.hint = 0
        #: First cluster index above the file and every cluster handed out.
        self.top = -(-file_size // self.cluster_size)
        self.meta = meta

    # -- lookup ---------------------------------------------------------------------------

    def block(self, block_index: int) -> array | None:
        """The decoded refcount block for table index ``block_index``; None if unallocated."""
        block = self.blocks.get(block_index)
        if block is not None:
            return block
        if block_index >= len(self.table):
            return None
        off = self.table[block_index] & REFT_OFFSET_MASK
        if not off:
            return None
        raw = bytearray(self.cluster_size)
        pread_full(self.fd, memoryview(raw), off)
        block = self.blocks[block_index] = decode_block(bytes(raw), self.order)
        return block

    def get(self, cluster: int) -> int:
        """Refcount of host cluster index ``cluster``."""
        block = self.block(cluster >> self.block_bits)
        if block is None:
            return 0
        return block[cluster & ((1 << self.block_bits) - 1)]

    def change(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to a cluster's refcount (its block must exist); returns the result."""
        block_index = cluster >> self.block_bits
        block = self.block(block_index)
        if block is None:
            raise Qcow2Corruption(
                f"{self.path}: cluster {cluster} has no refcount block "
                f"(refcount table entry {block_index})"
            )
        i = cluster & ((1 << self.block_bits) - 1)
        value = block[i] + delta
        if value < 0:
            raise Qcow2Corruption(f"{self.path}: refcount of cluster {cluster} would drop below 0")
        if value > self.max_refcount:
            raise Qcow2Corruption(f"{self.path}: refcount of cluster {cluster} would overflow")
        block[i] = value
        self.dirty_blocks.add(block_index)
        if value == 0 and cluster < self.hint:
            self.hint = cluster
        return value

    # -- allocation -----------------------------------------------------------------------

    def _find_free(self, start: int, count: int) -> int:
        """First run of ``count`` clusters counted 0 at or after ``start``."""
        per_block = 1 << self.block_bits
        run_start = cluster = max(start, 1)
        while cluster - run_start < count:
            block_index = cluster >> self.block_bits
            block = self.block(block_index)
            if block is None:
                cluster = (block_index + 1) * per_block
                continue
            i = cluster & (per_block - 1)
            if block[i]:
                try:
                    i = block.index(0, i)
                except ValueError:
                    cluster = run_start = (block_index + 1) * per_block
                    continue
                cluster = run_start = block_index * per_block + i
                continue
            cluster += 1
        return run_start

    def alloc(self, count: int = 1) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1); returns the first index.

        Raises Qcow2Corruption, having changed nothing, when a cluster counted free
        holds metadata.
        """
        while True:
            start = self._find_free(self.hint, count)
            for cluster in range(start, start + count):
                have = self.meta.get(cluster)
                if have is not None:
                    raise Qcow2Corruption(
                        f"{self.path}: cluster {cluster} is counted free but holds the {have}; "
                        "refusing to allocate it"
                    )
            missing = None
            for block_index in range(
                start >> self.block_bits, ((start + count - 1) >> self.block_bits) + 1
            ):
                if block_index >= len(self.table) or not self.table[block_index]:
                    missing = block_index
                    break
            if missing is None:
                for cluster in range(start, start + count):
                    self.change(cluster, 1)
                self.hint = start + count
                self.top = max(self.top, start + count)
                return start
            if missing >= len(self.table):
                self._grow_table(missing + 1)
                continue
            self._new_block(missing, start)

    def _new_block(self, block_index: int, cluster: int) -> None:
        """Put a new, empty refcount block for range ``block_index`` at host cluster ``cluster``."""
        self.blocks[block_index] = array("Q", bytes(8 << self.block_bits))
        self.table[block_index] = cluster << self.cluster_bits
        self.dirty_entries.add(block_index)
        self.dirty_blocks.add(block_index)
        self.meta[cluster] = REFCOUNT_BLOCK
        self.top = max(self.top, cluster + 1)
        self.change(cluster, 1)

    def _grow_table(self, min_entries: int) -> None:
        """Move the table to the end of the image with room for ``min_entries`` blocks.

        The new table and any refcount blocks needed to count it are placed at
        the top of the image, where every cluster is free; the header switch
        happens at the next flush, after the new table is on disk.
        """
        per_cluster = self.cluster_size // 8
        entries = max(min_entries, len(self.table) * 3 // 2)
        top = self.top
        while True:
            tclusters = -(-entries // per_cluster)
            new_blocks = 0
            while True:
                last = top + new_blocks + tclusters - 1
                needed = [
                    block_index
                    for block_index in range(top >> self.block_bits, (last >> self.block_bits) + 1)
                    if block_index >= len(self.table) or not self.table[block_index]
                ]
                if len(needed) == new_blocks:
                    break
                new_blocks = len(needed)
            if ((top + new_blocks + tclusters - 1) >> self.block_bits) < tclusters * per_cluster:
                break
            entries = tclusters * per_cluster * 2
        if tclusters << self.cluster_bits > MAX_REFTABLE_BYTES:
            raise OSError(28, f"{self.path}: refcount table would exceed its 8 MiB limit")
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table.extend([0] * (tclusters * per_cluster - len(self.table)))
        for i, block_index in enumerate(needed):
            cluster = top + i
            self.blocks[block_index] = array("Q", bytes(8 << self.block_bits))
            self.table[block_index] = cluster << self.cluster_bits
            self.dirty_blocks.add(block_index)
            self.meta[cluster] = REFCOUNT_BLOCK
        self.table_offset = (top + new_blocks) << self.cluster_bits
        self.table_clusters = tclusters
        self.table_moved = True
        self.top = top + new_blocks + tclusters
        for c in range(top, top + new_blocks + tclusters):
            self.change(c, 1)
        for c in range(top + new_blocks, top + new_blocks + tclusters):
            self.meta[c] = REFCOUNT_TABLE
        self.free_later(old_offset >> self.cluster_bits, old_clusters)

    def free_later(self, cluster: int, count: int = 1) -> None:
        """Drop refcounts once the references to these clusters are gone on disk."""
        self.pending_free.append((cluster, count))

    def apply_frees(self) -> bool:
        """Apply the held-back decrements; True if there were any.

        A cluster counted 0 holds nothing any more: it leaves the metadata map.
        """
        if not self.pending_free:
            return False
        pending, self.pending_free = self.pending_free, []
        for cluster, count in pending:
            for c in range(cluster, cluster + count):
                if not self.change(c, -1):
                    self.meta.pop(c, None)
        return True

    # -- write-back -----------------------------------------------------------------------

    def dirty_block_writes(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) for every dirty block; marks them clean."""
        out = [
            (
                self.table[block_index] & REFT_OFFSET_MASK,
                encode_block(self.blocks[block_index], self.order),
            )
            for block_index in sorted(self.dirty_blocks)
        ]
        self.dirty_blocks.clear()
        return out

    def table_writes(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) of the changed table entries, or the whole moved table."""
        if self.table_moved:
            data = array("Q", self.table)
            data.byteswap()
            self.dirty_entries.clear()
            return [(self.table_offset, data.tobytes())]
        out = [
            (self.table_offset + 8 * block_index, self.table[block_index].to_bytes(8, "big"))
            for block_index in sorted(self.dirty_entries)
        ]
        self.dirty_entries.clear()
        return out
