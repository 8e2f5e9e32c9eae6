"""In-place edits of a VHD's metadata: hidden flag, marker, key hash, parent, physical
size, dropping every block (``modify -z``) and allocating blocks without data (``fill -b``).

Each edit rewrites whole structures with fresh checksums, footer copies last
(trailing, then the one at offset 0), and ends with fdatasync.  Edits that move
the end of the file write the new trailing footer before cutting the old one off,
so the file always ends in a valid footer.
"""

from __future__ import annotations

import errno
import os

from ..base import ImageError
from ..paths import open_disk
from .create import relative_locator_path
from .format import (
    BAT_UNUSED,
    DATA_ALIGN,
    FOOTER_SIZE,
    KEYHASH_XATTR,
    MAX_FILE_OFFSET,
    PLAT_MACX,
    PLAT_W2KU,
    PLAT_W2RU,
    SECTOR,
    VHD_EPOCH,
    batmap_checksum,
    has_batmap,
    pad_sector,
)
from .journal import is_block_device, zero_range
from .meta import Metadata, bat_to_bytes, cut_to, load, write_at


class EditError(ImageError):
    """An edit this image cannot take; ``errno`` is what ``vhd-util`` exits with."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


class _Open:
    """A VHD opened read-write with its metadata loaded."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.meta: Metadata = load(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> _Open:
        return self

    def __exit__(self, *exc: object) -> None:
        os.fdatasync(self.fd)
        os.close(self.fd)

    def write_footers(self) -> None:
        """Trailing footer (replacing a torn one at the data end), then the offset-0 copy."""
        packed = self.meta.footer.pack()
        if self.meta.footer_recovered:
            write_at(self.fd, packed, self.meta.data_end)
            cut_to(self.fd, self.meta.data_end + FOOTER_SIZE)
        else:
            write_at(self.fd, packed, self.meta.file_size - FOOTER_SIZE)
        if not self.meta.is_fixed:
            write_at(self.fd, packed, 0)

    def write_header(self) -> None:
        assert self.meta.header is not None
        write_at(self.fd, self.meta.header.pack(), self.meta.footer.data_offset)

    def write_batmap(self) -> None:
        """The map and its header with the matching checksum, in one write where the map
        follows its header (as blktap and this project lay it out)."""
        hdr = self.meta.batmap_header
        if hdr is None or self.meta.batmap is None:
            return
        hdr.checksum = batmap_checksum(self.meta.batmap, self.meta.footer.current_size, hdr.version)
        if hdr.offset == self.meta.batmap_offset + SECTOR:
            write_at(self.fd, hdr.pack() + bytes(self.meta.batmap), self.meta.batmap_offset)
        else:
            write_at(self.fd, bytes(self.meta.batmap), hdr.offset)
            write_at(self.fd, hdr.pack(), self.meta.batmap_offset)

    def write_batmap_header(self) -> None:
        hdr = self.meta.batmap_header
        if hdr is None or self.meta.batmap is None:
            return
        hdr.checksum = batmap_checksum(self.meta.batmap, self.meta.footer.current_size, hdr.version)
        write_at(self.fd, hdr.pack(), self.meta.batmap_offset)


def set_hidden(path: str, value: int) -> None:
    """Set blktap's hidden flag (footer byte 85) in both footer copies."""
    if value not in (0, 1):
        raise ImageError(f"hidden must be 0 or 1, not {value}")
    with _Open(path) as img:
        img.meta.footer.hidden = value
        img.write_footers()


def get_marker(meta: Metadata) -> int:
    return meta.batmap_header.marker if meta.batmap_header else 0


def set_marker(path: str, value: int) -> None:
    """Set the one-byte marker kept in the batmap header."""
    if not 0 <= value <= 255:
        raise ImageError(f"marker must be 0..255, not {value}")
    with _Open(path) as img:
        if not has_batmap(img.meta.footer) or img.meta.batmap_header is None:
            raise ImageError(f"{path}: has no batmap to hold a marker")
        img.meta.batmap_header.marker = value
        img.write_batmap_header()


def set_parent(path: str, parent: str, *, parent_raw: bool = False) -> None:
    """Point a differencing VHD at a new parent (UUID, name and locators rewritten)."""
    with _Open(path) as img:
        h = img.meta.header
        if h is None or not img.meta.is_diff:
            raise ImageError(f"{path} is not a differencing VHD")
        if parent_raw:
            uuid = bytes(16)
        else:
            pfd = open_disk(parent, os.O_RDONLY)
            try:
                uuid = load(pfd, os.path.abspath(parent)).footer.uuid
            finally:
                os.close(pfd)
        rel = relative_locator_path(img.path, parent)
        for loc in h.locators:
            if loc.code == PLAT_MACX:
                data = f"file://{rel}".encode()
            elif loc.code in (PLAT_W2KU, PLAT_W2RU):
                data = rel.replace("/", "\\").encode("utf-16-le")
            else:
                continue
            if len(data) > loc.space_bytes:
                raise ImageError(f"{path}: new parent name does not fit its locator space")
            write_at(img.fd, data.ljust(loc.space_bytes, b"\x00"), loc.data_offset)
            loc.data_length = len(data)
        h.parent_uuid = uuid
        h.parent_name = os.path.basename(parent)
        h.parent_timestamp = max(0, int(os.stat(parent).st_mtime) - VHD_EPOCH)
        img.write_header()


