"""``vhd-util read``: the headers, and what the BAT, bitmaps, batmap and data hold.

Each flag is blktap's, with its output: text lines for the headers (``-p``), the
sector map (``-t``), BAT entries (``-b``), bitmap tests (``-i``) and extents
(``-e``); raw bytes for the BAT as a bitmap (``-B``, SM's ``getBlockBitmap``),
sector bitmaps (``-m``), the batmap (``-a``), stored blocks (``-d``) and data read
through the chain (``-r`` sectors, ``-R`` bytes).  ``-c`` counts units, ``-x``
prints numbers in hex.  blktap answers ``-j`` (batmap test) on stderr; so does this.
Flags run in blktap's order and the first failure ends the command with its errno.

A fixed VHD has no BAT, bitmaps or batmap: flags about them are refused with a
line saying so (blktap fails every flag on one, ``-p`` included; this prints its
footer and reads its data).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys

from tapdisk.drivers.base import ImageError
from tapdisk.drivers.paths import open_disk
from tapdisk.drivers.vhd import bitmap as bits
from tapdisk.drivers.vhd.format import BAT_UNUSED, SECTOR, has_batmap
from tapdisk.drivers.vhd.image import VhdImage
from tapdisk.drivers.vhd.meta import Metadata, read_at

from .args import no_operands, number, parse_options, require
from .chain import ANYWHERE, open_meta
from .summary import num, print_summaries

USAGE = (
    "options:\n"
    "-h          help\n"
    "-n          name\n"
    "-p          print VHD headers\n"
    "-t sec      translate logical sector to VHD location\n"
    "-b blk      print bat entry\n"
    "-B          print entire bat as a bitmap\n"
    "-m blk      print bitmap\n"
    "-i sec      test bitmap for logical sector\n"
    "-e sec      output extent list of allocated logical sectors\n"
    "-a          print batmap\n"
    "-j blk      test batmap for block\n"
    "-d blk      print data\n"
    "-c num      num units\n"
    "-r sec      read num sectors at sec\n"
    "-R byte     read num bytes at byte\n"
    "-x          print in hex"
)

#: Flags that need the BAT (so a fixed VHD cannot answer them), in blktap's order.
BAT_FLAGS = "tbBmieajd"


class ReadError(Exception):
    """A flag that cannot be answered; ``errno`` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


