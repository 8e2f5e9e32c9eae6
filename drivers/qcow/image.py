"""The QCOW v1 ``Image``: reads, allocating writes, backing file, compressed reads, flush.

QCOW v1 has no refcounts: new L2 tables and data clusters are appended at the
cluster-aligned end of the file.  Metadata changes are held in memory (the L1
table, dirty L2 tables pinned in the cache) and written back by ``flush`` in a
crash-safe order: data synced, then the L2 tables, synced, then the L1 entries,
synced.  A crash can leak space but never leaves an entry pointing at data or
a table that is not on disk.  Compressed clusters (bit 63) are read with raw
deflate; a write into one moves the cluster to a new, uncompressed one.

Every table entry is untrusted: an L2 table is checked when first read, so a
hostile image cannot make a write land in the header, the L1 table, an L2
table or past the end of the file.
"""

from __future__ import annotations

import asyncio
import errno
import os
from array import array
from bisect import bisect_right
from itertools import pairwise

from ..backing import open_backing
from ..base import Capabilities, Extent, ExtentFlags, Image, ImageFormatError
from ..commit import commit_clusters
from ..deflate import inflate_cluster
from ..fileio import INLINE_WRITE_MAX, ImageFile, pread_full, pwrite_full
from ..l2tables import BACKING, COMPRESSED, DATA, L2Cache, decode_table, encode_table
from ..registry import OpenOptions, Progress
from .format import HEADER_SIZE, OFLAG_COMPRESSED, QcowHeader, compressed_location

#: L2 tables kept in memory; dirty ones beyond this force a write-back.
L2_CACHE_BYTES = 32 << 20
DIRTY_LIMIT_BYTES = 16 << 20
#: Largest buffer built at once for a run of newly allocated clusters.
ALLOC_CHUNK = 1 << 20


def open_qcow(path: str, options: OpenOptions) -> QcowImage:
    """Opener registered for ``qcow:``."""
    return QcowImage(path, options)


def commit(spec: str, progress: Progress | None, allowed_dirs: tuple[str, ...]) -> str:
    """``Committer`` registered for ``qcow:``: its own clusters into its backing file."""
    return commit_clusters(spec, _own_cluster, progress, allowed_dirs)


def _own_cluster(image: Image, offset: int, length: int) -> tuple[int, int, int]:
    """DATA or BACKING for the rest of the guest cluster at ``offset`` (at most ``length``)."""
    assert isinstance(image, QcowImage)
    guest_cluster = offset >> image.cluster_bits
    run = min(((guest_cluster + 1) << image.cluster_bits) - offset, length)
    return (DATA if image.allocated(guest_cluster) else BACKING), 0, run


