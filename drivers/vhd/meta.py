"""Loading and validating a VHD's metadata: footer (with backup recovery), header, BAT, batmap.

``load`` reads everything a reader needs with blocking I/O and checks every
offset against the file before anything trusts it, so a hostile image fails
here with an ``ImageFormatError`` naming the field instead of steering reads
or writes outside the image.  The driver, ``check`` and the tools all start
from the ``Metadata`` it returns.
"""

from __future__ import annotations

import itertools
import os
import stat
import sys
from array import array
from dataclasses import dataclass

from ..base import ImageFormatError
from ..fileio import pread_full, pwrite_full
from .format import (
    BAT_UNUSED,
    BATMAP_VERSION,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR,
    TYPE_DIFF,
    TYPE_FIXED,
    BatmapHeader,
    Footer,
    Header,
    batmap_checksum,
    bitmap_bytes,
    has_batmap,
    pad_sector,
)


def read_at(fd: int, offset: int, length: int) -> bytes:
    """Blocking read of ``length`` bytes (zero-filled past end of file)."""
    buf = bytearray(length)
    pread_full(fd, memoryview(buf), offset)
    return bytes(buf)


def write_at(fd: int, data: bytes, offset: int) -> None:
    """Blocking write of all of ``data`` (a full disk raises, never writes short)."""
    pwrite_full(fd, memoryview(data), offset)


def bat_from_bytes(raw: bytes) -> array[int]:
    bat = array("I")
    bat.frombytes(raw)
    if sys.byteorder == "little":
        bat.byteswap()
    return bat


def bat_to_bytes(bat: array[int]) -> bytes:
    out = array("I", bat)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


