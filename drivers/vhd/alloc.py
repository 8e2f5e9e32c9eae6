"""The block map of a dynamic or differencing VHD: cached BAT, bitmaps and batmap, and allocation.

Crash ordering (kill -9 at any instant leaves an image that opens and checks):

1. A new block is placed at the end of the data, its data area 4 KiB aligned.
   The footer is written at the block's new end *first*, so the file always
   ends in a valid footer, never a torn one;
2. stale bytes in the block's range (an old footer, a block leaked by an earlier
   crash) are zeroed; the data is written, then the sector bitmap, then the BAT
   sector that makes the block visible.

A crash before step 2 completes leaves at worst that one block unreferenced
(leaked); the next allocation reuses the space.  Writing into an allocated
block writes the data before the bitmap bits that expose it.  The batmap only
ever gains bits (a block's bitmap never loses bits), so on disk it may lag
behind memory but is never wrong; it is rewritten at flush and close.
Everything lives in the page cache until ``flush`` calls fdatasync.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from array import array

from ..fileio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ImageFile, is_unsupported
from . import bitmap as bits
from .format import (
    BAT_UNUSED,
    BATMAP_VERSION,
    DATA_ALIGN,
    MAX_FILE_OFFSET,
    SECTOR,
    batmap_checksum,
)
from .meta import Metadata, bat_to_bytes

ZERO_CHUNK = 1 << 20


class BlockStore:
    """In-memory BAT, sector bitmaps and batmap of one image, kept in step with the file."""

    def __init__(self, file: ImageFile, meta: Metadata) -> None:
        assert meta.header is not None and meta.bat is not None
        self.file = file
        self.meta = meta
        self.bat: array[int] = meta.bat
        self.block_size = meta.header.block_size
        self.shift = self.block_size.bit_length() - 1
        self.sectors_per_block = self.block_size // SECTOR
        self.bitmap_size = meta.bitmap_size
        self.blocks = meta.blocks
        self.footer_bytes = meta.footer.pack()
        self.file_size = meta.file_size
        self.is_block_device = stat.S_ISBLK(os.fstat(file.fd).st_mode)
        self.next_free = meta.data_end
        #: Byte offset of a block's data when its bitmap is full (reads need no bitmap); else 0.
        self.fast = [0] * self.blocks
        self.bitmaps: dict[int, bytearray] = {}
        self.batmap = meta.batmap
        self.batmap_dirty = False
        self.lock = asyncio.Lock()
        self._can_punch = True
        for b in range(self.blocks):
            entry = self.bat[b]
            if entry != BAT_UNUSED and self.batmap is not None and bits.test_bit(self.batmap, b):
                self.fast[b] = self.data_base(b)

    def data_base(self, b: int) -> int:
        return self.bat[b] * SECTOR + self.bitmap_size

    async def bitmap(self, b: int) -> bytearray:
        """The cached sector bitmap of allocated block ``b``, read on first use."""
        cached = self.bitmaps.get(b)
        if cached is not None:
            return cached
        buf = bytearray(self.bitmap_size)
        await self.file.read(self.bat[b] * SECTOR, memoryview(buf))
        stored = self.bitmaps.setdefault(b, buf)
        if stored is buf and bits.is_full(buf, self.sectors_per_block):
            self.fast[b] = self.data_base(b)
        return stored

    async def mark_written(self, b: int, first: int, stop: int) -> None:
        """Expose sectors [first, stop) of block ``b`` after their data was written."""
        bm = await self.bitmap(b)
        if bits.all_set(bm, first, stop):
            return
        async with self.lock:
            if not bits.set_range(bm, first, stop):
                return
            await self.file.write(self.bat[b] * SECTOR, memoryview(bm))
            self._note_full(b, bm)

    def _note_full(self, b: int, bm: bytearray) -> None:
        if bits.is_full(bm, self.sectors_per_block):
            self.fast[b] = self.data_base(b)
            if self.batmap is not None and not bits.test_bit(self.batmap, b):
                bits.set_bit(self.batmap, b)
                self.batmap_dirty = True

    async def allocate(self, b: int, in_block: int, data: memoryview) -> bool:
        """Allocate block ``b`` holding ``data`` at sector-aligned ``in_block``.

        Returns False (having written nothing) when another request allocated
        the block meanwhile; the caller then writes into it normally.
        """
        async with self.lock:
            if self.bat[b] != BAT_UNUSED:
                return False
            bm_size = self.bitmap_size
            start = -(-(self.next_free + bm_size) // DATA_ALIGN) * DATA_ALIGN - bm_size
            end = start + bm_size + self.block_size
            if end > MAX_FILE_OFFSET:
                raise OSError(errno.ENOSPC, f"{self.meta.path}: VHD file would exceed 2 TiB")
            old_size = self.file_size
            if self.is_block_device:
                # A volume does not grow: the footer follows the data inside it.
                if end + SECTOR > old_size:
                    raise OSError(errno.ENOSPC, f"{self.meta.path}: volume is full")
                await self.file.write(end, memoryview(self.footer_bytes))
            elif end + SECTOR > old_size:
                await self.file.write(end, memoryview(self.footer_bytes))
                self.file_size = end + SECTOR
            if min(end, old_size) > start:
                await self.zero_range(start, min(end, old_size) - start)
            await self.file.write(start + bm_size + in_block, data)
            bm = bytearray(bm_size)
            first = in_block // SECTOR
            bits.set_range(bm, first, first + len(data) // SECTOR)
            await self.file.write(start, memoryview(bm))
            self.bat[b] = start // SECTOR
            await self._write_bat_sector(b)
            self.next_free = end
            self.bitmaps[b] = bm
            self._note_full(b, bm)
            return True

    async def _write_bat_sector(self, b: int) -> None:
        assert self.meta.header is not None
        first = b - b % (SECTOR // 4)
        chunk = self.bat[first : first + SECTOR // 4]
        raw = bat_to_bytes(chunk).ljust(SECTOR, b"\xff")
        await self.file.write(self.meta.header.table_offset + first * 4, memoryview(raw))

    async def write_batmap(self) -> None:
        """Persist the batmap header and map in one write (map follows its header)."""
        hdr = self.meta.batmap_header
        if self.batmap is None or hdr is None or not self.batmap_dirty:
            return
        hdr.version = BATMAP_VERSION
        hdr.checksum = batmap_checksum(self.batmap, self.meta.footer.current_size, hdr.version)
        hoff = self.meta.batmap_offset
        if hdr.offset == hoff + SECTOR:
            await self.file.write(hoff, memoryview(hdr.pack() + bytes(self.batmap)))
        else:
            await self.file.write(hdr.offset, memoryview(bytes(self.batmap)))
            await self.file.write(hoff, memoryview(hdr.pack()))
        self.batmap_dirty = False

    async def zero_range(self, offset: int, length: int) -> None:
        """Make file bytes [offset, offset+length) zero: punch a hole, or write zeros."""
        if self._can_punch:
            try:
                await self.file.fallocate(
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
                )
                return
            except OSError as exc:
                if not is_unsupported(exc):
                    raise
                self._can_punch = False
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            await self.file.write(offset, zeros[:n])
            offset += n