class QcowImage(Image):
    """A QCOW v1 image."""

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.path = path
        self.spec = f"qcow:{path}"
        self.read_only = options.read_only
        self.file = ImageFile(path, writable=not options.read_only)
        self.backing: Image | None = None
        try:
            self._open(options)
        except BaseException:
            self.file.close()
            raise

    # -- opening and validation -----------------------------------------------------------

    def _bad(self, what: str) -> ImageFormatError:
        return ImageFormatError(f"{self.path}: {what}")

    def _open(self, options: OpenOptions) -> None:
        fd = self.file.fd
        file_size = os.fstat(fd).st_size
        if file_size < HEADER_SIZE:
            raise self._bad(f"file is {file_size} bytes, shorter than the QCOW header")
        raw = bytearray(HEADER_SIZE)
        pread_full(fd, memoryview(raw), 0)
        header = QcowHeader.unpack(raw)
        #: Everything before this is header, backing name and L1: never guest data.
        self.meta_end = header.check(file_size, self.path)
        cluster_bits, l2_bits = header.cluster_bits, header.l2_bits
        self.size = header.size
        self.cluster_bits = cluster_bits
        self.cluster_size = cluster_size = 1 << cluster_bits
        self.l2_bits = l2_bits
        self.l2_bytes = 8 << l2_bits
        self.l1_offset = header.l1_table_offset
        self.file_size = file_size
        self.open_end = -(-file_size // cluster_size) * cluster_size
        self.end = self.open_end
        raw_l1 = bytearray(8 * header.l1_size)
        pread_full(fd, memoryview(raw_l1), self.l1_offset)
        self.l1 = decode_table(raw_l1)
        self.l2_starts = self._check_l1()
        self.l2cache = L2Cache(L2_CACHE_BYTES // self.l2_bytes)
        #: L2 tables whose entries have been checked (or that this process wrote).
        self.checked: set[int] = set()
        self.l1_dirty: set[int] = set()
        self.lock = asyncio.Lock()
        self._zcache: tuple[int, bytes] = (0, b"")
        if header.backing_file_offset:
            name = bytearray(header.backing_file_size)
            pread_full(fd, memoryview(name), header.backing_file_offset)
            self.backing = open_backing(self.path, name.decode("utf-8", "replace"), None, options)
        self._caps = Capabilities(trim=False, zero=not self.read_only, extents=True)

    def _check_l1(self) -> list[int]:
        """Check the L1 entries; return the sorted L2 table offsets."""
        used: list[tuple[int, int]] = []
        for i, off in enumerate(self.l1):
            if not off:
                continue
            if off % 512:
                raise self._bad(f"L1 entry {i}: L2 table offset {off:#x} is not 512-byte aligned")
            if off < self.meta_end:
                raise self._bad(
                    f"L1 entry {i}: L2 table offset {off:#x} overlaps the header or L1 table"
                )
            if off + self.l2_bytes > self.file_size:
                raise self._bad(f"L1 entry {i}: L2 table offset {off:#x} is past the end of file")
            used.append((off, i))
        used.sort()
        for (offset, i), (next_offset, j) in pairwise(used):
            if next_offset < offset + self.l2_bytes:
                raise self._bad(
                    f"L1 entries {i} and {j}: L2 tables at {offset:#x} and {next_offset:#x} overlap"
                )
        return [off for off, _ in used]

    def _check_l2(self, l2off: int, table: array) -> None:
        """Refuse entries that are unaligned, past EOF, or overlap metadata."""
        cluster_size = self.cluster_size
        starts = self.l2_starts
        for idx, entry in enumerate(table):
            if not entry:
                continue
            where = f"L2 table at {l2off:#x}, entry {idx}"
            if entry & OFLAG_COMPRESSED:
                coff, csize = compressed_location(entry, self.cluster_bits)
                if coff < self.meta_end or coff + csize > self.file_size:
                    raise self._bad(
                        f"{where}: compressed data at {coff:#x} (+{csize}) is outside the data area"
                    )
                continue
            if entry % cluster_size:
                raise self._bad(f"{where}: data offset {entry:#x} is not cluster aligned")
            if entry < self.meta_end or entry + cluster_size > self.open_end:
                raise self._bad(
                    f"{where}: data offset {entry:#x} is in the header/L1 area "
                    "or past the end of file"
                )
            nearest = bisect_right(starts, entry + cluster_size - 1) - 1
            if nearest >= 0 and starts[nearest] + self.l2_bytes > entry:
                raise self._bad(
                    f"{where}: data offset {entry:#x} overlaps the L2 table at {starts[nearest]:#x}"
                )

    def _adopt(self, l2off: int, raw: bytearray) -> array:
        table = decode_table(raw)
        if l2off not in self.checked:
            self._check_l2(l2off, table)
            self.checked.add(l2off)
        return self.l2cache.put(l2off, table)

    async def _table(self, l2off: int) -> array:
        table = self.l2cache.get(l2off)
        if table is None:
            raw = bytearray(self.l2_bytes)
            await self.file.read(l2off, memoryview(raw))
            table = self._adopt(l2off, raw)
        return table

    def _table_sync(self, l2off: int) -> array:
        table = self.l2cache.get(l2off)
        if table is None:
            raw = bytearray(self.l2_bytes)
            pread_full(self.file.fd, memoryview(raw), l2off)
            table = self._adopt(l2off, raw)
        return table

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "qcow"

    # -- mapping ----------------------------------------------------------------------------

    def _map_cached(self, off: int, maxlen: int) -> tuple[int, int, int] | None:
        """(kind, host offset or raw entry, run) at guest ``off``; None if the L2 is not cached.

        A run joins following clusters of the same kind (host-contiguous for data)
        inside one L2 table.
        """
        cluster_bits = self.cluster_bits
        cluster_size = self.cluster_size
        guest_cluster = off >> cluster_bits
        within = off & (cluster_size - 1)
        run = min(cluster_size - within, maxlen)
        l2_bits = self.l2_bits
        l1_index = guest_cluster >> l2_bits
        l2off = self.l1[l1_index] if l1_index < len(self.l1) else 0
        if not l2off:
            return BACKING, 0, min(maxlen, ((l1_index + 1) << (l2_bits + cluster_bits)) - off)
        table = self.l2cache.get(l2off)
        if table is None:
            return None
        idx = guest_cluster & ((1 << l2_bits) - 1)
        entry = table[idx]
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, entry, run
        kind = DATA if entry else BACKING
        next_host = entry + cluster_size
        idx += 1
        last = len(table)
        while run < maxlen and idx < last:
            next_entry = table[idx]
            if kind == DATA:
                if next_entry != next_host:
                    break
                next_host += cluster_size
            elif next_entry:
                break
            run += min(cluster_size, maxlen - run)
            idx += 1
        return kind, (entry + within if entry else 0), run

    async def _map(self, off: int, maxlen: int) -> tuple[int, int, int]:
        mapping = self._map_cached(off, maxlen)
        if mapping is None:
            await self._table(self.l1[(off >> self.cluster_bits) >> self.l2_bits])
            mapping = self._map_cached(off, maxlen)
            assert mapping is not None
        return mapping

    def allocated(self, guest_cluster: int) -> bool:
        """Whether ``guest_cluster`` is stored in this image (blocking; for tools)."""
        l1_index = guest_cluster >> self.l2_bits
        l2off = self.l1[l1_index] if l1_index < len(self.l1) else 0
        if not l2off:
            return False
        return self._table_sync(l2off)[guest_cluster & ((1 << self.l2_bits) - 1)] != 0

    # -- reads ------------------------------------------------------------------------------

    async def _decompress(self, entry: int) -> bytes:
        if self._zcache[0] == entry:
            return self._zcache[1]
        coff, csize = compressed_location(entry, self.cluster_bits)
        raw = bytearray(csize)
        await self.file.read(coff, memoryview(raw))
        out = inflate_cluster(bytes(raw), self.cluster_size, f"{self.path}: data at {coff:#x}")
        self._zcache = (entry, out)
        return out

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        pos = 0
        length = len(buf)
        while pos < length:
            mapping = self._map_cached(offset + pos, length - pos)
            if mapping is None:
                return False
            kind, val, run = mapping
            view = buf[pos : pos + run]
            if kind == DATA:
                if not self.file.read_nowait(val, view):
                    return False
            elif kind == BACKING:
                if not self._backing_nowait(offset + pos, view):
                    return False
            else:
                return False
            pos += run
        return True

    def _backing_nowait(self, offset: int, view: memoryview) -> bool:
        length = len(view)
        backing = self.backing
        have = 0 if backing is None else max(0, min(length, backing.size - offset))
        if have and backing is not None and not backing.read_nowait(offset, view[:have]):
            return False
        if have < length:
            view[have:] = bytes(length - have)
        return True

    async def read(self, offset: int, buf: memoryview) -> None:
        pos = 0
        length = len(buf)
        cluster_size = self.cluster_size
        while pos < length:
            off = offset + pos
            kind, val, run = await self._map(off, length - pos)
            view = buf[pos : pos + run]
            if kind == DATA:
                await self.file.read(val, view)
            elif kind == BACKING:
                await self._read_backing(off, view)
            else:
                within = off & (cluster_size - 1)
                view[:] = (await self._decompress(val))[within : within + run]
            pos += run

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        length = len(view)
        backing = self.backing
        have = 0 if backing is None else max(0, min(length, backing.size - offset))
        if have and backing is not None:
            await backing.read(offset, view[:have])
        if have < length:
            view[have:] = bytes(length - have)

    # -- writes -----------------------------------------------------------------------------

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if self.read_only or len(data) > INLINE_WRITE_MAX:
            return False
        pieces: list[tuple[int, int, int]] = []
        pos = 0
        length = len(data)
        while pos < length:
            mapping = self._map_cached(offset + pos, length - pos)
            if (
                mapping is None
                or mapping[0] != DATA
                or not self.file.can_write_nowait(mapping[1], mapping[2])
            ):
                return False
            pieces.append((pos, mapping[1], mapping[2]))
            pos += mapping[2]
        # Every piece or none: the checks are done, so write them all here and now.
        for pos, host, run in pieces:
            pwrite_full(self.file.fd, data[pos : pos + run], host)
        return True

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, f"{self.path} is open read-only")
        async with self.lock:
            await self._write_locked(offset, data)
            await self._settle(fua)

    async def _settle(self, fua: bool) -> None:
        """Write metadata back for FUA, or when too many dirty L2 tables are pinned."""
        if fua or len(self.l2cache.dirty) * self.l2_bytes > DIRTY_LIMIT_BYTES:
            await self._flush_locked()

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        pos = 0
        length = len(data)
        while pos < length:
            off = offset + pos
            kind, val, run = await self._map(off, length - pos)
            if kind == DATA:
                await self.file.write(val, data[pos : pos + run])
            else:
                run = min(run, ALLOC_CHUNK)
                await self._allocate(off, data[pos : pos + run])
            pos += run

    async def _allocate(self, off: int, data: memoryview) -> None:
        """Write ``data`` (one kind, within one L2 table) into newly appended clusters."""
        cluster_bits = self.cluster_bits
        cluster_size = self.cluster_size
        first_cluster = off >> cluster_bits
        within = off & (cluster_size - 1)
        count = (within + len(data) + cluster_size - 1) >> cluster_bits
        buf = bytearray(count << cluster_bits)
        view = memoryview(buf)
        # Partial first/last clusters keep their old bytes (backing, zeros or compressed).
        if within:
            await self.read(first_cluster << cluster_bits, view[:cluster_size])
        tail = (within + len(data)) & (cluster_size - 1)
        if tail and (count > 1 or not within):
            await self.read(
                (first_cluster + count - 1) << cluster_bits, view[(count - 1) << cluster_bits :]
            )
        view[within : within + len(data)] = data
        host = self._append(len(buf))
        await self.file.write(host, view)
        self._set_entries(first_cluster, count, host)

    def _append(self, length: int) -> int:
        off = self.end
        self.end += -(-length // self.cluster_size) * self.cluster_size
        return off

    def _set_entries(self, first_cluster: int, count: int, host: int) -> None:
        """Point ``count`` guest clusters from ``first_cluster`` at consecutive host clusters.

        In memory only.  The L2 table is cached (``_map`` loaded it) unless the L1 entry is empty,
        in which case a new zeroed table is appended; both stay dirty until flush.
        """
        l2_bits = self.l2_bits
        l1_index = first_cluster >> l2_bits
        l2off = self.l1[l1_index]
        if l2off:
            table = self.l2cache.get(l2off)
            assert table is not None
        else:
            l2off = self._append(self.l2_bytes)
            table = self.l2cache.put(l2off, array("Q", bytes(self.l2_bytes)))
            self.checked.add(l2off)
            self.l2_starts.append(l2off)
            self.l1[l1_index] = l2off
            self.l1_dirty.add(l1_index)
        idx = first_cluster & ((1 << l2_bits) - 1)
        cluster_size = self.cluster_size
        for i in range(count):
            table[idx + i] = host + i * cluster_size
        self.l2cache.mark_dirty(l2off)

    async def flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        """Data, then L2 tables, then L1 entries, each synced before the next."""
        await self.file.sync()
        dirty = sorted(self.l2cache.dirty)
        if dirty:
            for l2off in dirty:
                await self.file.write(l2off, memoryview(encode_table(self.l2cache.tables[l2off])))
            self.l2cache.dirty.difference_update(dirty)
            await self.file.sync()
        if self.l1_dirty:
            for i in sorted(self.l1_dirty):
                entry = self.l1[i].to_bytes(8, "big")
                await self.file.write(self.l1_offset + 8 * i, memoryview(entry))
            self.l1_dirty.clear()
            await self.file.sync()

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, f"{self.path} is open read-only")
        if fast_only:
            raise OSError(errno.ENOTSUP, "qcow v1 cannot zero without writing")
        zeros = memoryview(bytes(min(length, ALLOC_CHUNK)))
        end = offset + length
        async with self.lock:
            while offset < end:
                kind, _, run = await self._map(offset, min(end - offset, len(zeros)))
                backing = self.backing
                if kind == BACKING and (backing is None or offset >= backing.size):
                    offset += run  # already reads as zeros
                    continue
                await self._write_locked(offset, zeros[:run])
                offset += run
            await self._settle(fua)

    # -- block status and close -------------------------------------------------------------

    async def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end and len(out) < 1024:
            kind, _, run = await self._map(pos, end - pos)
            backing = self.backing
            if kind == BACKING and backing is not None and pos < backing.size:
                run = min(run, backing.size - pos)
                for ext in await backing.extents(pos, run):
                    part = min(ext.length, run)
                    out.append(Extent(part, ext.flags))
                    run -= part
                    pos += part
                    if run <= 0:
                        break
                continue
            flags = ExtentFlags.HOLE | ExtentFlags.ZERO if kind == BACKING else ExtentFlags.DATA
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + run, flags)
            else:
                out.append(Extent(run, flags))
            pos += run
        return out or [Extent(length, ExtentFlags.DATA)]

    async def close(self) -> None:
        try:
            if not self.read_only and self.file.fd >= 0:
                await self.flush()
        finally:
            self.file.close()
            if self.backing is not None:
                await self.backing.close()
                self.backing = None
