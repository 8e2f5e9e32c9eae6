"""Consistency check and refcount rebuild, the way ``qemu-img check`` sees an image.

``references`` walks every structure that owns host clusters (header, active
and snapshot L1/L2 tables and their data, the snapshot table, the refcount
structures, bitmaps) and counts the references to each cluster.  ``check``
compares that with the stored refcounts; ``rebuild_refcounts`` writes fresh
refcount structures at the end of the file (used for dirty images on a
read-write open, as qemu does) and fixes the COPIED flags of the active tables.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field

from ..base import ImageFormatError
from ..fileio import ImageFile, pread_full, pwrite_full
from ..l2tables import decode_table, encode_table
from .format import (
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    parse_snapshots,
)
from .metadata import Qcow2Metadata
from .overlap import MetadataMap
from .refcount import Refcounts, encode_block, read_table

BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")


@dataclass
class CheckResult:
    """What a check found; ``corruptions`` and ``leaks`` hold readable messages."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    allocated_clusters: int = 0
    total_clusters: int = 0
    image_end_offset: int = 0

    @property
    def exit_code(self) -> int:
        """qemu-img's convention: 0 clean, 2 corrupt, 3 leaks only."""
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0


class _Walker:
    def __init__(self, image: Qcow2Metadata) -> None:
        self.image = image
        self.fd = image.file.fd
        self.cluster_size = image.cluster_size
        self.cluster_bits = image.cluster_bits
        self.file_size = os.fstat(self.fd).st_size
        self.refs: dict[int, int] = {}
        self.errors: list[str] = []

    def add(self, offset: int, length: int, what: str) -> None:
        if offset + length > self.file_size + self.cluster_size:
            self.errors.append(f"{what} at {offset:#x} lies past the end of file")
            return
        for cluster in range(
            offset >> self.cluster_bits, ((offset + max(length, 1) - 1) >> self.cluster_bits) + 1
        ):
            self.refs[cluster] = self.refs.get(cluster, 0) + 1

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        pread_full(self.fd, memoryview(buf), offset)
        return bytes(buf)

    def walk_l1(self, l1: array, what: str) -> None:
        image = self.image
        step = 2 if image.extended_l2 else 1
        for i, l1_entry in enumerate(l1):
            off = l1_entry & L1E_OFFSET_MASK
            if not off:
                continue
            if off % self.cluster_size:
                self.errors.append(f"{what} entry {i}: L2 table {off:#x} is not cluster aligned")
                continue
            self.add(off, self.cluster_size, f"{what} L2 table")
            table = decode_table(self.read(off, self.cluster_size))
            for j in range(0, len(table), step):
                entry = table[j]
                if entry & OFLAG_COMPRESSED:
                    coffset, csize = image.compressed_span(entry)
                    start = coffset & ~511
                    self.add(start, (coffset - start) + csize, "compressed cluster")
                    continue
                host = entry & L2E_OFFSET_MASK
                if not host:
                    continue
                if host % self.cluster_size:
                    self.errors.append(f"{what} L2 {off:#x} entry {j}: data {host:#x} unaligned")
                    continue
                self.add(host, self.cluster_size, "data cluster")

    def walk_bitmaps(self) -> None:
        bitmaps = self.image.ext.bitmaps
        if not bitmaps:
            return
        count, dsize, doff = bitmaps
        self.add(doff, dsize, "bitmap directory")
        raw = self.read(doff, dsize)
        pos = 0
        for _ in range(count):
            if pos + BITMAP_DIR_ENTRY.size > len(raw):
                self.errors.append("bitmap directory is truncated")
                return
            toff, tsize, _flags, _type, _granularity, name_len, extra = (
                BITMAP_DIR_ENTRY.unpack_from(raw, pos)
            )
            pos += BITMAP_DIR_ENTRY.size + extra + name_len
            pos += -pos % 8
            self.add(toff, tsize * 8, "bitmap table")
            table = decode_table(self.read(toff, tsize * 8))
            for entry in table:
                if entry & L2E_OFFSET_MASK:
                    self.add(entry & L2E_OFFSET_MASK, self.cluster_size, "bitmap data")