def set_physical_size(path: str, size: int) -> None:
    """Move the trailing footer so the file is ``size`` bytes (never below the data)."""
    with _Open(path) as img:
        least = img.meta.data_end if not img.meta.is_fixed else img.meta.footer.current_size
        if size % SECTOR or size < least + FOOTER_SIZE:
            raise ImageError(
                f"{path}: physical size {size} is below the data end {least + FOOTER_SIZE} "
                f"or not a multiple of 512"
            )
        if img.meta.is_fixed:
            raise ImageError(f"{path}: a fixed VHD's physical size follows its virtual size")
        # On a volume (SM's LVM SRs) the footer goes where the resized volume will end.
        write_at(img.fd, img.meta.footer.pack(), size - FOOTER_SIZE)
        cut_to(img.fd, size)


def zero_data(path: str) -> None:
    """Drop every block (``modify -z``): batmap, then BAT, then the file cut after the
    metadata (a volume keeps its size and footer)."""
    with _Open(path) as img:
        meta = img.meta
        if meta.header is None or meta.bat is None:
            raise EditError(f"{path}: a fixed VHD has no blocks to drop", errno.ENOSYS)
        if meta.batmap is not None:
            meta.batmap[:] = bytes(len(meta.batmap))
            img.write_batmap()
        write_at(img.fd, b"\xff" * meta.header.bat_bytes, meta.header.table_offset)
        if not is_block_device(img.fd):
            end = pad_sector(meta.meta_end)
            write_at(img.fd, meta.footer.pack(), end)
            cut_to(img.fd, end + FOOTER_SIZE)


def get_keyhash(fd: int, meta: Metadata) -> tuple[int, bytes, bytes]:
    """(cookie, nonce, hash): the key hash in the batmap header, else in blktap's xattr."""
    bh = meta.batmap_header
    if has_batmap(meta.footer) and bh is not None:
        return bh.keyhash_cookie, bh.nonce, bh.keyhash
    try:
        raw = os.getxattr(fd, KEYHASH_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
        raw = b""
    raw = raw.ljust(65, b"\x00")
    return raw[0], raw[1:33], raw[33:65]


def set_keyhash(path: str, nonce: bytes, keyhash: bytes) -> None:
    """Record the hash of an encryption key, on a dynamic VHD that holds no data yet."""
    with _Open(path) as img:
        meta = img.meta
        if meta.is_fixed:
            raise ImageError(f"{path}: a fixed VHD cannot hold a key hash")
        if meta.allocated_blocks():
            raise ImageError(f"{path}: holds data already; a key hash is set before any write")
        bh = meta.batmap_header
        if has_batmap(meta.footer) and bh is not None:
            bh.keyhash_cookie, bh.nonce, bh.keyhash = 1, nonce, keyhash
            img.write_batmap_header()
        else:
            os.setxattr(img.fd, KEYHASH_XATTR, b"\x01" + nonce + keyhash)


def preallocate(path: str, first: int, last: int) -> int:
    """Allocate the unallocated blocks ``first``..``last`` with full bitmaps and zero data
    (``fill -b``); returns how many.  Blocks already allocated keep their data.

    The file's new end (a footer) comes first, then zeroed space and bitmaps, then the
    BAT that makes the blocks visible, then the batmap.
    """
    with _Open(path) as img:
        meta = img.meta
        if meta.header is None or meta.bat is None:
            raise ImageError(f"{path}: a fixed VHD is allocated already")
        todo = [b for b in range(first, last + 1) if meta.bat[b] == BAT_UNUSED]
        if not todo:
            return 0
        bm_size, span = meta.bitmap_size, meta.bitmap_size + meta.header.block_size
        pos = meta.data_end
        starts = []
        for b in todo:
            pos = -(-(pos + bm_size) // DATA_ALIGN) * DATA_ALIGN - bm_size
            if pos + span > MAX_FILE_OFFSET:
                raise OSError(
                    errno.EOVERFLOW,
                    f"{path}: block {b} would lie past 2 TiB, where a BAT "
                    "entry cannot point (-B cannot lift this)",
                )
            starts.append(pos)
            pos += span
        if is_block_device(img.fd):
            if pos > meta.file_size - FOOTER_SIZE:
                raise OSError(errno.ENOSPC, f"{path}: the volume is too small")
        else:
            write_at(img.fd, meta.footer.pack(), pos)
        zero_range(img.fd, meta.data_end, pos - meta.data_end)
        full = b"\xff" * (meta.header.block_size // SECTOR // 8)
        bitmap = full.ljust(bm_size, b"\x00")
        for b, start in zip(todo, starts, strict=True):
            write_at(img.fd, bitmap, start)
            meta.bat[b] = start // SECTOR
        write_at(img.fd, bat_to_bytes(meta.bat), meta.header.table_offset)
        if meta.batmap is not None:
            for b in todo:
                meta.batmap[b >> 3] |= 0x80 >> (b & 7)
            img.write_batmap()
        return len(todo)
