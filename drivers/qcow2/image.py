"""The QCOW2 ``Image``: reads, allocating writes, discard, zeroing, flush, block status.

Metadata is cached in memory (L1 whole, L2 tables in an LRU, refcounts per
block) and written back by ``flush`` in qemu's crash-safe order: refcount
blocks, then the refcount table (and header when it moved), then L2 tables,
then L1 entries, each step synced before the next, and only then the
held-back refcount decrements.  Newly allocated data is written before the
first of those syncs, so an L2 entry never reaches disk ahead of its data.
Reads take no lock and do no metadata I/O once the L2 table is cached; the
whole fast path (cached L2, page-cache hit) runs inside ``read_nowait``.
"""

from __future__ import annotations

import asyncio
import errno
import os
from array import array

from ..backing import open_backing
from ..base import Capabilities, Extent, ExtentFlags, Image, ImageFormatError
from ..commit import commit_clusters
from ..fileio import ImageFile, pread_full, pwrite_full
from ..l2tables import BACKING, COMPRESSED, DATA, ZERO, L2Cache, decode_table
from ..registry import OpenOptions, Progress
from . import check as checkmod
from .cluster import STD_RESERVED, classify, classify_ext
from .compress import decompress_cluster
from .format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_HOST_OFFSET,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Extensions,
    Header,
    Snapshot,
    parse_extensions,
    parse_snapshots,
)
from .refcount import Refcounts

#: Memory given to cached L2 tables (qemu's default on Linux is 32 MiB).
L2_CACHE_BYTES = 32 << 20
#: Flush on our own when this many L2 tables are dirty (they are pinned in memory).
MAX_DIRTY_L2 = 512
_ZEROS = memoryview(bytes(2 << 20))
#: L2 entry bits that make an entry anything but plain allocated data.
_NOT_PLAIN = OFLAG_COMPRESSED | OFLAG_ZERO | STD_RESERVED
#: Subcluster bitmap of an extended L2 entry whose 32 subclusters are all allocated.
ALL_SUBCLUSTERS = 0xFFFFFFFF


def open_qcow2(path: str, options: OpenOptions) -> Qcow2Image:
    """Opener registered for ``qcow2:``."""
    return Qcow2Image(path, options)


def block_status(image: Image, offset: int, length: int) -> tuple[int, int, int]:
    """``BlockStatus`` registered for ``qcow2:`` (blocking, for tools)."""
    assert isinstance(image, Qcow2Image)
    return image.block_status(offset, length)


def commit(spec: str, progress: Progress | None, allowed_dirs: tuple[str, ...]) -> str:
    """``Committer`` registered for ``qcow2:``: its own clusters into its backing file."""
    return commit_clusters(spec, block_status, progress, allowed_dirs)


