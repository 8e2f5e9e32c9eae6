"""The changed-block tracking layer: marks every block a write touches in a blktap CBT log.

What blktap's ``log`` driver does, as an ``Image`` over any image stack:

1. Opening maps the log's header and bitmap shared (the bitmap's extent comes
   from the disk's virtual size, not from the log's header or length); a
   missing or short log is an error, and a log is never created here.
2. Every write, write-zeroes and trim sets the bits of the first to the last
   64 KiB block it touches, then goes down, whatever its outcome: over-marking
   is harmless, a missed mark silently corrupts an incremental backup.  Reads,
   flushes and prefetches mark nothing.
3. A mark is a store into the shared mapping, i.e. into the file's page cache:
   SM and ``cbt-util`` reading the file see it at once, and it outlives a
   killed tapdisk.  A block already marked costs one byte load, no system call.
4. A flush (and a FUA request) first msyncs the log if anything was marked
   since the last one, so a write made durable has a durable mark.  msync
   costs a disk write; it is never paid per write.
5. Pausing releases the log (writes then fail rather than go unmarked);
   ``open_log`` maps a log again, perhaps another one that SM renamed or
   coalesced into meanwhile.

The header belongs to SM: this layer never writes it.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os

from . import cbt
from .base import Image, ImageError, IoDone
from .fileio import io_pool
from .layer import Layer
from .paths import open_disk

_SHIFT = cbt.BLOCK_SHIFT
_BASE = cbt.HEADER.size
#: Blocks one ``changed_extents`` call looks at (4 GiB of disk, 8 KiB of bitmap).
QUERY_BLOCKS = 1 << 16


class CbtImage(Layer):
    """Forwards to ``inner`` after marking, in the log at ``log_path``, what each write touches."""

    def __init__(self, inner: Image, log_path: str) -> None:
        super().__init__(inner)
        #: The log being marked, None while released.
        self.log_path: str | None = None
        self._map: mmap.mmap | None = None
        self._bits: memoryview | None = None  # the mapping, header included
        self._unsynced = False
        self.open_log(log_path)

    # -- the log ---------------------------------------------------------------

    def open_log(self, path: str) -> None:
        """Map the log at ``path`` and mark into it from now on (releasing any other)."""
        self.release_log()
        length = _BASE + cbt.bitmap_size(self.size)
        try:
            fd = open_disk(path, os.O_RDWR)  # a FIFO would hang the read below
        except FileNotFoundError:
            raise ImageError(f"CBT log {path}: no such file (logs are made by cbt-util)") from None
        except OSError as exc:
            raise ImageError(f"CBT log {path}: {exc.strerror}") from None
        try:
            # Reading it all proves it is long enough (a short mapping would kill us with
            # SIGBUS on the first mark past its end) and brings its pages into the cache.
            cbt.read_exact(fd, path, 0, length, f"bitmap for a {self.size}-byte disk")
            mapping = mmap.mmap(fd, length, mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        self._map = mapping
        self._bits = memoryview(mapping)
        self._unsynced = False
        self.log_path = path

    def release_log(self) -> None:
        """Unmap the log; until ``open_log``, writes fail instead of going unmarked."""
        if self._map is None:
            return
        assert self._bits is not None
        self._bits.release()
        self._map.close()
        self._map = self._bits = None
        self.log_path = None

    def _mark(self, offset: int, length: int) -> None:
        """Set the bits of the blocks ``[offset, offset + length)`` touches."""
        bits = self._bits
        if bits is None:
            raise OSError(errno.EIO, f"{self.spec}: CBT log released; write refused")
        first = offset >> _SHIFT
        last = (offset + length - 1) >> _SHIFT
        if first == last:
            i = _BASE + (first >> 3)
            bit = 1 << (first & 7)
            byte = bits[i]
            if not byte & bit:
                bits[i] = byte | bit
                self._unsynced = True
        elif last > first:
            self._mark_blocks(bits, first, last)

    def _mark_blocks(self, bits: memoryview, first: int, last: int) -> None:
        """Set bits ``first`` to ``last`` (inclusive), storing only bytes that change."""
        lo = _BASE + (first >> 3)
        hi = _BASE + (last >> 3)
        head = (0xFF << (first & 7)) & 0xFF
        tail = 0xFF >> (7 - (last & 7))
        if lo == hi:
            self._set(bits, lo, head & tail)
            return
        self._set(bits, lo, head)
        middle = hi - lo - 1
        if middle and bits[lo + 1 : hi].tobytes().count(0xFF) != middle:
            bits[lo + 1 : hi] = b"\xff" * middle
            self._unsynced = True
        self._set(bits, hi, tail)

    def _set(self, bits: memoryview, i: int, mask: int) -> None:
        byte = bits[i]
        if byte & mask != mask:
            bits[i] = byte | mask
            self._unsynced = True

    async def _sync_log(self) -> None:
        """msync the log if anything was marked since the last time."""
        if not self._unsynced or self._map is None:
            return
        self._unsynced = False
        try:
            await asyncio.get_running_loop().run_in_executor(io_pool(), self._map.flush)
        except BaseException:
            self._unsynced = True
            raise

    def changed_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs of marked (True) and unmarked (False) bytes from ``offset``, in order.

        They cover ``[offset, offset + length)`` clipped to the disk, or less
        when that spans more than QUERY_BLOCKS blocks (the caller asks again).
        This is the NBD meta context ``qemu:dirty-bitmap:cbt``: marked is flag 1.
        """
        bits = self._bits
        if bits is None:
            raise OSError(errno.EIO, f"{self.spec}: CBT log released")
        first = offset >> _SHIFT
        end = min(offset + length, self.size, (first + QUERY_BLOCKS) << _SHIFT)
        if end <= offset:
            return []
        last = (end - 1) >> _SHIFT
        lo = first >> 3
        chunk = bits[_BASE + lo : _BASE + (last >> 3) + 1]
        # One character per block, block order: "1" where marked.
        flags = format(int.from_bytes(chunk, "little"), f"0{len(chunk) * 8}b")[::-1]
        flags = flags[first - lo * 8 : last - lo * 8 + 1]
        extents: list[tuple[int, bool]] = []
        start, pos = offset, 0
        while pos < len(flags):
            marked = flags[pos] == "1"
            nxt = flags.find("0" if marked else "1", pos)
            pos = len(flags) if nxt < 0 else nxt
            stop = min((first + pos) << _SHIFT, end)
            extents.append((stop - start, marked))
            start = stop
        return extents

    # -- the Image interface ---------------------------------------------------

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        self._mark(offset, len(data))
        return self.inner.write_nowait(offset, data)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        if fua:
            return False  # the log is synced first, in write
        self._mark(offset, len(data))  # as write_nowait: a mark for a write not made is harmless
        return self.inner.start_write(offset, data, fua, done)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._mark(offset, len(data))
        if fua:
            await self._sync_log()
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self._sync_log()
        await self.inner.flush()

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._mark(offset, length)
        if fua:
            await self._sync_log()
        await self.inner.discard(offset, length, fua)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        self._mark(offset, length)
        if fua:
            await self._sync_log()
        await self.inner.write_zeroes(
            offset, length, may_unmap=may_unmap, fast_only=fast_only, fua=fua
        )

    async def close(self) -> None:
        self.release_log()
        await self.inner.close()
