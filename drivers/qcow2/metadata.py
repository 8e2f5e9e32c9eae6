"""The metadata of an open qcow2 file in memory, and guest offsets looked up through it.

``Qcow2Metadata`` reads and checks the header, its extensions, the snapshot
table, the L1 and refcount tables at open, records which clusters hold
metadata (``overlap``: no guest data may lie in one, the internal snapshots'
tables included), loads the refcounts for a read-write open and checks them
against that, and loads L2 tables on demand into the shared ``L2Cache``.  ``_map_cached`` is the
lookup every read, write and block-status answer starts from: what a guest
range is (``l2tables`` kinds) and where its data lies, never in a metadata
cluster.  It holds no guest I/O:
``allocate`` builds the write path on it and ``image`` the ``Image``; ``check``
works on it alone.
"""

from __future__ import annotations

import os
from array import array

from ..base import ImageFormatError
from ..fileio import ImageFile, pread_full
from ..l2tables import BACKING, COMPRESSED, DATA, L2Cache, decode_table
from .cluster import classify, classify_ext
from .format import (
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    Extensions,
    Header,
    Snapshot,
    parse_extensions,
    parse_snapshots,
)
from .overlap import (
    ACTIVE_L1,
    HEADER,
    L2_TABLE,
    REFCOUNT_BLOCK,
    REFCOUNT_TABLE,
    SNAPSHOT_L1,
    SNAPSHOT_L2,
    SNAPSHOT_TABLE,
    MetadataMap,
    Qcow2Corruption,
    check_refcounts,
    claim,
    claim_l2,
)
from .refcount import Refcounts, read_table

#: Memory given to cached L2 tables (qemu's default on Linux is 32 MiB).
L2_CACHE_BYTES = 32 << 20