@dataclass
class Metadata:
    """Everything read from one VHD file's metadata, validated."""

    path: str
    file_size: int
    footer: Footer
    #: The trailing footer was unreadable and the offset-0 copy was used.
    footer_recovered: bool
    header: Header | None = None
    bat: array[int] | None = None
    batmap_header: BatmapHeader | None = None
    batmap: bytearray | None = None
    #: Why a batmap that should be present is unusable (None when fine).
    batmap_error: str | None = None
    #: First byte after all metadata (header, BAT, batmap, locator data).
    meta_end: int = 0
    #: First sector-aligned byte after every allocated block.
    data_end: int = 0

    @property
    def is_fixed(self) -> bool:
        return self.footer.disk_type == TYPE_FIXED

    @property
    def is_diff(self) -> bool:
        return self.footer.disk_type == TYPE_DIFF

    @property
    def block_size(self) -> int:
        return self.header.block_size if self.header else 0

    @property
    def bitmap_size(self) -> int:
        return bitmap_bytes(self.header.block_size) if self.header else 0

    @property
    def blocks(self) -> int:
        """BAT entries that cover the virtual size (the rest is resize headroom)."""
        assert self.header is not None
        return -(-self.footer.current_size // self.header.block_size)

    @property
    def batmap_offset(self) -> int:
        """Where the batmap header sits: right after the padded BAT."""
        assert self.header is not None
        return self.header.table_offset + self.header.bat_bytes

    def allocated_blocks(self) -> int:
        assert self.bat is not None
        return sum(1 for i in range(self.blocks) if self.bat[i] != BAT_UNUSED)


def read_footer(fd: int, path: str, file_size: int) -> tuple[Footer, bool]:
    """The trailing footer, or the offset-0 copy when the trailing one is damaged."""
    if file_size < FOOTER_SIZE - 1:
        raise ImageFormatError(f"{path}: file is truncated ({file_size} bytes, no footer)")
    # Virtual PC before 2004 wrote a 511-byte footer.
    tail = FOOTER_SIZE - 1 if file_size % SECTOR == SECTOR - 1 else FOOTER_SIZE
    try:
        return Footer.unpack(read_at(fd, file_size - tail, FOOTER_SIZE), path), False
    except ImageFormatError as trailing_error:
        if file_size < 2 * FOOTER_SIZE:
            raise
        try:
            backup = Footer.unpack(read_at(fd, 0, FOOTER_SIZE), f"{path} (backup footer)")
        except ImageFormatError:
            raise trailing_error from None
        if backup.disk_type == TYPE_FIXED:
            raise trailing_error from None
        return backup, True


def cut_to(fd: int, length: int) -> None:
    """Truncate a regular file to ``length``; block devices (LVM volumes) keep their size."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, length)


def load(fd: int, path: str) -> Metadata:
    """Read and validate the metadata of the VHD open on ``fd``."""
    file_size = os.fstat(fd).st_size
    if file_size == 0:
        file_size = os.lseek(fd, 0, os.SEEK_END)  # block device
    footer, recovered = read_footer(fd, path, file_size)
    footer.validate(path)
    meta = Metadata(path, file_size, footer, recovered)
    if footer.disk_type == TYPE_FIXED:
        if file_size < footer.current_size + FOOTER_SIZE - 1:
            raise ImageFormatError(
                f"{path}: file is truncated: footer.current_size {footer.current_size} "
                f"needs {footer.current_size + FOOTER_SIZE} bytes, file has {file_size}"
            )
        return meta
    # With a torn trailing footer the data may run right up to the end of file.
    limit = file_size if recovered else file_size - FOOTER_SIZE
    if footer.data_offset + HEADER_SIZE > limit:
        raise ImageFormatError(
            f"{path}: file is truncated: footer.data_offset {footer.data_offset:#x} "
            f"leaves no room for the header in {file_size} bytes"
        )
    header = Header.unpack(read_at(fd, footer.data_offset, HEADER_SIZE), path)
    header.validate(path, footer, limit + FOOTER_SIZE)
    meta.header = header
    raw = read_at(fd, header.table_offset, header.max_table_entries * 4)
    meta.bat = bat_from_bytes(raw)
    regions = [
        ("footer copy", 0, FOOTER_SIZE),
        ("header", footer.data_offset, HEADER_SIZE),
        ("BAT", header.table_offset, header.bat_bytes),
    ]
    if footer.disk_type == TYPE_DIFF:
        for i, loc in enumerate(header.locators):
            if loc.code and loc.data_length:
                regions.append(
                    (f"header.locator[{i}]", loc.data_offset, pad_sector(loc.data_length))
                )
    if has_batmap(footer):
        _load_batmap(fd, meta, limit)
        # An invalid batmap is not metadata any more: tools that do not know
        # it (qemu's vpc driver) put their first data block where it was.
        if meta.batmap_error is None:
            assert meta.batmap_header is not None
            bh = meta.batmap_header
            regions.append(("batmap header", meta.batmap_offset, SECTOR))
            regions.append(("batmap", bh.offset, bh.size_sectors * SECTOR))
    _check_disjoint(path, regions)
    meta.meta_end = max(off + length for _, off, length in regions)
    meta.data_end = _check_bat(meta, limit)
    return meta


def _check_disjoint(path: str, regions: list[tuple[str, int, int]]) -> None:
    """Metadata structures must not overlap: writing one would clobber another."""
    ordered = sorted(regions, key=lambda r: r[1])
    for (name_a, off_a, len_a), (name_b, off_b, _) in itertools.pairwise(ordered):
        if off_a + len_a > off_b:
            raise ImageFormatError(
                f"{path}: {name_b} at {off_b:#x} overlaps the {name_a} at {off_a:#x}"
            )


def _load_batmap(fd: int, meta: Metadata, limit: int) -> None:
    """Read the batmap; on any fault record why in ``batmap_error``."""
    assert meta.header is not None
    hoff = meta.batmap_offset
    try:
        if hoff + SECTOR > limit:
            raise ImageFormatError("batmap header is past the end of the file")
        bh = BatmapHeader.unpack(read_at(fd, hoff, SECTOR), meta.path)
        if bh.version > BATMAP_VERSION:
            raise ImageFormatError(f"batmap.version {bh.version:#x} is newer than supported")
        if bh.size_sectors == 0 or bh.size_sectors * SECTOR * 8 < meta.header.max_table_entries:
            raise ImageFormatError(f"batmap.size {bh.size_sectors} is too small for the BAT")
        if bh.offset == 0 or bh.offset % SECTOR or bh.offset < hoff + SECTOR:
            raise ImageFormatError(f"batmap.offset {bh.offset:#x} is invalid")
        if bh.offset + bh.size_sectors * SECTOR > limit:
            raise ImageFormatError(f"batmap.offset {bh.offset:#x} runs past the end of the file")
        bmap = bytearray(read_at(fd, bh.offset, bh.size_sectors * SECTOR))
        if batmap_checksum(bmap, meta.footer.current_size, bh.version) != bh.checksum:
            meta.batmap_header = bh
            raise ImageFormatError(f"batmap.checksum mismatch (stored {bh.checksum:#010x})")
    except ImageFormatError as exc:
        meta.batmap_error = str(exc).removeprefix(f"{meta.path}: ")
        return
    meta.batmap_header = bh
    meta.batmap = bmap


def _check_bat(meta: Metadata, limit: int) -> int:
    """Every used BAT entry lies between the metadata and the footer, without overlaps."""
    assert meta.header is not None and meta.bat is not None
    span = meta.bitmap_size + meta.header.block_size
    bat = meta.bat
    starts: list[tuple[int, int]] = []
    end = pad_sector(meta.meta_end)
    for i in range(meta.blocks):
        entry = bat[i]
        if entry == BAT_UNUSED:
            continue
        off = entry * SECTOR
        if off < meta.meta_end:
            raise ImageFormatError(
                f"{meta.path}: BAT[{i}] = sector {entry:#x} overlaps metadata "
                f"(which ends at {meta.meta_end:#x})"
            )
        if off + span > limit:
            raise ImageFormatError(
                f"{meta.path}: BAT[{i}] = sector {entry:#x} points past the end of the file "
                f"(block ends at {off + span:#x}, data must end by {limit:#x})"
            )
        starts.append((off, i))
        end = max(end, off + span)
    starts.sort()
    for (a, i), (b, j) in itertools.pairwise(starts):
        if b - a < span:
            raise ImageFormatError(
                f"{meta.path}: BAT[{j}] = sector {b // SECTOR:#x} overlaps block BAT[{i}]"
            )
    return end
