"""In-place edits of a VHD's metadata: hidden flag, marker, parent, physical size, virtual size.

Each edit rewrites whole structures with fresh checksums, footer copies last
(trailing, then the one at offset 0), and ends with fdatasync.
"""

from __future__ import annotations

import os

from ..base import ImageError
from ..paths import open_disk
from .create import relative_locator_path
from .format import (
    FOOTER_SIZE,
    PLAT_MACX,
    PLAT_W2KU,
    PLAT_W2RU,
    SECTOR,
    TYPE_FIXED,
    VHD_EPOCH,
    batmap_checksum,
    encode_geometry,
    has_batmap,
)
from .meta import Metadata, cut_to, load


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
            os.pwrite(self.fd, packed, self.meta.data_end)
            cut_to(self.fd, self.meta.data_end + FOOTER_SIZE)
        else:
            os.pwrite(self.fd, packed, self.meta.file_size - FOOTER_SIZE)
        if not self.meta.is_fixed:
            os.pwrite(self.fd, packed, 0)

    def write_header(self) -> None:
        assert self.meta.header is not None
        os.pwrite(self.fd, self.meta.header.pack(), self.meta.footer.data_offset)

    def write_batmap_header(self) -> None:
        hdr = self.meta.batmap_header
        if hdr is None or self.meta.batmap is None:
            return
        hdr.checksum = batmap_checksum(self.meta.batmap, self.meta.footer.current_size, hdr.version)
        os.pwrite(self.fd, hdr.pack(), self.meta.batmap_offset)


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
            os.pwrite(img.fd, data.ljust(loc.space_bytes, b"\x00"), loc.data_offset)
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
        os.ftruncate(img.fd, size)
        os.pwrite(img.fd, img.meta.footer.pack(), size - FOOTER_SIZE)


def resize(path: str, new_size: int) -> None:
    """Grow the virtual size (fast resize: the BAT must already have room)."""
    with _Open(path) as img:
        f = img.meta.footer
        if new_size % SECTOR or new_size < f.current_size:
            raise ImageError(f"{path}: cannot shrink or use unaligned size {new_size}")
        if f.disk_type == TYPE_FIXED:
            old_footer_at = img.meta.file_size - FOOTER_SIZE
            f.current_size = new_size
            f.geometry = encode_geometry(new_size)
            os.ftruncate(img.fd, new_size + FOOTER_SIZE)
            os.pwrite(img.fd, bytes(FOOTER_SIZE), old_footer_at)
            os.pwrite(img.fd, f.pack(), new_size)
            return
        h = img.meta.header
        assert h is not None
        if -(-new_size // h.block_size) > h.max_table_entries:
            raise ImageError(
                f"{path}: {new_size} bytes needs more than the {h.max_table_entries} BAT entries "
                "preallocated (create with -S for room)"
            )
        f.current_size = new_size
        f.geometry = encode_geometry(new_size)
        img.write_batmap_header()
        img.write_footers()
