"""QCOW2 on-disk layouts: the header, header extensions, snapshot table entries.

Every binary layout of the format lives here as a ``struct.Struct`` with
pack/unpack helpers, together with the open-time validation of header fields
(each error names the field and the file), so the rest of the package works on
checked values only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..base import ImageError, ImageFormatError

MAGIC = 0x514649FB
#: Largest and smallest cluster_bits qemu accepts (512 B .. 2 MiB).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: Host offsets in L1/L2/refcount entries are below 2**56.
MAX_HOST_OFFSET = 1 << 56
#: qemu's limits on table sizes; larger values are refused as hostile.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

#: Fields common to v2 and v3 (72 bytes).
V2_HEADER = struct.Struct(">IIQIIQIIQQIIQ")
#: v3 additions: feature bitmaps, refcount_order, header_length (32 bytes).
V3_HEADER = struct.Struct(">QQQII")
V3_HEADER_LEN = V2_HEADER.size + V3_HEADER.size  # 104
#: Optional additional field: compression type + 7 bytes padding.
COMPRESSION_FIELD = struct.Struct(">B7x")
EXT_HEADER = struct.Struct(">II")
BITMAPS_EXT = struct.Struct(">IIQQ")
#: A snapshot table entry's fixed part.
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")


@dataclass
class Header:
    """The QCOW2 header, as stored (v2 images get v3 defaults for the v3 fields)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER.size
    compression_type: int = COMPRESSION_DEFLATE

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        """Decode the header from the start of the file (no validation)."""
        if len(buf) < V2_HEADER.size:
            raise ImageFormatError("file too short for a qcow2 header")
        fields = V2_HEADER.unpack_from(buf, 0)
        if fields[0] != MAGIC:
            raise ImageFormatError("no qcow2 magic (QFI\\xfb): not a qcow2 image")
        header = cls(*fields[1:])
        if header.version >= 3:
            if len(buf) < V3_HEADER_LEN:
                raise ImageFormatError("file too short for a qcow2 v3 header")
            (
                header.incompatible_features,
                header.compatible_features,
                header.autoclear_features,
                header.refcount_order,
                header.header_length,
            ) = V3_HEADER.unpack_from(buf, V2_HEADER.size)
            if header.header_length > V3_HEADER_LEN and len(buf) >= V3_HEADER_LEN + 1:
                header.compression_type = buf[V3_HEADER_LEN]
        return header

    def pack(self) -> bytes:
        """Encode the header fields (``header_length`` bytes; extensions excluded)."""
        out = V2_HEADER.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version >= 3:
            out += V3_HEADER.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length >= V3_HEADER_LEN + COMPRESSION_FIELD.size:
                out += COMPRESSION_FIELD.pack(self.compression_type)
        return out

    def validate(self, path: str, file_size: int) -> None:
        """Refuse out-of-range, unaligned or past-EOF fields, naming the field."""

        def bad(fieldname: str, why: str) -> ImageFormatError:
            return ImageFormatError(f"{path}: header field {fieldname} {why}")

        if self.version not in (2, 3):
            raise bad("version", f"is {self.version}, expected 2 or 3")
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise bad("cluster_bits", f"is {self.cluster_bits}, expected 9..21")
        cluster_size = self.cluster_size
        if self.version == 3:
            if self.header_length < V3_HEADER_LEN or self.header_length % 8:
                raise bad("header_length", f"is {self.header_length}, expected >= 104, /8")
            if self.header_length > cluster_size:
                raise bad("header_length", f"is {self.header_length}, larger than a cluster")
            unknown = self.incompatible_features & ~INCOMPAT_KNOWN
            if unknown:
                raise bad("incompatible_features", f"has unknown bits {unknown:#x}")
            if self.refcount_order > 6:
                raise bad("refcount_order", f"is {self.refcount_order}, expected 0..6")
            if self.compression_type not in COMPRESSION_NAMES:
                raise bad("compression_type", f"is {self.compression_type}, expected 0 or 1")
            if bool(self.compression_type) != bool(
                self.incompatible_features & INCOMPAT_COMPRESSION
            ):
                raise bad("compression_type", "disagrees with incompatible bit 3")
            if self.extended_l2 and self.cluster_bits < 14:
                raise bad("cluster_bits", "must be >= 14 with extended L2 entries")
        if self.crypt_method != 0:
            raise bad("crypt_method", f"is {self.crypt_method}: encrypted images are not supported")
        if self.incompatible_features & INCOMPAT_DATA_FILE:
            raise bad("incompatible_features", "asks for an external data file (not supported)")
        if self.size >= MAX_HOST_OFFSET:
            raise bad("size", f"is {self.size}, too large")
        if self.backing_file_offset:
            if self.backing_file_size == 0 or self.backing_file_size > MAX_BACKING_NAME:
                raise bad("backing_file_size", f"is {self.backing_file_size}, expected 1..1023")
            if self.backing_file_offset + self.backing_file_size > min(cluster_size, file_size):
                raise bad("backing_file_offset", "points outside the header cluster")
        l2_span = 1 << (self.cluster_bits + self.l2_bits)
        need_l1 = -(-self.size // l2_span)
        if self.l1_size < need_l1:
            raise bad("l1_size", f"is {self.l1_size}, need {need_l1} for size {self.size}")
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise bad("l1_size", f"is {self.l1_size}, larger than qemu's 32 MiB L1 limit")
        if self.refcount_table_clusters == 0:
            raise bad("refcount_table_clusters", "is 0")
        if self.refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES:
            raise bad("refcount_table_clusters", f"is {self.refcount_table_clusters}, too large")
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise bad("nb_snapshots", f"is {self.nb_snapshots}, more than 65536")
        self.check_table("l1_table_offset", self.l1_table_offset, self.l1_size * 8, path, file_size)
        self.check_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            self.refcount_table_clusters * cluster_size,
            path,
            file_size,
        )
        if self.nb_snapshots:
            self.check_table("snapshots_offset", self.snapshots_offset, 1, path, file_size)

    def check_table(self, name: str, offset: int, length: int, path: str, file_size: int) -> None:
        """A table must be cluster aligned, not at the header, and inside the file."""
        if length == 0:
            return
        if offset % self.cluster_size:
            raise ImageFormatError(f"{path}: {name} {offset:#x} is not cluster aligned")
        if offset == 0:
            raise ImageFormatError(f"{path}: {name} points at the header cluster")
        if offset + length > file_size:
            raise ImageFormatError(
                f"{path}: {name} {offset:#x} (+{length}) lies past the end of file ({file_size})"
            )


