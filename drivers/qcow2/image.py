"""The QCOW2 ``Image``: open, reads, the write entry points, block status, close.

The metadata lives in ``metadata`` (read and checked at open, L2 tables on
demand) and the allocating half of writes, with the crash-safe flush order, in
``allocate``; this class completes them into the ``Image``.  Reads take no
lock and do no metadata I/O once the L2 table is cached; the whole fast path
(cached L2, page-cache hit) runs inside ``read_nowait``.  Overwrites of
clusters this image owns alone take no lock either (``write_nowait``); every
other write, discard and zeroing runs under the lock.

Metadata found inconsistent in use (``overlap.Qcow2Corruption``: a malformed L2
entry, guest data that would lie in a metadata cluster, damaged refcounts) fails
the request with EIO at these entry points.  On a read-write image the first such finding is
logged and marks the image corrupt (the header's incompatible bit, as qemu
does): writes fail from then on, reads and flushes go on, and the image opens
read-only until it is repaired (``qemu-img check -r all``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from ..backing import open_backing
from ..base import Capabilities, Extent, ExtentFlags, Image, ImageFormatError
from ..commit import commit_clusters
from ..fileio import ImageFile, pwrite_full
from ..l2tables import BACKING, DATA, ZERO
from ..registry import OpenOptions, Progress
from . import check as checkmod
from .allocate import Qcow2Allocation
from .cluster import STD_RESERVED
from .compress import decompress_cluster
from .format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_HOST_OFFSET,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
)
from .overlap import Qcow2Corruption

log = logging.getLogger(__name__)

#: Flush on our own when this many L2 tables are dirty (they are pinned in memory).
MAX_DIRTY_L2 = 512
_ZEROS = memoryview(bytes(2 << 20))
#: L2 entry bits that make an entry anything but plain allocated data.
_NOT_PLAIN = OFLAG_COMPRESSED | OFLAG_ZERO | STD_RESERVED


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


class Qcow2Image(Qcow2Allocation):
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
        self._read_metadata()
        header = self.header
        self.lock = asyncio.Lock()
        self._compressed_cache: tuple[int, bytes] = (-1, b"")
        self._header_dirty = False
        self.corrupt = False

        self.refcounts = None
        if not self.read_only:
            if header.incompatible_features & INCOMPAT_DIRTY:
                checkmod.rebuild_refcounts(self)
                self._refcounts_rebuilt()
                header.incompatible_features &= ~INCOMPAT_DIRTY
                self._header_dirty = True
            try:
                self.refcounts = self._load_refcounts()
            except Qcow2Corruption as exc:
                self._mark_corrupt(str(exc))
                raise ImageFormatError(
                    f"{exc}; the image is marked corrupt: open it read-only, or repair it first"
                ) from None
            if header.autoclear_features:
                # We keep no bitmaps up to date, so every autoclear feature lapses.
                header.autoclear_features = 0
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

    def write_header_sync(self) -> None:
        """Rewrite the header fields in place and sync (open time, and once on corruption)."""
        pwrite_full(self.file.fd, memoryview(self.header.pack()), 0)
        os.fdatasync(self.file.fd)
        self._header_dirty = False

    # -- corruption -----------------------------------------------------------------------

    def _corruption(self, exc: Qcow2Corruption) -> Exception:
        """What a request that found ``exc`` raises: EIO, the image marked corrupt the first
        time; on a read-only image a plain ImageFormatError (an image above this one in a
        chain must not take it for its own)."""
        if self.read_only:
            return ImageFormatError(str(exc))
        if not self.corrupt:
            self._mark_corrupt(str(exc))
        return OSError(errno.EIO, f"{exc} (image marked corrupt)")

    def _mark_corrupt(self, reason: str) -> None:
        """Stop writes and set the header's corrupt bit (version 3; version 2 has no field for
        it), once; the one log line of the event."""
        self.corrupt = True
        if self.v3:
            self.header.incompatible_features |= INCOMPAT_CORRUPT
            self.write_header_sync()
            log.error(
                "%s; marking the image corrupt: writes fail, and it opens read-only until repaired",
                reason,
            )
        else:
            log.error(
                "%s; the image is corrupt: writes fail (a version 2 image cannot record it)",
                reason,
            )

    # -- interface ------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "qcow2"

    # -- reads ----------------------------------------------------------------------------

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        length = len(buf)
        # Fast path: inside one cluster of a plain allocated entry in a cached L2 table.
        within = offset & self._cluster_mask
        if within + length <= self.cluster_size and not self.extended_l2:
            l1_index = offset >> self._l1_shift
            table = self.l2cache.tables.get(self.l1[l1_index] & L1E_OFFSET_MASK)
            if table is not None:
                entry = table[(offset >> self.cluster_bits) & self._l2_mask]
                host = entry & L2E_OFFSET_MASK
                if (
                    host
                    and not entry & _NOT_PLAIN
                    and not host & self._cluster_mask
                    and host >> self.cluster_bits not in self.meta
                ):
                    return self.file.read_nowait(host + within, buf)
        try:
            return self._read_mapped_nowait(offset, buf)
        except Qcow2Corruption as exc:
            raise self._corruption(exc) from None

    def _read_mapped_nowait(self, offset: int, buf: memoryview) -> bool:
        """``read_nowait`` past its fast path: any range, through ``_map_cached``."""
        length = len(buf)
        mapping = self._map_cached(offset, length)
        if mapping is None:
            return False
        kind, val, run = mapping
        if run == length:
            if kind == DATA:
                return self.file.read_nowait(val, buf)
            if kind == ZERO or (kind == BACKING and self.backing is None):
                buf[:] = _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)
                return True
            return False
        pos = 0
        while pos < length:
            if pos:
                mapping = self._map_cached(offset + pos, length - pos)
                if mapping is None:
                    return False
                kind, val, run = mapping
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
        try:
            await self._read(offset, buf)
        except Qcow2Corruption as exc:
            raise self._corruption(exc) from None

    async def _read(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        pos = 0
        while pos < length:
            kind, val, run = await self._map(offset + pos, length - pos)
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
        length = len(view)
        have = 0 if backing is None else max(0, min(length, backing.size - offset))
        if have:
            part = view[:have]
            if not backing.read_nowait(offset, part):  # type: ignore[union-attr]
                await backing.read(offset, part)  # type: ignore[union-attr]
        if have < length:
            view[have:] = bytes(length - have)

    async def _compressed(self, entry: int, guest_cluster: int) -> bytes:
        if self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        coffset, csize = self.compressed_span(entry)
        if coffset >= MAX_HOST_OFFSET or coffset == 0:
            raise Qcow2Corruption(
                f"{self._where(guest_cluster)}: compressed offset {coffset:#x} invalid"
            )
        for host in range(coffset & ~self._cluster_mask, coffset + csize, self.cluster_size):
            self._check_not_metadata(host, guest_cluster)
        raw = bytearray(csize)
        await self.file.read(coffset, memoryview(raw))
        data = decompress_cluster(
            self.header.compression_type, bytes(raw), self.cluster_size, self._where(guest_cluster)
        )
        self._compressed_cache = (entry, data)
        return data

    # -- writes ---------------------------------------------------------------------------

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if not self._writable():
            return False
        host_offset = self._overwrite_at(offset, len(data))
        return host_offset is not None and self.file.write_nowait(host_offset, data)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._check_writable()
        # The lock-free overwrite must not wait between finding its cluster and writing
        # it: a discard could free the cluster meanwhile and an allocation reuse it.
        if not fua and self.write_nowait(offset, data):
            return
        async with self.lock:
            self._check_writable()  # another request may have found corruption meanwhile
            try:
                await self._write_locked(offset, data)
                if fua or len(self.l2cache.dirty) > MAX_DIRTY_L2:
                    await self._flush_locked()
            except Qcow2Corruption as exc:
                raise self._corruption(exc) from None

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        cluster_size = self.cluster_size
        first = -(-offset // cluster_size)
        last = (offset + length) // cluster_size
        if (offset + length) == self.size:
            last = -(-self.size // cluster_size)
        if last <= first:
            return
        if self.backing is not None and not self.v3:
            return  # v2 cannot hide the backing file; discard is only a hint
        async with self.lock:
            self._check_writable()
            value = OFLAG_ZERO if self.backing is not None else 0
            try:
                await self._set_entries(first, last - first, value)
                if fua:
                    await self._flush_locked()
            except Qcow2Corruption as exc:
                raise self._corruption(exc) from None

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
        cluster_size = self.cluster_size
        end = offset + length
        first = -(-offset // cluster_size)
        last = end // cluster_size
        if end == self.size:
            last = -(-self.size // cluster_size)
        can_flag = self.v3 or self.backing is None
        aligned = can_flag and last > first
        if fast_only and (
            not aligned
            or offset != first * cluster_size
            or min(end, self.size) > last * cluster_size
        ):
            raise OSError(errno.ENOTSUP, "zeroing would be as slow as writing")
        if not aligned:
            await self._write_zero_buffers(offset, end)
        else:
            if offset < first * cluster_size:
                await self._write_zero_buffers(offset, first * cluster_size)
            if end > last * cluster_size:
                await self._write_zero_buffers(last * cluster_size, end)
            async with self.lock:
                self._check_writable()
                try:
                    await self._set_entries(first, last - first, OFLAG_ZERO if self.v3 else 0)
                except Qcow2Corruption as exc:
                    raise self._corruption(exc) from None
        if fua:
            await self.flush()

    async def _write_zero_buffers(self, start: int, end: int) -> None:
        while start < end:
            length = min(end - start, len(_ZEROS))
            await self.write(start, _ZEROS[:length])
            start += length

    async def flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            try:
                await self._flush_locked()
            except Qcow2Corruption as exc:
                raise self._corruption(exc) from None

    # -- block status ---------------------------------------------------------------------

    async def extents(self, offset: int, length: int) -> list[Extent]:
        try:
            return await self._extents(offset, length)
        except Qcow2Corruption as exc:
            raise self._corruption(exc) from None

    async def _extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end and len(out) < 1024:
            kind, val, run = await self._map(pos, end - pos)
            if kind == BACKING and self.backing is not None and pos < self.backing.size:
                run = min(run, self.backing.size - pos)
                for ext in await self.backing.extents(pos, run):
                    part = min(ext.length, run)
                    out.append(Extent(part, ext.flags))
                    run -= part
                    pos += part
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

    async def own_status(self, offset: int, length: int) -> tuple[int, int]:
        """(kind, run) of what the image itself holds from ``offset`` (``OwnStatus``)."""
        try:
            kind, _, run = await self._map(offset, length)
        except Qcow2Corruption as exc:
            raise self._corruption(exc) from None
        return kind, run

    def block_status(self, offset: int, length: int) -> tuple[int, int, int]:
        """(kind, host offset, run) for tools such as ``tap-img map`` (blocking)."""
        mapping = self._map_cached(offset, length)
        if mapping is None:
            guest_cluster = offset >> self.cluster_bits
            self.load_l2_sync(self.l1[guest_cluster >> self.l2_bits] & L1E_OFFSET_MASK)
            mapping = self._map_cached(offset, length)
        assert mapping is not None
        return mapping

    async def close(self) -> None:
        try:
            if not self.read_only and self.refcounts is not None and self.file.fd >= 0:
                await self.flush()
        finally:
            self.file.close()
            if self.backing is not None:
                await self.backing.close()
                self.backing = None
