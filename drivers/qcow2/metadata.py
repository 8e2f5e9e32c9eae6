"""The metadata of an open qcow2 file in memory, and guest offsets looked up through it.

``Qcow2Metadata`` reads and checks the header, its extensions, the snapshot
table and the L1 table at open, records which clusters hold metadata (a guest
write must never land in one), loads the refcounts for a read-write open, and
loads L2 tables on demand into the shared ``L2Cache``.  ``_map_cached`` is the
lookup every read, write and block-status answer starts from: what a guest
range is (``l2tables`` kinds) and where its data lies.  It holds no guest I/O:
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
from .refcount import Refcounts

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

    def _read_metadata(self) -> None:
        """Read and check the header, extensions, snapshot table and L1 table (open time)."""
        fd = self.file.fd
        file_size = os.fstat(fd).st_size
        probe = bytearray(min(file_size, 4096))
        pread_full(fd, memoryview(probe), 0)
        hdr = Header.unpack(bytes(probe))
        hdr.validate(self.path, file_size)
        cs = hdr.cluster_size
        cluster0 = bytearray(min(cs, file_size))
        pread_full(fd, memoryview(cluster0), 0)
        self.header = hdr
        self.ext: Extensions = parse_extensions(bytes(cluster0), hdr, self.path)
        if self.ext.data_file is not None:
            raise ImageFormatError(f"{self.path}: external data files are not supported")
        if hdr.incompatible_features & INCOMPAT_CORRUPT and not self.read_only:
            raise ImageFormatError(
                f"{self.path}: incompatible_features has the corrupt bit set; "
                "open read-only, or repair the image first"
            )
        self.backing_name: str | None = None
        if hdr.backing_file_offset:
            raw = cluster0[
                hdr.backing_file_offset : hdr.backing_file_offset + hdr.backing_file_size
            ]
            self.backing_name = bytes(raw).decode("utf-8", "replace")
        self.size = hdr.size
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = cs
        self.l2_bits = hdr.l2_bits
        self.extended_l2 = hdr.extended_l2
        self.v3 = hdr.version >= 3
        self.csize_shift = 62 - (hdr.cluster_bits - 8)
        self.csize_mask = (1 << (hdr.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self._cluster_mask = cs - 1
        self._l1_shift = hdr.cluster_bits + hdr.l2_bits
        self._l2_mask = (1 << hdr.l2_bits) - 1

        # Clusters that hold metadata: a guest write must never land in one.
        self.meta: set[int] = {0}
        self._claim(hdr.l1_table_offset, hdr.l1_size * 8, "l1_table_offset")
        self._claim(
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters * cs,
            "refcount_table_offset",
        )
        self.snapshots: list[Snapshot] = []
        if hdr.nb_snapshots:
            limit = min(file_size - hdr.snapshots_offset, hdr.nb_snapshots * 2048 + 65536)
            raw_snap = bytearray(limit)
            pread_full(fd, memoryview(raw_snap), hdr.snapshots_offset)
            self.snapshots, length = parse_snapshots(bytes(raw_snap), hdr.nb_snapshots, self.path)
            self._claim(hdr.snapshots_offset, length, "snapshots_offset")

        raw_l1 = bytearray(hdr.l1_size * 8)
        pread_full(fd, memoryview(raw_l1), hdr.l1_table_offset)
        self.l1 = decode_table(raw_l1)
        for i, entry in enumerate(self.l1):
            off = entry & L1E_OFFSET_MASK
            if entry & 0x7F000000000001FF:
                raise ImageFormatError(f"{self.path}: L1 entry {i} has reserved bits set")
            if not off:
                continue
            if off % cs:
                raise ImageFormatError(
                    f"{self.path}: L1 entry {i} ({off:#x}) is not cluster aligned"
                )
            if off + cs > file_size:
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
                self.meta.add((entry & L1E_OFFSET_MASK) >> self.cluster_bits)
        # The refcount table was claimed only to detect overlaps; it can move later,
        # so guest writes check it through the live Refcounts instead.
        rt_first = hdr.refcount_table_offset >> self.cluster_bits
        self.meta -= set(range(rt_first, rt_first + hdr.refcount_table_clusters))
        self.l1_dirty: set[int] = set()
        self.l2cache = L2Cache(L2_CACHE_BYTES // cs)

    def _claim(self, offset: int, length: int, field: str) -> None:
        """Record a metadata table's clusters, refusing overlap with earlier ones."""
        first = offset >> self.cluster_bits
        last = (offset + max(length, 1) - 1) >> self.cluster_bits
        for c in range(first, last + 1):
            if c in self.meta:
                raise ImageFormatError(
                    f"{self.path}: {field} {offset:#x} overlaps other metadata at cluster {c}"
                )
            self.meta.add(c)

    def _load_refcounts(self) -> Refcounts:
        hdr = self.header
        rc = Refcounts(
            self.file.fd,
            self.path,
            hdr.cluster_bits,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            os.fstat(self.file.fd).st_size,
        )
        rt_first = hdr.refcount_table_offset >> self.cluster_bits
        rt_clusters = range(rt_first, rt_first + hdr.refcount_table_clusters)
        for c in rc.block_clusters:
            if c in self.meta or c in rt_clusters:
                raise ImageFormatError(
                    f"{self.path}: refcount block at cluster {c} overlaps other metadata "
                    "(refcount loop)"
                )
        return rc

    def _where(self, gc: int) -> str:
        return f"{self.path}: guest cluster {gc}"

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
        cb = self.cluster_bits
        gc = off >> cb
        within = off & (self.cluster_size - 1)
        run = self.cluster_size - within
        if run > maxlen:
            run = maxlen
        l2b = self.l2_bits
        l1i = gc >> l2b
        l2off = self.l1[l1i] & L1E_OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2off:
            span_end = (l1i + 1) << (l2b + cb)
            return BACKING, 0, min(maxlen, span_end - off)
        table = self.l2cache.tables.get(l2off)
        if table is None:
            return None
        idx = gc & ((1 << l2b) - 1)
        if self.extended_l2:
            return classify_ext(
                table[2 * idx], table[2 * idx + 1], within, run, self.cluster_size, self._where(gc)
            )
        kind, val, run = classify(table[idx], within, run, self.cluster_size, self.v3, self.path)
        if run == maxlen or kind == COMPRESSED:
            return kind, val, run
        # Merge following clusters of the same kind (contiguous on the host for data).
        nxt = val - within + self.cluster_size
        last = len(table)
        idx += 1
        while run < maxlen and idx < last:
            e = table[idx]
            k2, v2, r2 = classify(
                e, 0, min(self.cluster_size, maxlen - run), self.cluster_size, self.v3, self.path
            )
            if k2 != kind or (kind == DATA and v2 != nxt):
                break
            run += r2
            nxt += self.cluster_size
            idx += 1
        return kind, val, run

    async def _map(self, off: int, maxlen: int) -> tuple[int, int, int]:
        m = self._map_cached(off, maxlen)
        while m is None:
            gc = off >> self.cluster_bits
            await self._load_l2(self.l1[gc >> self.l2_bits] & L1E_OFFSET_MASK)
            m = self._map_cached(off, maxlen)
        return m

    def compressed_span(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte length) of a compressed cluster's data."""
        coffset = entry & self.coffset_mask
        nb = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb * 512 - (coffset & 511)
