"""Raw images (``raw:/path``, alias ``aio:``): regular files and block devices.

Reads and writes go straight between the caller's buffer and the file with
preadv/pwritev.  TRIM punches holes, WRITE_ZEROES uses ZERO_RANGE or a punch
(with a plain zero-buffer fallback where the file system refuses, as tmpfs
refuses ZERO_RANGE), and block status comes from SEEK_DATA/SEEK_HOLE.  With
``direct`` the page cache is bypassed through page-aligned bounce buffers.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

from .base import Capabilities, Extent, ExtentFlags, Image, ImageError
from .fileio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ImageFile,
    is_unsupported,
)
from .registry import NewBacking, OpenOptions

#: O_DIRECT alignment: the largest logical block size in common use.
DIRECT_ALIGN = 4096
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
#: Largest zero buffer written at once when zeroing has to be emulated.
ZERO_CHUNK = 1 << 20


def open_raw(path: str, options: OpenOptions) -> RawImage:
    """Opener registered for ``raw:`` and ``aio:``."""
    return RawImage(path, read_only=options.read_only, direct=options.direct)


def create_raw(path: str, size: int, backing: NewBacking | None, options: dict[str, str]) -> None:
    """Creator registered for ``raw:``: a sparse file of ``size`` bytes (takes no options)."""
    if backing is not None:
        raise ImageError("raw images cannot have a backing file")
    with open(path, "xb") as f:
        f.truncate(size)


class RawImage(Image):
    """A raw file or block device, byte for byte the virtual disk."""

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        self.spec = f"raw:{path}"
        self.read_only = read_only
        self.file = ImageFile(path, writable=not read_only, direct=direct)
        mode = os.fstat(self.file.fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        self.size = self.file.size()
        self.block_size = DIRECT_ALIGN if direct else 1
        # fallocate modes the file system refused, so we stop asking.
        self._refused: set[int] = {PUNCH} if self.is_block_device else set()
        self._caps = Capabilities(
            trim=not self.is_block_device and not read_only,
            zero=not read_only,
            fast_zero=not read_only,
            extents=not self.is_block_device,
            cache=True,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "raw"

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return self.file.read_nowait(offset, buf)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        return self.file.write_nowait(offset, data)

    async def read(self, offset: int, buf: memoryview) -> None:
        if self.file.direct:
            await self._direct_read(offset, buf)
        else:
            await self.file.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if self.file.direct:
            await self._direct_write(offset, data)
        else:
            await self.file.write(offset, data)
        if fua:
            await self.file.sync()

    async def flush(self) -> None:
        await self.file.sync()

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        await self._try_fallocate(PUNCH, offset, length)
        if fua:
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
        if not await self._zero_in_place(offset, length, may_unmap):
            if fast_only:
                raise OSError(errno.ENOTSUP, "zeroing would be as slow as writing")
            await self._write_zero_buffers(offset, length)
        if fua:
            await self.file.sync()

    async def _zero_in_place(self, offset: int, length: int, may_unmap: bool) -> bool:
        """Zero with fallocate; False if the file system supports neither mode."""
        if may_unmap and await self._try_fallocate(PUNCH, offset, length):
            return True
        return await self._try_fallocate(ZERO_RANGE, offset, length)

    async def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate with ``mode``; False, and remembered, where the file system refuses it."""
        if mode in self._refused:
            return False
        try:
            await self.file.fallocate(mode, offset, length)
        except OSError as exc:
            if not is_unsupported(exc):
                raise
            self._refused.add(mode)
            return False
        return True

    async def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            await self.write(offset, zeros[:n])
            offset += n

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if self.is_block_device:
            return [Extent(length, ExtentFlags.DATA)]
        fd = self.file.fd
        end = min(offset + length, self.size)
        result: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data_start = end
            if data_start > pos:
                hole_end = min(data_start, end)
                result.append(Extent(hole_end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
                pos = hole_end
                continue
            try:
                data_end = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_end = end
            data_end = min(max(data_end, pos + 1), end)
            result.append(Extent(data_end - pos, ExtentFlags.DATA))
            pos = data_end
        return result or [Extent(length, ExtentFlags.DATA)]

    async def cache(self, offset: int, length: int) -> None:
        if not self.file.direct:
            os.posix_fadvise(self.file.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        self.file.close()

    # O_DIRECT needs offsets, lengths and memory aligned to the device's
    # logical block size; clients are told the alignment, and anything that
    # still arrives unaligned goes through an aligned bounce buffer.

    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        return start, end - start

    async def _direct_read(self, offset: int, buf: memoryview) -> None:
        start, span = self._aligned_span(offset, len(buf))
        bounce = _bounce_buffer(span)
        await self.file.read(start, bounce)
        skip = offset - start
        buf[:] = bounce[skip : skip + len(buf)]

    async def _direct_write(self, offset: int, data: memoryview) -> None:
        start, span = self._aligned_span(offset, len(data))
        bounce = _bounce_buffer(span)
        if start != offset or span != len(data):
            await self.file.read(start, bounce)  # read-modify-write of edge blocks
        skip = offset - start
        bounce[skip : skip + len(data)] = data
        await self.file.write(start, bounce)
        if start + span > self.size:
            # Whole blocks went past an unaligned end of file: cut it back.
            await self.file.truncate(self.size)


def _bounce_buffer(size: int) -> memoryview:
    """A page-aligned buffer for O_DIRECT I/O.

    The mapping is never closed explicitly: an I/O thread may still hold a
    view of it for a moment after the await returns, and ``mmap.close`` would
    then fail with BufferError.  It is unmapped when the last view goes.
    """
    return memoryview(mmap.mmap(-1, size))