def references(
    image: Qcow2Metadata, include_refcounts: bool = True
) -> tuple[dict[int, int], list[str]]:
    """Count references to every host cluster; also return structural errors."""
    walker = _Walker(image)
    header = image.header
    walker.add(0, walker.cluster_size, "header")
    walker.add(header.l1_table_offset, header.l1_size * 8, "L1 table")
    walker.walk_l1(image.l1, "active L1")
    if image.snapshots:
        walker.add(header.snapshots_offset, _snapshot_table_length(image), "snapshot table")
        for snap in image.snapshots:
            walker.add(snap.l1_table_offset, snap.l1_size * 8, f"snapshot {snap.id} L1")
            l1 = decode_table(walker.read(snap.l1_table_offset, snap.l1_size * 8))
            walker.walk_l1(l1, f"snapshot {snap.id} L1")
    walker.walk_bitmaps()
    if include_refcounts:
        walker.add(
            header.refcount_table_offset,
            header.refcount_table_clusters * walker.cluster_size,
            "refcount table",
        )
        refcounts = _stored_refcounts(image)
        for block_index, entry in enumerate(refcounts.table):
            if entry:
                walker.add(entry, walker.cluster_size, f"refcount block {block_index}")
    return walker.refs, walker.errors


def _snapshot_table_length(image: Qcow2Metadata) -> int:
    header = image.header
    size = os.fstat(image.file.fd).st_size
    limit = min(size - header.snapshots_offset, header.nb_snapshots * 2048 + 65536)
    buf = bytearray(limit)
    pread_full(image.file.fd, memoryview(buf), header.snapshots_offset)
    return parse_snapshots(bytes(buf), header.nb_snapshots, image.path)[1]


def _stored_refcounts(image: Qcow2Metadata) -> Refcounts:
    header = image.header
    fd = image.file.fd
    file_size = os.fstat(fd).st_size
    meta: MetadataMap = {}  # a map of its own: the check reads the refcounts, allocates nothing
    table = read_table(
        fd,
        image.path,
        header.cluster_bits,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        file_size,
        meta,
    )
    return Refcounts(
        fd,
        image.path,
        header.cluster_bits,
        header.refcount_order,
        header.refcount_table_offset,
        table,
        file_size,
        meta,
    )