@dataclass
class Extensions:
    """What the header extensions say; unknown ones are left untouched on disk."""

    backing_format: str | None = None
    data_file: str | None = None
    bitmaps: tuple[int, int, int] | None = None  # (nb_bitmaps, dir_size, dir_offset)
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    end: int = 0  # offset just past the end-of-extensions marker


def walk_extensions(buf: bytes, header: Header, path: str) -> tuple[list[tuple[int, bytes]], int]:
    """The extensions after the header, inside the header cluster, as (type, data) in
    their order on disk, and the offset just past the end-of-extensions marker."""
    entries: list[tuple[int, bytes]] = []
    pos = header.header_length
    limit = header.backing_file_offset or min(len(buf), header.cluster_size)
    seen: set[int] = set()
    while pos + EXT_HEADER.size <= limit:
        kind, length = EXT_HEADER.unpack_from(buf, pos)
        pos += EXT_HEADER.size
        if kind == EXT_END:
            return entries, pos
        if pos + length > limit:
            raise ImageFormatError(
                f"{path}: header extension {kind:#x} length {length} runs past the header cluster"
            )
        if kind in seen:
            raise ImageFormatError(f"{path}: header extension {kind:#x} appears twice")
        seen.add(kind)
        entries.append((kind, bytes(buf[pos : pos + length])))
        pos += -(-length // 8) * 8
    return entries, pos


def parse_extensions(buf: bytes, header: Header, path: str) -> Extensions:
    """What the extensions after the header say."""
    entries, end = walk_extensions(buf, header, path)
    ext = Extensions(end=end)
    for kind, data in entries:
        if kind == EXT_BACKING_FORMAT:
            ext.backing_format = data.decode("ascii", "replace")
        elif kind == EXT_DATA_FILE:
            ext.data_file = data.decode("utf-8", "replace")
        elif kind == EXT_BITMAPS and len(data) >= BITMAPS_EXT.size:
            count, _, dsize, doff = BITMAPS_EXT.unpack_from(data)
            ext.bitmaps = (count, dsize, doff)
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                name = data[i + 2 : i + 48].rstrip(b"\0").decode("ascii", "replace")
                ext.feature_names[(data[i], data[i + 1])] = name
    return ext


def extension_bytes(kind: int, data: bytes) -> bytes:
    """One encoded header extension, padded to 8 bytes."""
    pad = -len(data) % 8
    return EXT_HEADER.pack(kind, len(data)) + data + bytes(pad)


def pack_header_cluster(
    header: Header,
    extensions: list[tuple[int, bytes]],
    backing_name: str | None,
    backing_format: str | None,
    path: str,
) -> bytes:
    """The header cluster as qemu lays it out: ``header``'s fields, ``extensions`` in their
    order with ``backing_format`` in place of any backing format among them, the end
    marker, then the backing file's name; ``header``'s backing offset and size are set to
    match.  ImageError when the name is too long or the whole does not fit in a cluster."""
    name = backing_name.encode() if backing_name else b""
    if len(name) > MAX_BACKING_NAME:
        raise ImageError(f"{path}: backing file name longer than {MAX_BACKING_NAME} bytes")
    kept = [(kind, data) for kind, data in extensions if kind != EXT_BACKING_FORMAT]
    if backing_format:
        kept.append((EXT_BACKING_FORMAT, backing_format.encode()))
    encoded = b"".join(extension_bytes(kind, data) for kind, data in kept)
    encoded += extension_bytes(EXT_END, b"")
    header.backing_file_offset = header.header_length + len(encoded) if name else 0
    header.backing_file_size = len(name)
    cluster = header.pack() + encoded + name
    if len(cluster) > header.cluster_size:
        raise ImageError(
            f"{path}: the header, its extensions and the backing file name do not fit in "
            f"one {header.cluster_size}-byte cluster"
        )
    return cluster


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot as listed by ``info``."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None


def parse_snapshots(buf: bytes, count: int, path: str) -> tuple[list[Snapshot], int]:
    """Decode ``count`` snapshot entries; returns them and the table's byte length."""
    snaps: list[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + SNAPSHOT_HEADER.size > len(buf):
            raise ImageFormatError(f"{path}: snapshot table entry {i} runs past its end")
        l1_off, l1_size, id_len, name_len, sec, nsec, clock, vmsize, extra = (
            SNAPSHOT_HEADER.unpack_from(buf, pos)
        )
        pos += SNAPSHOT_HEADER.size
        if extra > 1024 * 1024:
            raise ImageFormatError(f"{path}: snapshot {i} extra_data_size {extra} too large")
        extra_data = buf[pos : pos + extra]
        disk_size = None
        if len(extra_data) >= 8:
            vmsize = int.from_bytes(extra_data[0:8], "big")
        if len(extra_data) >= 16:
            disk_size = int.from_bytes(extra_data[8:16], "big")
        pos += extra
        ident = bytes(buf[pos : pos + id_len]).decode("utf-8", "replace")
        pos += id_len
        name = bytes(buf[pos : pos + name_len]).decode("utf-8", "replace")
        pos += name_len
        if pos > len(buf):
            raise ImageFormatError(f"{path}: snapshot table entry {i} runs past its end")
        pos += -pos % 8
        if l1_size * 8 > MAX_L1_BYTES:
            raise ImageFormatError(f"{path}: snapshot {i} l1_size {l1_size} too large")
        snaps.append(Snapshot(l1_off, l1_size, ident, name, sec, nsec, clock, vmsize, disk_size))
    return snaps, pos