class Qcow2Image(Image):
    """A QCOW2 (v2 or v3) image, with its backing chain.

    Metadata I/O uses small unaligned buffers, so the image always goes through
    the page cache (FLUSH syncs it) and the registry refuses ``OpenOptions.direct``.
    """

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.path = path
        self.spec = f"qcow2:{path}"
        self.read_only = options.read_only
        self.file = ImageFile(path, writable=not options.read_only)
        self.backing: Image | None = None
        try:
            self._open(options)
        except BaseException:
            self.file.close()
            raise

    # -- open -----------------------------------------------------------------------------

    def _open(self, options: OpenOptions) -> None:
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
        self.lock = asyncio.Lock()
        self._compressed_cache: tuple[int, bytes] = (-1, b"")
        self._header_dirty = False

        self.refcounts: Refcounts | None = None
        if not self.read_only:
            if hdr.incompatible_features & INCOMPAT_DIRTY:
                checkmod.rebuild_refcounts(self)
                hdr.incompatible_features &= ~INCOMPAT_DIRTY
                self._header_dirty = True
            self.refcounts = self._load_refcounts()
            if hdr.autoclear_features:
                # We keep no bitmaps up to date, so every autoclear feature lapses.
                hdr.autoclear_features = 0
                self._header_dirty = True
            if self._header_dirty:
                self.write_header_sync()
        if self.backing_name is not None:
            self.backing = open_backing(
                self.path, self.backing_name, self.ext.backing_format, options
            )
        self._caps = Capabilities(
            trim=not self.read_only,
            zero=not self.read_only,
            fast_zero=not self.read_only and self.v3,
            extents=True,
            cache=False,
        )

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

    def write_header_sync(self) -> None:
        """Rewrite the header fields in place and sync (open/close time only)."""
        pwrite_full(self.file.fd, memoryview(self.header.pack()), 0)
        os.fdatasync(self.file.fd)
        self._header_dirty = False

    # -- interface ------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "qcow2"

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

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        n = len(buf)
        # Fast path: inside one cluster of a plain allocated entry in a cached L2 table.
        within = offset & self._cluster_mask
        if within + n <= self.cluster_size and not self.extended_l2:
            l1i = offset >> self._l1_shift
            table = self.l2cache.tables.get(self.l1[l1i] & L1E_OFFSET_MASK)
            if table is not None:
                entry = table[(offset >> self.cluster_bits) & self._l2_mask]
                host = entry & L2E_OFFSET_MASK
                if host and not entry & _NOT_PLAIN and not host & self._cluster_mask:
                    return self.file.read_nowait(host + within, buf)
        m = self._map_cached(offset, n)
        if m is None:
            return False
        kind, val, run = m
        if run == n:
            if kind == DATA:
                return self.file.read_nowait(val, buf)
            if kind == ZERO or (kind == BACKING and self.backing is None):
                buf[:] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
                return True
            return False
        pos = 0
        while pos < n:
            if pos:
                m = self._map_cached(offset + pos, n - pos)
                if m is None:
                    return False
                kind, val, run = m
            view = buf[pos : pos + run]
            if kind == DATA:
                if not self.file.read_nowait(val, view):
                    return False
            elif kind == ZERO or (kind == BACKING and self.backing is None):
                view[:] = _ZEROS[:run] if run <= len(_ZEROS) else bytes(run)
            else:
                return False
            pos += run
        return True

    async def read(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        pos = 0
        while pos < n:
            kind, val, run = await self._map(offset + pos, n - pos)
            view = buf[pos : pos + run]
            if kind == DATA:
                await self.file.read(val, view)
            elif kind == ZERO:
                view[:] = _ZEROS[:run] if run <= len(_ZEROS) else bytes(run)
            elif kind == BACKING:
                await self._read_backing(offset + pos, view)
            else:
                data = await self._compressed(val, (offset + pos) >> self.cluster_bits)
                within = (offset + pos) & (self.cluster_size - 1)
                view[:] = data[within : within + run]
            pos += run

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        backing = self.backing
        n = len(view)
        have = 0 if backing is None else max(0, min(n, backing.size - offset))
        if have:
            part = view[:have]
            if not backing.read_nowait(offset, part):  # type: ignore[union-attr]
                await backing.read(offset, part)  # type: ignore[union-attr]
        if have < n:
            view[have:] = bytes(n - have)

    def compressed_span(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte length) of a compressed cluster's data."""
        coffset = entry & self.coffset_mask
        nb = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb * 512 - (coffset & 511)

    async def _compressed(self, entry: int, gc: int) -> bytes:
        if self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        coffset, csize = self.compressed_span(entry)
        if coffset >= MAX_HOST_OFFSET or coffset == 0:
            raise ImageFormatError(f"{self._where(gc)}: compressed offset {coffset:#x} invalid")
        raw = bytearray(csize)
        await self.file.read(coffset, memoryview(raw))
        data = decompress_cluster(
            self.header.compression_type, bytes(raw), self.cluster_size, self._where(gc)
        )
        self._compressed_cache = (entry, data)
        return data

    # -- writes ---------------------------------------------------------------------------

    def _writable(self) -> bool:
        return not self.read_only and self.refcounts is not None

    def _check_writable(self) -> None:
        if not self._writable():
            raise OSError(errno.EPERM, f"{self.path} is open read-only")

    def _check_data_cluster(self, host: int, gc: int) -> None:
        """Refuse a guest write into a metadata cluster (hostile or corrupt L2)."""
        c = host >> self.cluster_bits
        rc = self.refcounts
        assert rc is not None
        table_first = rc.table_offset >> self.cluster_bits
        if (
            c in self.meta
            or c in rc.block_clusters
            or table_first <= c < table_first + rc.table_clusters
        ):
            raise ImageFormatError(
                f"{self._where(gc)}: L2 entry points at metadata cluster {host:#x}"
            )

    async def _l2_for_write(self, l1i: int) -> tuple[int, array]:
        """The L2 table for ``l1i``, allocated or copied (if shared) so it can be changed."""
        l1e = self.l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off and l1e & OFLAG_COPIED:
            return off, await self._load_l2(off)
        rc = self.refcounts
        assert rc is not None
        new = rc.alloc(1) << self.cluster_bits
        if off:
            table = array("Q", await self._load_l2(off))
            self.l2cache.forget(off)
            self.meta.discard(off >> self.cluster_bits)
            rc.free_later(off >> self.cluster_bits)
        else:
            table = array("Q", bytes(self.cluster_size))
        self.l2cache.put(new, table, dirty=True)
        self.meta.add(new >> self.cluster_bits)
        self.l1[l1i] = new | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return new, table

    def _release(self, entry: int) -> None:
        """Drop this L2 entry's hold on host clusters, once it is gone from disk."""
        rc = self.refcounts
        assert rc is not None
        if entry & OFLAG_COMPRESSED:
            coffset, csize = self.compressed_span(entry)
            first = coffset >> self.cluster_bits
            last = (coffset + csize - 1) >> self.cluster_bits
            rc.free_later(first, last - first + 1)
            return
        off = entry & L2E_OFFSET_MASK
        if off:
            rc.free_later(off >> self.cluster_bits)

    def _in_place(self, table: array | None, idx: int) -> bool:
        """Whether guest cluster ``idx`` of ``table`` can be overwritten where it is."""
        if table is None:
            return False
        if self.extended_l2:
            entry = table[2 * idx]
            if table[2 * idx + 1] != ALL_SUBCLUSTERS:
                return False
        else:
            entry = table[idx]
        return (
            entry & OFLAG_COPIED != 0
            and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO)
            and entry & L2E_OFFSET_MASK != 0
        )

    def _overwrite_at(self, offset: int, length: int) -> int | None:
        """Where in the file a write of ``length`` bytes at ``offset`` goes if it needs no
        metadata change, else None.

        That is an overwrite inside one cluster this image owns alone (COPIED) whose L2
        table is cached; it cannot race with allocation, so it takes no lock.
        """
        within = offset & self._cluster_mask
        if within + length > self.cluster_size or self.extended_l2:
            return None
        l1e = self.l1[offset >> self._l1_shift]
        table = self.l2cache.tables.get(l1e & L1E_OFFSET_MASK)
        if table is None or not l1e & OFLAG_COPIED:
            return None
        gc = offset >> self.cluster_bits
        entry = table[gc & self._l2_mask]
        if not entry & OFLAG_COPIED or not self._in_place(table, gc & self._l2_mask):
            return None
        host = entry & L2E_OFFSET_MASK
        self._check_data_cluster(host, gc)
        return host + within

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if not self._writable():
            return False
        at = self._overwrite_at(offset, len(data))
        return at is not None and self.file.write_nowait(at, data)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._check_writable()
        # The lock-free overwrite must not wait between finding its cluster and writing
        # it: a discard could free the cluster meanwhile and an allocation reuse it.
        if not fua and self.write_nowait(offset, data):
            return
        async with self.lock:
            await self._write_locked(offset, data)
            if fua or len(self.l2cache.dirty) > MAX_DIRTY_L2:
                await self._flush_locked()

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        cb = self.cluster_bits
        cs = self.cluster_size
        l2b = self.l2_bits
        l2mask = (1 << l2b) - 1
        n = len(data)
        pos = 0
        while pos < n:
            off = offset + pos
            gc = off >> cb
            within = off & (cs - 1)
            l1i = gc >> l2b
            idx = gc & l2mask
            l2off = self.l1[l1i] & L1E_OFFSET_MASK
            table = await self._load_l2(l2off) if l2off else None
            st = 2 if self.extended_l2 else 1
            if self._in_place(table, idx):
                assert table is not None
                entry = table[st * idx]
                # Extend over following in-place clusters contiguous on the host.
                host = entry & L2E_OFFSET_MASK
                self._check_data_cluster(host, gc)
                run = min(cs - within, n - pos)
                i = idx + 1
                while pos + run < n and table is not None and i <= l2mask:
                    e = table[st * i]
                    if not self._in_place(table, i) or e & L2E_OFFSET_MASK != host + (i - idx) * cs:
                        break
                    self._check_data_cluster(e & L2E_OFFSET_MASK, gc + i - idx)
                    run += min(cs, n - pos - run)
                    i += 1
                await self.file.write(host + within, data[pos : pos + run])
                pos += run
                continue
            # A run of clusters in this L2 table that all need new host clusters.
            k = 1
            covered = min(cs - within, n - pos)
            while pos + covered < n and idx + k <= l2mask:
                if self._in_place(table, idx + k):
                    break
                covered += min(cs, n - pos - covered)
                k += 1
            await self._allocate_and_write(gc, k, within, data[pos : pos + covered])
            pos += covered

    async def _allocate_and_write(self, gc: int, k: int, within: int, data: memoryview) -> None:
        """Write ``data`` (starting ``within`` guest cluster ``gc``) into ``k`` new clusters."""
        cb = self.cluster_bits
        cs = self.cluster_size
        rc = self.refcounts
        assert rc is not None
        host = rc.alloc(k) << cb
        end = within + len(data)  # byte offset of the data's end relative to cluster gc
        head_partial = within != 0 or end < cs
        tail_partial = end % cs != 0 and (k > 1 or not head_partial)
        if head_partial:
            buf = bytearray(cs)
            await self.read(gc << cb, memoryview(buf))
            first = min(end, cs)
            buf[within:first] = data[: first - within]
            await self.file.write(host, memoryview(buf))
            start_full = 1
            dpos = first - within
        else:
            start_full = 0
            dpos = 0
        full_end = k - 1 if (tail_partial and k > 1) else k
        if full_end > start_full:
            nbytes = (full_end - start_full) * cs
            await self.file.write(host + start_full * cs, data[dpos : dpos + nbytes])
            dpos += nbytes
        if tail_partial and k > 1:
            buf = bytearray(cs)
            last_gc = gc + k - 1
            await self.read(last_gc << cb, memoryview(buf))
            rest = len(data) - dpos
            buf[:rest] = data[dpos:]
            await self.file.write(host + (k - 1) * cs, memoryview(buf))
        l2off, table = await self._l2_for_write(gc >> self.l2_bits)
        idx = gc & ((1 << self.l2_bits) - 1)
        for i in range(k):
            st = 2 if self.extended_l2 else 1
            old = table[st * (idx + i)]
            table[st * (idx + i)] = (host + i * cs) | OFLAG_COPIED
            if st == 2:
                table[st * (idx + i) + 1] = ALL_SUBCLUSTERS
            self._release(old)
        self.l2cache.mark_dirty(l2off)

    async def _set_entries(self, gc: int, count: int, value_for: int) -> None:
        """Set ``count`` whole clusters from ``gc`` to zero (``value_for`` = OFLAG_ZERO) or
        unallocated (0), releasing what they held."""
        l2b = self.l2_bits
        l2mask = (1 << l2b) - 1
        done = 0
        while done < count:
            g = gc + done
            l1i = g >> l2b
            idx = g & l2mask
            k = min(count - done, l2mask + 1 - idx)
            l1e = self.l1[l1i]
            if not l1e & L1E_OFFSET_MASK and (value_for == 0 or self.backing is None):
                done += k  # reads as zeros already: no L2 table needed
                continue
            l2off, table = await self._l2_for_write(l1i)
            if self.extended_l2:
                # No zero flag in extended entries: every subcluster reads as zero instead.
                bitmap = ALL_SUBCLUSTERS << 32 if value_for == OFLAG_ZERO else 0
                for i in range(idx, idx + k):
                    old = table[2 * i]
                    table[2 * i] = 0
                    table[2 * i + 1] = bitmap
                    self._release(old)
            else:
                for i in range(idx, idx + k):
                    old = table[i]
                    if old != value_for:
                        table[i] = value_for
                        self._release(old)
            self.l2cache.mark_dirty(l2off)
            done += k

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        cs = self.cluster_size
        first = -(-offset // cs)
        last = (offset + length) // cs
        if (offset + length) == self.size:
            last = -(-self.size // cs)
        if last <= first:
            return
        if self.backing is not None and not self.v3:
            return  # v2 cannot hide the backing file; discard is only a hint
        async with self.lock:
            value = OFLAG_ZERO if self.backing is not None else 0
            await self._set_entries(first, last - first, value)
            if fua:
                await self._flush_locked()

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        self._check_writable()
        cs = self.cluster_size
        end = offset + length
        first = -(-offset // cs)
        last = end // cs
        if end == self.size:
            last = -(-self.size // cs)
        can_flag = self.v3 or self.backing is None
        aligned = can_flag and last > first
        if fast_only and (not aligned or offset != first * cs or min(end, self.size) > last * cs):
            raise OSError(errno.ENOTSUP, "zeroing would be as slow as writing")
        if not aligned:
            await self._write_zero_buffers(offset, end)
        else:
            if offset < first * cs:
                await self._write_zero_buffers(offset, first * cs)
            if end > last * cs:
                await self._write_zero_buffers(last * cs, end)
            async with self.lock:
                await self._set_entries(first, last - first, OFLAG_ZERO if self.v3 else 0)
        if fua:
            await self.flush()

    async def _write_zero_buffers(self, start: int, end: int) -> None:
        while start < end:
            n = min(end - start, len(_ZEROS))
            await self.write(start, _ZEROS[:n])
            start += n

    async def flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self._flush_locked()

    async def _write_list(self, writes: list[tuple[int, bytes]]) -> None:
        for off, data in writes:
            await self.file.write(off, memoryview(data))

    async def _flush_locked(self) -> None:
        rc = self.refcounts
        assert rc is not None
        synced = False
        blocks = rc.dirty_block_writes()
        if blocks:
            await self._write_list(blocks)
            await self.file.sync()
            synced = True
        table_writes = rc.table_writes()
        if table_writes:
            await self._write_list(table_writes)
            await self.file.sync()
            if rc.table_moved:
                self.header.refcount_table_offset = rc.table_offset
                self.header.refcount_table_clusters = rc.table_clusters
                await self.file.write(0, memoryview(self.header.pack()))
                await self.file.sync()
                rc.table_moved = False
            synced = True
        l2_writes = self.l2cache.take_dirty()
        if l2_writes:
            await self._write_list(l2_writes)
            await self.file.sync()
            synced = True
        if self.l1_dirty:
            l1_off = self.header.l1_table_offset
            writes = [
                (l1_off + 8 * i, self.l1[i].to_bytes(8, "big")) for i in sorted(self.l1_dirty)
            ]
            self.l1_dirty.clear()
            await self._write_list(writes)
            await self.file.sync()
            synced = True
        if rc.apply_frees():
            await self._write_list(rc.dirty_block_writes())
            await self.file.sync()
            synced = True
        if not synced:
            await self.file.sync()

    # -- block status ---------------------------------------------------------------------

    async def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end and len(out) < 1024:
            kind, val, run = await self._map(pos, end - pos)
            if kind == BACKING and self.backing is not None and pos < self.backing.size:
                run = min(run, self.backing.size - pos)
                for ext in await self.backing.extents(pos, run):
                    n = min(ext.length, run)
                    out.append(Extent(n, ext.flags))
                    run -= n
                    pos += n
                    if run <= 0:
                        break
                continue
            if kind == BACKING:
                flags = ExtentFlags.HOLE | ExtentFlags.ZERO
            elif kind == ZERO:
                flags = ExtentFlags.ZERO if val else ExtentFlags.HOLE | ExtentFlags.ZERO
            else:
                flags = ExtentFlags.DATA
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + run, flags)
            else:
                out.append(Extent(run, flags))
            pos += run
        return out or [Extent(length, ExtentFlags.DATA)]

    def block_status(self, offset: int, length: int) -> tuple[int, int, int]:
        """(kind, host offset, run) for tools such as ``tap-img map`` (blocking)."""
        m = self._map_cached(offset, length)
        if m is None:
            gc = offset >> self.cluster_bits
            self.load_l2_sync(self.l1[gc >> self.l2_bits] & L1E_OFFSET_MASK)
            m = self._map_cached(offset, length)
        assert m is not None
        return m

    async def close(self) -> None:
        try:
            if not self.read_only and self.refcounts is not None and self.file.fd >= 0:
                await self.flush()
        finally:
            self.file.close()
            if self.backing is not None:
                await self.backing.close()
                self.backing = None
