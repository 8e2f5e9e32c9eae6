"""On-disk structures of the VHD format: footer, dynamic header, parent locators, batmap.

Every layout lives here as a ``struct.Struct`` with a dataclass that packs and
unpacks it, so no byte offset appears in driver logic.  Unpacking validates
what a reader depends on and raises ``ImageFormatError`` naming the field.
All integers are big-endian; sizes are bytes unless a name says sectors.
"""

from __future__ import annotations

import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field

from ..base import ImageFormatError

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
BAT_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 << 20
#: Alignment of the data area of blocks we allocate (blktap: page aligned).
DATA_ALIGN = 4096

FOOTER_COOKIE = b"conectix"
POISON_COOKIE = b"v_poison"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"

TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}

FEATURES_RESERVED = 0x2
FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

CREATOR_TAP = b"tap\x00"
TAP_VERSION = 0x00010003
BATMAP_VERSION = 0x00010002
BATMAP_VERSION_OLD = 0x00010001

#: Seconds between the Unix epoch and the VHD epoch (2000-01-01 UTC).
VHD_EPOCH = 946684800
#: The header's parent name: 512 bytes of UTF-16.
PARENT_NAME_CHARS = 256
#: QEMU's limit, 0xFF000000 sectors (2040 GiB); larger sizes are refused as absurd.
MAX_VIRTUAL_SIZE = 0xFF000000 * SECTOR
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 64 << 20
#: A 64 MiB BAT: 2040 GiB in 128 KiB blocks.  More is refused rather than read into memory.
MAX_TABLE_ENTRIES = 1 << 24
#: BAT entries are sector numbers in 32 bits: nothing can live beyond 2 TiB.
MAX_FILE_OFFSET = BAT_UNUSED * SECTOR

PLAT_NONE = 0
PLAT_MACX = 0x4D616358  # "MacX": file URL, UTF-8
PLAT_W2KU = 0x57326B75  # "W2ku": absolute Windows path, UTF-16LE
PLAT_W2RU = 0x57327275  # "W2ru": relative Windows path, UTF-16LE
PLAT_MAC = 0x4D616320  # "Mac ": alias blob (not resolvable here)
PLAT_WI2R = 0x57693272  # deprecated
PLAT_WI2K = 0x5769326B  # deprecated
PLAT_CODES = {PLAT_NONE, PLAT_MACX, PLAT_W2KU, PLAT_W2RU, PLAT_MAC, PLAT_WI2R, PLAT_WI2K}
LOCATOR_COUNT = 8
#: Bytes reserved for each locator we write (blktap reserves a few sectors per entry).
LOCATOR_SPACE = 3 * SECTOR
#: Largest locator data we accept from a file.
MAX_LOCATOR_DATA = 64 * 1024
#: Where blktap keeps the encryption key hash of a VHD without a batmap (cookie, nonce, hash).
KEYHASH_XATTR = "user.com.citrix.xenclient.backend.keyhash"


def checksum(data: bytes | bytearray | memoryview) -> int:
    """One's complement of the byte sum: the footer, header and batmap checksum."""
    return ~sum(data) & 0xFFFFFFFF


def vhd_now() -> int:
    """Current time as seconds since 2000-01-01 UTC."""
    return max(0, int(time.time()) - VHD_EPOCH)