class Qcow2Metadata:
    """The header, tables and geometry of one qcow2 file, checked as they are read.

    The image sets ``path``, ``read_only`` and ``file`` before ``_read_metadata``
    runs, and ``refcounts`` after it (read-write opens only).
    """

    path: str
    read_only: bool
    file: ImageFile
    refcounts: Refcounts | None
    #: Opened by ``check.repair``, which may write to an image marked corrupt.
    repairing: bool = False

    def _read_metadata(self) -> None:
        """Read and check the header, extensions, snapshot table and L1 table (open time)."""
        fd = self.file.fd
        file_size = os.fstat(fd).st_size
        probe = bytearray(min(file_size, 4096))
        pread_full(fd, memoryview(probe), 0)
        header = Header.unpack(bytes(probe))
        header.validate(self.path, file_size)
        cluster_size = header.cluster_size
        cluster0 = bytearray(min(cluster_size, file_size))
        pread_full(fd, memoryview(cluster0), 0)
        self.header = header
        self.ext: Extensions = parse_extensions(bytes(cluster0), header, self.path)
        if self.ext.data_file is not None:
            raise ImageFormatError(f"{self.path}: external data files are not supported")
        if header.incompatible_features & INCOMPAT_CORRUPT and not (
            self.read_only or self.repairing
        ):
            raise ImageFormatError(
                f"{self.path}: incompatible_features has the corrupt bit set; "
                "open read-only, or repair the image first"
            )
        self.backing_name: str | None = None
        if header.backing_file_offset:
            raw = cluster0[
                header.backing_file_offset : header.backing_file_offset + header.backing_file_size
            ]
            self.backing_name = bytes(raw).decode("utf-8", "replace")
        self.size = header.size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cluster_size
        self.l2_bits = header.l2_bits
        self.extended_l2 = header.extended_l2
        self.v3 = header.version >= 3
        self.csize_shift = 62 - (header.cluster_bits - 8)
        self.csize_mask = (1 << (header.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self._cluster_mask = cluster_size - 1
        self._l1_shift = header.cluster_bits + header.l2_bits
        self._l2_mask = (1 << header.l2_bits) - 1

        # Clusters that hold metadata (``overlap``): a guest write must never land in one.
        self.meta: MetadataMap = {0: HEADER}
        self._claim(header.l1_table_offset, header.l1_size * 8, ACTIVE_L1, "l1_table_offset")
        self._claim(
            header.refcount_table_offset,
            header.refcount_table_clusters * cluster_size,
            REFCOUNT_TABLE,
            "refcount_table_offset",
        )
        self.snapshots: list[Snapshot] = []
        if header.nb_snapshots:
            limit = min(file_size - header.snapshots_offset, header.nb_snapshots * 2048 + 65536)
            raw_snap = bytearray(limit)
            pread_full(fd, memoryview(raw_snap), header.snapshots_offset)
            self.snapshots, length = parse_snapshots(
                bytes(raw_snap), header.nb_snapshots, self.path
            )
            self._claim(header.snapshots_offset, length, SNAPSHOT_TABLE, "snapshots_offset")

        raw_l1 = bytearray(header.l1_size * 8)
        pread_full(fd, memoryview(raw_l1), header.l1_table_offset)
        self.l1 = decode_table(raw_l1)
        for i, entry in enumerate(self.l1):
            off = entry & L1E_OFFSET_MASK
            if entry & 0x7F000000000001FF:
                raise ImageFormatError(f"{self.path}: L1 entry {i} has reserved bits set")
            if not off:
                continue
            if off % cluster_size:
                raise ImageFormatError(
                    f"{self.path}: L1 entry {i} ({off:#x}) is not cluster aligned"
                )
            if off + cluster_size > file_size:
                raise ImageFormatError(
                    f"{self.path}: L1 entry {i} ({off:#x}) lies past end of file"
                )
            if off >> self.cluster_bits in self.meta:
                raise ImageFormatError(
                    f"{self.path}: L1 entry {i} ({off:#x}) points at other metadata "
                    "(header, L1 or refcount table)"
                )
        for entry in self.l1:
            if entry & L1E_OFFSET_MASK:
                self.meta[(entry & L1E_OFFSET_MASK) >> self.cluster_bits] = L2_TABLE
        for snap in self.snapshots:
            self._claim_snapshot_tables(snap, file_size)
        self.reftable = read_table(
            fd,
            self.path,
            self.cluster_bits,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            file_size,
            self.meta,
        )
        self.l1_dirty: set[int] = set()
        self.l2cache = L2Cache(L2_CACHE_BYTES // cluster_size)

    def _claim(self, offset: int, length: int, kind: str, field: str) -> None:
        """Record a metadata table's clusters, refusing overlap with earlier ones."""
        claim(self.meta, offset, length, kind, f"{self.path}: {field}", self.cluster_bits)

    def _claim_snapshot_tables(self, snap: Snapshot, file_size: int) -> None:
        """Record an internal snapshot's L1 table and the L2 tables it names; they may be
        shared with the active ones."""
        what = f"snapshot {snap.id} l1_table_offset"
        length = snap.l1_size * 8
        self.header.check_table(what, snap.l1_table_offset, length, self.path, file_size)
        self._claim(snap.l1_table_offset, length, SNAPSHOT_L1, what)
        raw = bytearray(length)
        pread_full(self.file.fd, memoryview(raw), snap.l1_table_offset)
        for i, entry in enumerate(decode_table(raw)):
            off = entry & L1E_OFFSET_MASK
            if not off:
                continue
            if off % self.cluster_size or off + self.cluster_size > file_size:
                raise ImageFormatError(
                    f"{self.path}: snapshot {snap.id} L1 entry {i} ({off:#x}) is not cluster "
                    "aligned or lies past the end of file"
                )
            claim_l2(
                self.meta,
                off >> self.cluster_bits,
                SNAPSHOT_L2,
                self.path,
                f"snapshot {snap.id} L1 entry {i}",
            )

    def _refcounts_rebuilt(self) -> None:
        """The refcount structures were rebuilt elsewhere: the map follows the header to them."""
        meta = self.meta
        for cluster in [c for c, kind in meta.items() if kind in (REFCOUNT_TABLE, REFCOUNT_BLOCK)]:
            del meta[cluster]
        header = self.header
        self._claim(
            header.refcount_table_offset,
            header.refcount_table_clusters * self.cluster_size,
            REFCOUNT_TABLE,
            "refcount_table_offset",
        )
        self.reftable = read_table(
            self.file.fd,
            self.path,
            self.cluster_bits,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            os.fstat(self.file.fd).st_size,
            meta,
        )

    def _load_refcounts(self) -> Refcounts:
        """The refcounts, checked against the metadata map (``overlap.check_refcounts``)."""
        header = self.header
        refcounts = Refcounts(
            self.file.fd,
            self.path,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            self.reftable,
            os.fstat(self.file.fd).st_size,
            self.meta,
        )
        check_refcounts(self.meta, refcounts, self.l1, self.cluster_bits, self.path)
        return refcounts

    def _where(self, guest_cluster: int) -> str:
        return f"{self.path}: guest cluster {guest_cluster}"

    def _check_not_metadata(self, host: int, guest_cluster: int) -> None:
        """Refuse an L2 entry whose data would lie in a metadata cluster (reads and writes)."""
        kind = self.meta.get(host >> self.cluster_bits)
        if kind is not None:
            raise Qcow2Corruption(
                f"{self._where(guest_cluster)}: its L2 entry points at the {kind} "
                f"(cluster {host >> self.cluster_bits})"
            )

    def load_l2_sync(self, offset: int) -> array:
        """An L2 table from the cache or, blocking, from disk (tools and checks)."""
        table = self.l2cache.get(offset)
        if table is None:
            raw = bytearray(self.cluster_size)
            pread_full(self.file.fd, memoryview(raw), offset)
            table = self.l2cache.put(offset, decode_table(raw))
        return table

    async def _load_l2(self, offset: int) -> array:
        table = self.l2cache.get(offset)
        if table is None:
            raw = bytearray(self.cluster_size)
            await self.file.read(offset, memoryview(raw))
            table = self.l2cache.put(offset, decode_table(raw))
        return table

    def _map_cached(self, off: int, maxlen: int) -> tuple[int, int, int] | None:
        """(kind, host offset or entry, run length) at guest ``off``; None if L2 not cached."""
        cluster_bits = self.cluster_bits
        guest_cluster = off >> cluster_bits
        within = off & (self.cluster_size - 1)
        run = self.cluster_size - within
        if run > maxlen:
            run = maxlen
        l2_bits = self.l2_bits
        l1_index = guest_cluster >> l2_bits
        l2off = self.l1[l1_index] & L1E_OFFSET_MASK if l1_index < len(self.l1) else 0
        if not l2off:
            span_end = (l1_index + 1) << (l2_bits + cluster_bits)
            return BACKING, 0, min(maxlen, span_end - off)
        table = self.l2cache.tables.get(l2off)
        if table is None:
            return None
        idx = guest_cluster & ((1 << l2_bits) - 1)
        if self.extended_l2:
            mapping = classify_ext(
                table[2 * idx],
                table[2 * idx + 1],
                within,
                run,
                self.cluster_size,
                self._where(guest_cluster),
            )
            if mapping[0] == DATA:
                self._check_not_metadata(mapping[1], guest_cluster)
            return mapping
        kind, val, run = classify(table[idx], within, run, self.cluster_size, self.v3, self.path)
        if kind == DATA:
            self._check_not_metadata(val, guest_cluster)
        if run == maxlen or kind == COMPRESSED:
            return kind, val, run
        # Merge following clusters of the same kind (contiguous on the host for data).
        next_host = val - within + self.cluster_size
        last = len(table)
        idx += 1
        while run < maxlen and idx < last:
            entry = table[idx]
            next_kind, next_value, next_run = classify(
                entry,
                0,
                min(self.cluster_size, maxlen - run),
                self.cluster_size,
                self.v3,
                self.path,
            )
            if next_kind != kind or (kind == DATA and next_value != next_host):
                break
            if kind == DATA:
                self._check_not_metadata(next_host, guest_cluster)
            run += next_run
            next_host += self.cluster_size
            idx += 1
        return kind, val, run

    async def _map(self, off: int, maxlen: int) -> tuple[int, int, int]:
        mapping = self._map_cached(off, maxlen)
        while mapping is None:
            guest_cluster = off >> self.cluster_bits
            await self._load_l2(self.l1[guest_cluster >> self.l2_bits] & L1E_OFFSET_MASK)
            mapping = self._map_cached(off, maxlen)
        return mapping

    def compressed_span(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte length) of a compressed cluster's data."""
        coffset = entry & self.coffset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, sectors * 512 - (coffset & 511)
