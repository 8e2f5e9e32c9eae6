"""QCOW v1 on-disk layout: the header, its checks, compressed L2 entries, and image creation.

Everything here is pure (no asyncio): the header is unpacked and checked
against the file size before any table is read, so a hostile header fails
with an error naming its field.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..base import ImageFormatError
from ..registry import NewBacking

MAGIC = 0x514649FB
VERSION = 1
#: Bit 63 of an L2 entry: the cluster is stored compressed.
OFLAG_COMPRESSED = 1 << 63
#: qemu's limits: cluster 512 B .. 64 KiB, L2 tables of 64 .. 8192 entries.
CLUSTER_BITS_RANGE = range(9, 17)
L2_BITS_RANGE = range(6, 14)
MAX_L1_BYTES = 32 << 20
MAX_BACKING_NAME = 1023


@dataclass
class QcowHeader:
    """The 48-byte big-endian QCOW v1 header."""

    STRUCT = struct.Struct(">IIQIIQBBxxIQ")

    magic: int
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    crypt_method: int
    l1_table_offset: int

    @classmethod
    def unpack(cls, raw: bytes | bytearray) -> QcowHeader:
        return cls(*cls.STRUCT.unpack_from(raw))

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.magic,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.mtime,
            self.size,
            self.cluster_bits,
            self.l2_bits,
            self.crypt_method,
            self.l1_table_offset,
        )

    @property
    def l1_size(self) -> int:
        """L1 entries: not stored in v1, derived from the virtual size."""
        return -(-self.size // (1 << (self.cluster_bits + self.l2_bits)))

    def check(self, file_size: int, where: str) -> int:
        """Refuse out-of-range fields; return the end of the header/name/L1 area."""

        def bad(what: str) -> ImageFormatError:
            return ImageFormatError(f"{where}: header field {what}")

        if self.magic != MAGIC:
            raise bad("magic is not QFI\\xfb: not a QCOW image")
        if self.version != VERSION:
            raise bad(f"version is {self.version}, expected 1 (QCOW v1)")
        if self.cluster_bits not in CLUSTER_BITS_RANGE:
            raise bad(f"cluster_bits is {self.cluster_bits}, expected 9..16")
        if self.l2_bits not in L2_BITS_RANGE:
            raise bad(f"l2_bits is {self.l2_bits}, expected 6..13")
        if self.crypt_method:
            raise bad(
                f"crypt_method is {self.crypt_method}: encrypted QCOW images (legacy AES) "
                "are not supported"
            )
        if self.size <= 1 or self.size >= 1 << 56:
            raise bad(f"size {self.size} is out of range")
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise bad(f"size {self.size} needs an L1 table over 32 MiB")
        l1_off = self.l1_table_offset
        l1_end = l1_off + 8 * self.l1_size
        if l1_off % 8 or l1_off < HEADER_SIZE:
            raise bad(f"l1_table_offset {l1_off:#x} is unaligned or inside the header")
        if l1_end > file_size:
            raise bad(
                f"l1_table_offset {l1_off:#x}: the L1 table ({self.l1_size} entries) runs past "
                f"the end of the file ({file_size} bytes)"
            )
        name_end = HEADER_SIZE
        if self.backing_file_offset:
            name_offset, name_size = self.backing_file_offset, self.backing_file_size
            name_end = name_offset + name_size
            if not 0 < name_size <= MAX_BACKING_NAME:
                raise bad(f"backing_file_size is {name_size}, expected 1..1023")
            if name_offset < HEADER_SIZE or name_end > file_size:
                raise bad(f"backing_file_offset {name_offset:#x} is outside the file")
            if name_offset < l1_end and l1_off < name_end:
                raise bad(f"backing_file_offset {name_offset:#x}: the name overlaps the L1 table")
        return max(l1_end, name_end)


HEADER_SIZE = QcowHeader.STRUCT.size


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte length) of a compressed cluster's deflate data.

    The length sits in the ``cluster_bits`` bits below bit 63, the offset in
    the bits below that.
    """
    shift = 63 - cluster_bits
    return entry & ((1 << shift) - 1), (entry >> shift) & ((1 << cluster_bits) - 1)


def create_from_options(
    path: str, size: int, backing: NewBacking | None, options: dict[str, str]
) -> None:
    """Creator registered for ``qcow:`` (takes no options; QCOW v1 records no backing format)."""
    create_qcow(path, size, backing_file=None if backing is None else backing.name)


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
    l1_off = -(-(HEADER_SIZE + len(name)) // 8) * 8
    header = QcowHeader(
        MAGIC,
        VERSION,
        HEADER_SIZE if name else 0,
        len(name),
        0,
        size,
        cluster_bits,
        l2_bits,
        0,
        l1_off,
    )
    with open(path, "xb") as file:
        file.write(header.pack() + name)
        file.truncate(l1_off + header.l1_size * 8)
        file.flush()
        os.fsync(file.fileno())