def cmd_read(argv: list[str]) -> int:
    o, rest = parse_options(argv, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", USAGE)
    require(o, USAGE, "n")
    no_operands(rest, USAGE)
    values = {k: number(v, f"-{k}") for k, v in o.items() if k in "tbmiejdrRc"}
    count = values.get("c", 1)
    meta = open_meta(o["n"])
    reader = Reader(o["n"], meta, "x" in o, count)
    if "p" in o:
        print_summaries(o["n"], meta, reader.hexa)
    try:
        for flag in BAT_FLAGS + "rR":
            if flag not in o:
                continue
            if flag in BAT_FLAGS and meta.header is None:
                print(f"Failed to get bat for {o['n']}: -{errno.EINVAL}")
                raise ReadError(errno.EINVAL, f"-{flag}: a fixed VHD has no BAT")
            getattr(reader, f"flag_{flag}")(values.get(flag, 0))
    except ReadError as exc:
        print(f"vhd-util read: {exc}", file=sys.stderr)
        return exc.errno
    return 0


def emit(data: bytes) -> None:
    """Raw bytes on stdout, after any text printed before them."""
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


class Reader:
    """One image's answers to the flags, each method named for its flag."""

    def __init__(self, path: str, meta: Metadata, hexa: bool, count: int) -> None:
        self.path = path
        self.meta = meta
        self.hexa = hexa
        self.count = count

    def conv(self, n: int) -> str:
        return num(self.hexa, n)

    def _check_sectors(self, sector: int, shown: int, *, on_stderr: bool) -> None:
        if (sector + self.count) * SECTOR > self.meta.footer.current_size:
            line = f"sector {self.conv(shown)} past end of file"
            if not on_stderr:
                print(line)
            raise ReadError(errno.ERANGE, line)

    def _check_blocks(self, block: int) -> None:
        assert self.meta.header is not None
        if block + self.count > self.meta.header.max_table_entries:
            raise ReadError(errno.ERANGE, f"block {self.conv(block + self.count)} past end of file")

    def _bat(self, block: int) -> int:
        assert self.meta.bat is not None
        return self.meta.bat[block]

    def _bitmap(self, block: int) -> bytes:
        return self._read_file(self._bat(block) * SECTOR, self.meta.bitmap_size)

    def _read_file(self, offset: int, length: int) -> bytes:
        fd = open_disk(self.path, os.O_RDONLY)
        try:
            return read_at(fd, offset, length)
        finally:
            os.close(fd)

    def flag_t(self, sector: int) -> None:
        """Where each logical sector lives in the file."""
        self._check_sectors(sector, sector + self.count, on_stderr=True)
        spb = self.meta.block_size // SECTOR
        for cur in range(sector, sector + self.count):
            block, lsec = divmod(cur, spb)
            entry = self._bat(block)
            offset = (
                "not allocated"
                if entry == BAT_UNUSED
                else self.conv(entry * SECTOR + self.meta.bitmap_size + lsec * SECTOR)
            )
            print(
                f"logical sector {self.conv(cur)}: block number: {self.conv(block)}, "
                f"sector offset: {self.conv(lsec)}, file offset: {offset}"
            )

    def flag_b(self, block: int) -> None:
        """BAT entries as byte offsets."""
        self._check_blocks(block)
        for cur in range(block, block + self.count):
            entry = self._bat(cur)
            offset = "not allocated" if entry == BAT_UNUSED else self.conv(entry * SECTOR)
            print(f"block: {self.conv(cur)}: offset: {offset}")

    def flag_B(self, _: int) -> None:
        """One bit per block of the virtual size (whole blocks, as blktap counts), set when
        the block is allocated."""
        total = self.meta.footer.current_size // self.meta.block_size
        out = bytearray(-(-total // 8))
        for b in range(total):
            if self._bat(b) != BAT_UNUSED:
                bits.set_bit(out, b)
        emit(bytes(out))

    def flag_m(self, block: int) -> None:
        """Raw sector bitmaps."""
        self._check_blocks(block)
        for cur in range(block, block + self.count):
            if self._bat(cur) == BAT_UNUSED:
                print(f"block {self.conv(cur)} not allocated")
            else:
                emit(self._bitmap(cur))

    def _sector_bits(self, sector: int) -> list[tuple[int, int, bool]]:
        """(block, sector in block, held) for the ``count`` sectors from ``sector``."""
        spb = self.meta.block_size // SECTOR
        out: list[tuple[int, int, bool]] = []
        cached: tuple[int, bytes | None] = (-1, None)
        for cur in range(sector, sector + self.count):
            block, sec = divmod(cur, spb)
            if cached[0] != block:
                held = self._bat(block) != BAT_UNUSED
                cached = (block, self._bitmap(block) if held else None)
            bm = cached[1]
            out.append((block, sec, bm is not None and bits.test_bit(bm, sec)))
        return out

    def flag_i(self, sector: int) -> None:
        """Whether the image holds each sector (its bitmap bit)."""
        self._check_sectors(sector, sector, on_stderr=False)
        for block, sec, held in self._sector_bits(sector):
            print(f"block {self.conv(block)}: sec: {self.conv(sec)}: {int(held)}")

    def flag_e(self, sector: int) -> None:
        """Runs of sectors the image holds: ``first count`` per line."""
        self._check_sectors(sector, sector, on_stderr=False)
        start, run = -1, 0
        for i, (_, _, held) in enumerate(self._sector_bits(sector)):
            if held:
                if run == 0:
                    start = sector + i
                run += 1
            else:
                if run:
                    print(f"{self.conv(start)} {self.conv(run)}")
                run = 0
        if run:
            print(f"{self.conv(start)} {self.conv(run)}")

    def _need_batmap(self, flag: str) -> bytes:
        meta = self.meta
        if not has_batmap(meta.footer):
            if flag == "a":
                print(f"failed to read batmap: -{errno.EINVAL}")
            raise ReadError(errno.EINVAL, f"-{flag}: {self.path} has no batmap (not a tap VHD)")
        if meta.batmap is None or meta.batmap_header is None:
            raise ReadError(errno.EINVAL, f"-{flag}: {meta.batmap_error}")
        return bytes(meta.batmap)

    def flag_a(self, _: int) -> None:
        """The raw batmap."""
        emit(self._need_batmap("a"))

    def flag_j(self, block: int) -> None:
        """Whether the batmap marks each block full (on stderr, as blktap prints it)."""
        self._check_blocks(block)
        batmap = self._need_batmap("j")
        for cur in range(block, block + self.count):
            full = int(cur < len(batmap) * 8 and bits.test_bit(batmap, cur))
            print(f"batmap for block {self.conv(cur)}: {full}", file=sys.stderr)

    def flag_d(self, block: int) -> None:
        """The data area of stored blocks, raw."""
        self._check_blocks(block)
        for cur in range(block, block + self.count):
            entry = self._bat(cur)
            if entry == BAT_UNUSED:
                print(f"block {self.conv(cur)} not allocated")
            else:
                base = entry * SECTOR + self.meta.bitmap_size
                emit(self._read_file(base, self.meta.block_size))

    def flag_r(self, sector: int) -> None:
        """``count`` sectors at ``sector``, read through the chain."""
        self._read_virtual(sector * SECTOR, self.count * SECTOR, f"sector {sector}")

    def flag_R(self, offset: int) -> None:
        """``count`` bytes at byte ``offset``, read through the chain."""
        self._read_virtual(offset, self.count, f"byte {offset}")

    def _read_virtual(self, offset: int, length: int, what: str) -> None:
        if offset + length > self.meta.footer.current_size:
            raise ReadError(errno.ERANGE, f"{what} + {self.count} is past the end of the disk")
        try:
            asyncio.run(_read_through_chain(self.path, offset, length))
        except ImageError as exc:
            raise ReadError(errno.EINVAL, str(exc)) from None


async def _read_through_chain(path: str, offset: int, length: int) -> None:
    image = VhdImage(path, read_only=True, allowed_dirs=ANYWHERE)
    try:
        chunk = memoryview(bytearray(min(length, 2 << 20) or 1))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            await image.read(offset, chunk[:n])
            emit(bytes(chunk[:n]))
            offset += n
    finally:
        await image.close()
