"""Legacy QCOW (version 1) images, ``qcow:/path``: read, write, backing file, compressed read.

QCOW v1 has no refcounts: new L2 tables and data clusters are appended at the
cluster-aligned end of the file, data first and the table entry that points
at it afterwards, so a crash can leak space but never expose a reference to
unwritten metadata.  Compressed clusters (bit 63) are read with raw deflate; a
write into one moves the cluster to a new, uncompressed one.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from array import array

from .base import Capabilities, Extent, ExtentFlags, Image, ImageFormatError
from .fileio import ImageFile, pread_full
from .qcow2.backing import open_backing
from .registry import OpenOptions

MAGIC = 0x514649FB
HEADER = struct.Struct(">IIQIIQBBxxIQ")
OFLAG_COMPRESSED = 1 << 63
MAX_L1_BYTES = 32 << 20


def open_qcow(path: str, options: OpenOptions) -> QcowImage:
    """Opener registered for ``qcow:``."""
    return QcowImage(path, options)


def create_qcow(
    path: str, size: int, *, backing_file: str | None = None, cluster_bits: int | None = None
) -> None:
    """Write a new, empty QCOW v1 image with qemu's default geometry."""
    if os.path.exists(path):
        raise ImageFormatError(f"{path} already exists")
    if cluster_bits is None:
        cluster_bits, l2_bits = (9, 12) if backing_file else (12, 9)
    else:
        l2_bits = cluster_bits - 3
    name = backing_file.encode() if backing_file else b""
    l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    l1_off = -(-(HEADER.size + len(name)) // 8) * 8
    header = HEADER.pack(
        MAGIC,
        1,
        HEADER.size if name else 0,
        len(name),
        0,
        size,
        cluster_bits,
        l2_bits,
        0,
        l1_off,
    )
    with open(path, "xb") as f:
        f.write(header + name)
        f.truncate(l1_off + l1_size * 8)
        f.flush()
        os.fsync(f.fileno())


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

    def _open(self, options: OpenOptions) -> None:
        fd = self.file.fd
        file_size = os.fstat(fd).st_size
        raw = bytearray(HEADER.size)
        pread_full(fd, memoryview(raw), 0)
        (magic, version, bfo, bfs, _mtime, size, cb, l2b, crypt, l1_off) = HEADER.unpack(raw)
        where = self.path
        if magic != MAGIC or version != 1:
            raise ImageFormatError(f"{where}: magic/version is not QCOW version 1")
        if not 9 <= cb <= 16:
            raise ImageFormatError(f"{where}: header field cluster_bits is {cb}, expected 9..16")
        if not 6 <= l2b <= 13:
            raise ImageFormatError(f"{where}: header field l2_bits is {l2b}, expected 6..13")
        if crypt:
            raise ImageFormatError(f"{where}: header field crypt_method is {crypt}: not supported")
        if size <= 1 or size >= 1 << 56:
            raise ImageFormatError(f"{where}: header field size {size} out of range")
        self.size = size
        self.cluster_bits = cb
        self.cluster_size = 1 << cb
        self.l2_bits = l2b
        l1_size = -(-size // (1 << (cb + l2b)))
        if l1_size * 8 > MAX_L1_BYTES:
            raise ImageFormatError(f"{where}: L1 table for size {size} is too large")
        if l1_off % 8 or l1_off < HEADER.size or l1_off + l1_size * 8 > file_size:
            raise ImageFormatError(f"{where}: header field l1_table_offset {l1_off:#x} is invalid")
        self.l1_offset = l1_off
        raw_l1 = bytearray(l1_size * 8)
        pread_full(fd, memoryview(raw_l1), l1_off)
        self.l1 = array("Q", raw_l1)
        self.l1.byteswap()
        self.l2_bytes = 8 << l2b
        for i, e in enumerate(self.l1):
            if e and (e % 8 or e + self.l2_bytes > file_size or e < l1_off + l1_size * 8):
                raise ImageFormatError(f"{where}: L1 entry {i} ({e:#x}) is invalid")
        self.l2cache: dict[int, array] = {}
        self.end = -(-file_size // self.cluster_size) * self.cluster_size
        self.lock = asyncio.Lock()
        if bfo:
            if bfs == 0 or bfs > 1023 or bfo + bfs > min(file_size, l1_off):
                raise ImageFormatError(f"{where}: header field backing_file_offset is invalid")
            name = bytearray(bfs)
            pread_full(fd, memoryview(name), bfo)
            self.backing = open_backing(self.path, name.decode("utf-8", "replace"), None, options)
        self._caps = Capabilities(trim=False, zero=not self.read_only, extents=True)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "qcow"

    async def _l2(self, off: int) -> array:
        table = self.l2cache.get(off)
        if table is None:
            raw = bytearray(self.l2_bytes)
            await self.file.read(off, memoryview(raw))
            table = array("Q", raw)
            table.byteswap()
            if len(self.l2cache) > 4096:
                self.l2cache.clear()
            self.l2cache[off] = table
        return table

    async def _entry(self, gc: int) -> int:
        l1i = gc >> self.l2_bits
        l2off = self.l1[l1i] if l1i < len(self.l1) else 0
        if not l2off:
            return 0
        table = await self._l2(l2off)
        return table[gc & ((1 << self.l2_bits) - 1)]

    async def _decompress(self, entry: int, gc: int) -> bytes:
        shift = 63 - self.cluster_bits
        csize = (entry >> shift) & (self.cluster_size - 1)
        coff = entry & ((1 << shift) - 1)
        raw = bytearray(csize)
        await self.file.read(coff, memoryview(raw))
        try:
            out = zlib.decompressobj(-15).decompress(bytes(raw), self.cluster_size)
        except zlib.error as exc:
            raise ImageFormatError(f"{self.path}: guest cluster {gc}: bad deflate data") from exc
        if len(out) != self.cluster_size:
            raise ImageFormatError(f"{self.path}: guest cluster {gc}: short compressed cluster")
        return out

    async def read(self, offset: int, buf: memoryview) -> None:
        pos = 0
        n = len(buf)
        cs = self.cluster_size
        while pos < n:
            off = offset + pos
            gc = off >> self.cluster_bits
            within = off & (cs - 1)
            run = min(cs - within, n - pos)
            view = buf[pos : pos + run]
            entry = await self._entry(gc)
            if entry & OFLAG_COMPRESSED:
                data = await self._decompress(entry, gc)
                view[:] = data[within : within + run]
            elif entry:
                await self.file.read(entry + within, view)
            else:
                await self._read_backing(off, view)
            pos += run

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        n = len(view)
        backing = self.backing
        have = 0 if backing is None else max(0, min(n, backing.size - offset))
        if have and backing is not None:
            await backing.read(offset, view[:have])
        if have < n:
            view[have:] = bytes(n - have)

    def _append(self, length: int) -> int:
        off = self.end
        self.end += -(-length // self.cluster_size) * self.cluster_size
        return off

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, f"{self.path} is open read-only")
        cs = self.cluster_size
        async with self.lock:
            pos = 0
            while pos < len(data):
                off = offset + pos
                gc = off >> self.cluster_bits
                within = off & (cs - 1)
                run = min(cs - within, len(data) - pos)
                entry = await self._entry(gc)
                if entry and not entry & OFLAG_COMPRESSED:
                    await self.file.write(entry + within, data[pos : pos + run])
                else:
                    buf = bytearray(cs)
                    if run < cs:
                        await self.read(gc << self.cluster_bits, memoryview(buf))
                    buf[within : within + run] = data[pos : pos + run]
                    host = self._append(cs)
                    await self.file.write(host, memoryview(buf))
                    await self._set_entry(gc, host)
                pos += run
            if fua:
                await self.file.sync()

    async def _set_entry(self, gc: int, value: int) -> None:
        l1i = gc >> self.l2_bits
        l2off = self.l1[l1i]
        if not l2off:
            l2off = self._append(self.l2_bytes)
            await self.file.write(l2off, memoryview(bytes(self.l2_bytes)))
            await self.file.sync()
            self.l1[l1i] = l2off
            await self.file.write(self.l1_offset + 8 * l1i, memoryview(l2off.to_bytes(8, "big")))
        table = await self._l2(l2off)
        idx = gc & ((1 << self.l2_bits) - 1)
        table[idx] = value
        await self.file.write(l2off + 8 * idx, memoryview(value.to_bytes(8, "big")))

    async def flush(self) -> None:
        if not self.read_only:
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
        if fast_only:
            raise OSError(errno.ENOTSUP, "qcow v1 cannot zero without writing")
        zeros = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            await self.write(offset, zeros[:n], fua=False)
            offset += n
        if fua:
            await self.file.sync()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            gc = pos >> self.cluster_bits
            run = min(((gc + 1) << self.cluster_bits) - pos, end - pos)
            entry = await self._entry(gc)
            if entry:
                flags = ExtentFlags.DATA
            elif self.backing is not None and pos < self.backing.size:
                run = min(run, self.backing.size - pos)
                flags = (await self.backing.extents(pos, run))[0].flags
            else:
                flags = ExtentFlags.HOLE | ExtentFlags.ZERO
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + run, flags)
            else:
                out.append(Extent(run, flags))
            pos += run
        return out or [Extent(length, ExtentFlags.DATA)]

    def allocated(self, gc: int) -> bool:
        """Whether guest cluster ``gc`` is stored in this image (blocking; for tools)."""
        l1i = gc >> self.l2_bits
        l2off = self.l1[l1i] if l1i < len(self.l1) else 0
        if not l2off:
            return False
        raw = bytearray(8)
        pread_full(self.file.fd, memoryview(raw), l2off + 8 * (gc & ((1 << self.l2_bits) - 1)))
        return raw != bytes(8)

    async def close(self) -> None:
        try:
            if not self.read_only and self.file.fd >= 0:
                await self.file.sync()
        finally:
            self.file.close()
            if self.backing is not None:
                await self.backing.close()
                self.backing = None