def check(image: Qcow2Metadata) -> CheckResult:
    """Compare stored refcounts with counted references (like ``qemu-img check``)."""
    refs, errors = references(image)
    result = CheckResult(corruptions=list(errors))
    refcounts = _stored_refcounts(image)
    stored: dict[int, int] = {}
    for block_index, entry in enumerate(refcounts.table):
        if not entry:
            continue
        block = refcounts.block(block_index)
        assert block is not None
        base = block_index << refcounts.block_bits
        for i, value in enumerate(block):
            if value:
                stored[base + i] = value
    for cluster in sorted(set(refs) | set(stored)):
        want, have = refs.get(cluster, 0), stored.get(cluster, 0)
        if have < want:
            result.corruptions.append(f"ERROR cluster {cluster} refcount={have} reference={want}")
        elif have > want:
            result.leaks.append(f"Leaked cluster {cluster} refcount={have} reference={want}")
    for i, l1_entry in enumerate(image.l1):
        off = l1_entry & L1E_OFFSET_MASK
        if not off:
            continue
        if bool(l1_entry & OFLAG_COPIED) != (stored.get(off >> refcounts.cluster_bits, 0) == 1):
            result.corruptions.append(f"ERROR OFLAG_COPIED L1 entry {i}: L2 table {off:#x}")
    file_size = os.fstat(image.file.fd).st_size
    result.total_clusters = -(-image.size // image.cluster_size)
    result.allocated_clusters = sum(1 for cluster in refs if cluster)
    result.image_end_offset = max(file_size, (max(refs) + 1) * image.cluster_size if refs else 0)
    return result


def rebuild_refcounts(image: Qcow2Metadata) -> None:
    """Write new refcount structures matching the references, and switch the header to them."""
    refs, errors = references(image, include_refcounts=False)
    if errors:
        raise ImageFormatError(f"{image.path}: cannot repair refcounts: {errors[0]}")
    header = image.header
    cluster_size = image.cluster_size
    cluster_bits = image.cluster_bits
    order = header.refcount_order
    block_bits = cluster_bits + 3 - order
    file_size = os.fstat(image.file.fd).st_size
    top = max(-(-file_size // cluster_size), max(refs) + 1)
    # New blocks + table at ``top``; grow until they cover everything including themselves.
    nblocks = tclusters = 1
    while True:
        end = top + nblocks + tclusters
        need_blocks = ((end - 1) >> block_bits) + 1
        need_table = -(-need_blocks * 8 // cluster_size)
        if need_blocks <= nblocks and need_table <= tclusters:
            break
        nblocks, tclusters = max(nblocks, need_blocks), max(tclusters, need_table)
    for cluster in range(top, top + nblocks + tclusters):
        refs[cluster] = refs.get(cluster, 0) + 1
    table = array("Q", bytes(tclusters * cluster_size))
    fd = image.file.fd
    per_block = 1 << block_bits
    for block_index in range(nblocks):
        block = array("Q", bytes(8 * per_block))
        base = block_index * per_block
        for cluster, value in refs.items():
            if base <= cluster < base + per_block:
                block[cluster - base] = value
        block_off = (top + block_index) << cluster_bits
        table[block_index] = block_off
        pwrite_full(fd, memoryview(encode_block(block, order)), block_off)
    table_off = (top + nblocks) << cluster_bits
    pwrite_full(fd, memoryview(encode_table(table)), table_off)
    os.fdatasync(fd)
    header.refcount_table_offset = table_off
    header.refcount_table_clusters = tclusters
    pwrite_full(fd, memoryview(header.pack()), 0)
    os.fdatasync(fd)
    _fix_copied(image, refs)


def _fix_copied(image: Qcow2Metadata, refs: dict[int, int]) -> None:
    """Make COPIED flags of the active L1 and L2 tables say exactly "refcount is 1"."""
    fd = image.file.fd
    cluster_bits = image.cluster_bits
    step = 2 if image.extended_l2 else 1
    for i, l1_entry in enumerate(image.l1):
        off = l1_entry & L1E_OFFSET_MASK
        if not off:
            continue
        raw = bytearray(image.cluster_size)
        pread_full(fd, memoryview(raw), off)
        table = decode_table(raw)
        changed = False
        for j in range(0, len(table), step):
            entry = table[j]
            host = entry & L2E_OFFSET_MASK
            if entry & OFLAG_COMPRESSED or not host:
                continue
            want = refs.get(host >> cluster_bits, 0) == 1
            if bool(entry & OFLAG_COPIED) != want:
                table[j] = (entry | OFLAG_COPIED) if want else (entry & ~OFLAG_COPIED)
                changed = True
        if changed:
            pwrite_full(fd, memoryview(encode_table(table)), off)
            image.l2cache.forget(off)
        want = refs.get(off >> cluster_bits, 0) == 1
        if bool(l1_entry & OFLAG_COPIED) != want:
            image.l1[i] = (l1_entry | OFLAG_COPIED) if want else (l1_entry & ~OFLAG_COPIED)
            pwrite_full(
                fd, memoryview(image.l1[i].to_bytes(8, "big")), image.header.l1_table_offset + 8 * i
            )
    os.fdatasync(fd)


class _RepairTarget(Qcow2Metadata):
    """A qcow2 file opened only to rebuild its refcounts: writable even with the corrupt bit
    set or refcounts that a read-write open of the image refuses, which is what a repair is for.
    """

    repairing = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.read_only = False
        self.refcounts = None
        self.file = ImageFile(path, writable=True)
        try:
            self._read_metadata()
        except BaseException:
            self.file.close()
            raise


def repair(path: str) -> None:
    """Rebuild the refcounts of the qcow2 file at ``path`` and clear its corrupt bit.

    The bit goes with the header write that switches to the new refcounts, so a repair cut
    short leaves the image marked corrupt on its old refcounts.
    """
    target = _RepairTarget(path)
    try:
        target.header.incompatible_features &= ~INCOMPAT_CORRUPT
        rebuild_refcounts(target)
    finally:
        target.file.close()