def chs_geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors/track for ``size`` bytes (the VHD spec's algorithm)."""
    ts = -(-size // SECTOR)
    ts = min(ts, 65535 * 16 * 255)
    if ts >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = ts // spt
    else:
        spt = 17
        cth = ts // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = ts // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = ts // spt
    return cth // heads, heads, spt


def encode_geometry(size: int) -> int:
    c, h, s = chs_geometry(size)
    return (c << 16) | (h << 8) | s


def bitmap_bytes(block_size: int) -> int:
    """Size of a block's sector bitmap on disk: one bit per sector, padded to sectors."""
    raw = -(-(block_size // SECTOR) // 8)
    return -(-raw // SECTOR) * SECTOR


def pad_sector(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


def _fail(where: str, field_name: str, problem: str) -> ImageFormatError:
    return ImageFormatError(f"{where}: {field_name} {problem}")


# ---------------------------------------------------------------------------
# Footer


_FOOTER = struct.Struct(">8sIIQI4sIIQQIII16sBB426s")


@dataclass
class Footer:
    """The 512-byte footer (and its copy at offset 0 of dynamic images)."""

    disk_type: int
    current_size: int
    original_size: int
    data_offset: int
    uuid: bytes
    geometry: int = 0
    timestamp: int = 0
    creator_app: bytes = CREATOR_TAP
    creator_version: int = TAP_VERSION
    creator_os: int = 0
    features: int = FEATURES_RESERVED
    version: int = FILE_FORMAT_VERSION
    saved_state: int = 0
    hidden: int = 0
    cookie: bytes = FOOTER_COOKIE
    reserved: bytes = bytes(426)

    def pack(self) -> bytes:
        def fields(csum: int) -> bytes:
            return _FOOTER.pack(
                self.cookie,
                self.features,
                self.version,
                self.data_offset,
                self.timestamp,
                self.creator_app,
                self.creator_version,
                self.creator_os,
                self.original_size,
                self.current_size,
                self.geometry,
                self.disk_type,
                csum,
                self.uuid,
                self.saved_state,
                self.hidden,
                self.reserved,
            )

        return fields(checksum(fields(0)))

    @classmethod
    def unpack(cls, buf: bytes, where: str) -> Footer:
        """Parse and check cookie and checksum; other fields are checked by callers."""
        if len(buf) < FOOTER_SIZE:
            raise _fail(where, "footer", f"truncated ({len(buf)} bytes)")
        v = _FOOTER.unpack(bytes(buf[:FOOTER_SIZE]))
        if v[0] not in (FOOTER_COOKIE, POISON_COOKIE):
            raise _fail(where, "footer.cookie", "is not 'conectix' (not a VHD)")
        zeroed = bytearray(buf[:FOOTER_SIZE])
        zeroed[64:68] = bytes(4)
        stored = v[12]
        if checksum(zeroed) != stored:
            # Early blktap set the hidden byte without updating the checksum.
            zeroed[85] = 0
            if checksum(zeroed) != stored:
                raise _fail(where, "footer.checksum", f"mismatch (stored {stored:#010x})")
        return cls(
            cookie=v[0],
            features=v[1],
            version=v[2],
            data_offset=v[3],
            timestamp=v[4],
            creator_app=v[5],
            creator_version=v[6],
            creator_os=v[7],
            original_size=v[8],
            current_size=v[9],
            geometry=v[10],
            disk_type=v[11],
            uuid=v[13],
            saved_state=v[14],
            hidden=v[15],
            reserved=v[16],
        )

    def validate(self, where: str) -> None:
        """The checks a reader needs before trusting sizes and offsets."""
        if self.disk_type not in TYPE_NAMES:
            raise _fail(where, "footer.disk_type", f"is {self.disk_type}, expected 2, 3 or 4")
        if self.current_size > MAX_VIRTUAL_SIZE:
            raise _fail(
                where, "footer.current_size", f"{self.current_size} exceeds {MAX_VIRTUAL_SIZE}"
            )
        if self.current_size % SECTOR:
            raise _fail(where, "footer.current_size", "is not a multiple of 512")
        if self.disk_type == TYPE_FIXED:
            return
        if self.data_offset % SECTOR or self.data_offset < FOOTER_SIZE:
            raise _fail(where, "footer.data_offset", f"{self.data_offset:#x} is invalid")

    @property
    def is_tap(self) -> bool:
        return self.creator_app == CREATOR_TAP

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))


# ---------------------------------------------------------------------------
# Dynamic header and parent locators


_LOCATOR = struct.Struct(">IIIIQ")


@dataclass
class Locator:
    """A parent locator entry (24 bytes)."""

    code: int = PLAT_NONE
    data_space: int = 0
    data_length: int = 0
    data_offset: int = 0
    reserved: int = 0

    def pack(self) -> bytes:
        return _LOCATOR.pack(
            self.code, self.data_space, self.data_length, self.reserved, self.data_offset
        )

    @classmethod
    def unpack(cls, buf: bytes) -> Locator:
        code, space, length, res, off = _LOCATOR.unpack(buf)
        return cls(code, space, length, off, res)

    @property
    def space_bytes(self) -> int:
        """Reserved space: values below 512 are sectors per the spec, else bytes."""
        return self.data_space * SECTOR if self.data_space < SECTOR else self.data_space


_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")


@dataclass
class Header:
    """The 1024-byte dynamic disk header."""

    table_offset: int
    max_table_entries: int
    block_size: int = DEFAULT_BLOCK_SIZE
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: list[Locator] = field(default_factory=lambda: [Locator() for _ in range(8)])
    data_offset: int = NO_DATA_OFFSET
    version: int = HEADER_VERSION
    cookie: bytes = HEADER_COOKIE
    reserved1: int = 0
    reserved2: bytes = bytes(256)

    def pack(self) -> bytes:
        name = self.parent_name.encode("utf-16-be")
        if len(name) > 2 * PARENT_NAME_CHARS:
            raise ValueError(
                f"parent name {self.parent_name!r} longer than {PARENT_NAME_CHARS} characters"
            )
        locs = b"".join(loc.pack() for loc in self.locators)

        def fields(csum: int) -> bytes:
            return _HEADER.pack(
                self.cookie,
                self.data_offset,
                self.table_offset,
                self.version,
                self.max_table_entries,
                self.block_size,
                csum,
                self.parent_uuid,
                self.parent_timestamp,
                self.reserved1,
                name,
                locs,
                self.reserved2,
            )

        return fields(checksum(fields(0)))

    @classmethod
    def unpack(cls, buf: bytes, where: str) -> Header:
        if len(buf) < HEADER_SIZE:
            raise _fail(where, "header", f"truncated ({len(buf)} bytes)")
        raw = bytes(buf[:HEADER_SIZE])
        v = _HEADER.unpack(raw)
        if v[0] != HEADER_COOKIE:
            raise _fail(where, "header.cookie", "is not 'cxsparse'")
        zeroed = bytearray(raw)
        zeroed[36:40] = bytes(4)
        if checksum(zeroed) != v[6]:
            raise _fail(where, "header.checksum", f"mismatch (stored {v[6]:#010x})")
        try:
            name = v[10].decode("utf-16-be").rstrip("\x00")
        except UnicodeDecodeError as exc:
            raise _fail(where, "header.parent_name", "is not valid UTF-16") from exc
        locs = [Locator.unpack(v[11][i * 24 : i * 24 + 24]) for i in range(LOCATOR_COUNT)]
        return cls(
            cookie=v[0],
            data_offset=v[1],
            table_offset=v[2],
            version=v[3],
            max_table_entries=v[4],
            block_size=v[5],
            parent_uuid=v[7],
            parent_timestamp=v[8],
            reserved1=v[9],
            parent_name=name,
            locators=locs,
            reserved2=v[12],
        )

    def validate(self, where: str, footer: Footer, file_size: int) -> None:
        """Sizes and offsets a reader depends on, each checked against the file."""
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise _fail(where, "header.block_size", f"{bs} is not a power of two in [512, 64M]")
        needed = -(-footer.current_size // bs)
        if self.max_table_entries < needed:
            raise _fail(
                where,
                "header.max_table_entries",
                f"{self.max_table_entries} < {needed} blocks needed for current_size "
                f"{footer.current_size}",
            )
        if self.max_table_entries > MAX_TABLE_ENTRIES:
            raise _fail(
                where,
                "header.max_table_entries",
                f"{self.max_table_entries} exceeds the limit of {MAX_TABLE_ENTRIES}",
            )
        bat_end = self.table_offset + self.bat_bytes
        overlaps_header = (
            self.table_offset < footer.data_offset + HEADER_SIZE and bat_end > footer.data_offset
        )
        if self.table_offset % SECTOR or self.table_offset < FOOTER_SIZE or overlaps_header:
            raise _fail(where, "header.table_offset", f"{self.table_offset:#x} overlaps metadata")
        if self.table_offset + self.bat_bytes > file_size - FOOTER_SIZE:
            raise _fail(
                where,
                "header.table_offset",
                f"BAT ({self.max_table_entries} entries at {self.table_offset:#x}) "
                f"runs past the end of the file ({file_size} bytes)",
            )
        if footer.disk_type == TYPE_DIFF:
            for i, loc in enumerate(self.locators):
                if loc.code == PLAT_NONE:
                    continue
                if loc.code not in PLAT_CODES:
                    raise _fail(where, f"header.locator[{i}].code", f"{loc.code:#x} is unknown")
                if loc.data_length > MAX_LOCATOR_DATA:
                    raise _fail(
                        where, f"header.locator[{i}].data_length", f"{loc.data_length} is absurd"
                    )
                if loc.data_offset + loc.data_length > file_size or loc.data_offset < FOOTER_SIZE:
                    raise _fail(
                        where,
                        f"header.locator[{i}].data_offset",
                        f"{loc.data_offset:#x}+{loc.data_length} is outside the file",
                    )

    @property
    def bat_bytes(self) -> int:
        return pad_sector(self.max_table_entries * 4)


# ---------------------------------------------------------------------------
# Batmap (blktap extension)


_BATMAP = struct.Struct(">8sQIIIBB32s32s418s")


@dataclass
class BatmapHeader:
    """The ``tdbatmap`` header: where the one-bit-per-full-block map lives, plus the marker."""

    offset: int
    size_sectors: int
    checksum: int = 0
    version: int = BATMAP_VERSION
    marker: int = 0
    keyhash_cookie: int = 0
    nonce: bytes = bytes(32)
    keyhash: bytes = bytes(32)
    cookie: bytes = BATMAP_COOKIE

    def pack(self) -> bytes:
        return _BATMAP.pack(
            self.cookie,
            self.offset,
            self.size_sectors,
            self.version,
            self.checksum,
            self.marker,
            self.keyhash_cookie,
            self.nonce,
            self.keyhash,
            bytes(418),
        )

    @classmethod
    def unpack(cls, buf: bytes, where: str) -> BatmapHeader:
        v = _BATMAP.unpack(bytes(buf[:SECTOR]))
        if v[0] != BATMAP_COOKIE:
            raise _fail(where, "batmap.cookie", "is not 'tdbatmap'")
        return cls(
            cookie=v[0],
            offset=v[1],
            size_sectors=v[2],
            version=v[3],
            checksum=v[4],
            marker=v[5],
            keyhash_cookie=v[6],
            nonce=v[7],
            keyhash=v[8],
        )


def batmap_checksum_bytes(current_size: int) -> int:
    """How many map bytes blktap's checksum covers (it assumes 2 MiB blocks)."""
    return SECTOR * max(1, -(-(current_size >> 24) // SECTOR))


def batmap_checksum(bmap: bytes | bytearray, current_size: int, version: int) -> int:
    data = bytes(bmap[: batmap_checksum_bytes(current_size)])
    data = data.ljust(batmap_checksum_bytes(current_size), b"\x00")
    if version == BATMAP_VERSION_OLD:
        total = sum(b - 256 if b >= 128 else b for b in data)
        return ~total & 0xFFFFFFFF
    return checksum(data)


def has_batmap(footer: Footer) -> bool:
    """blktap keeps a batmap in ``tap`` images of version 1.2 and later."""
    return footer.is_tap and footer.disk_type != TYPE_FIXED and footer.creator_version >= 0x00010002


def new_uuid() -> bytes:
    return uuidlib.uuid4().bytes
