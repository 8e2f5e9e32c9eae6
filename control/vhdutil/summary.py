"""The header summaries ``vhd-util read -p`` prints: footer, dynamic header, parent
locators and batmap, in blktap's words and layout (SM parses ``Disk type`` and
``decoded name`` out of them)."""

from __future__ import annotations

import os
import time
import uuid as uuidlib

from tapdisk.drivers.paths import open_disk
from tapdisk.drivers.vhd.chain import decode_locator
from tapdisk.drivers.vhd.format import (
    FOOTER_SIZE,
    HEADER_SIZE,
    PLAT_MAC,
    PLAT_MACX,
    PLAT_NONE,
    PLAT_W2KU,
    PLAT_W2RU,
    PLAT_WI2K,
    PLAT_WI2R,
    VHD_EPOCH,
    BatmapHeader,
    Footer,
    Header,
    batmap_checksum,
    checksum,
    has_batmap,
)
from tapdisk.drivers.vhd.meta import Metadata, read_at


def print_summaries(path: str, meta: Metadata, hexa: bool) -> None:
    """Every summary that applies to the image at ``path`` (``read -p``)."""
    fd = open_disk(path, os.O_RDONLY)
    try:
        footer_at = 0 if meta.footer_recovered else meta.file_size - FOOTER_SIZE
        _print_footer(meta.footer, hexa, read_at(fd, footer_at, FOOTER_SIZE))
        if meta.header is not None:
            _print_header(meta.header, hexa, read_at(fd, meta.footer.data_offset, HEADER_SIZE))
            if meta.is_diff:
                _print_locators(fd, meta, hexa)
            if has_batmap(meta.footer) and meta.batmap_header is not None:
                _print_batmap(meta, meta.batmap_header, hexa)
    finally:
        os.close(fd)


def num(hexa: bool, n: int) -> str:
    """A number as blktap's ``conv`` prints it: decimal, or ``%#x`` with ``-x``."""
    return (f"{n:#x}" if n else "0") if hexa else str(n)


def _time(ts: int) -> str:
    return time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(ts + VHD_EPOCH))


TYPE_STR = [
    "None",
    "Reserved (deprecated)",
    "Fixed hard disk",
    "Dynamic hard disk",
    "Differencing hard disk",
    "Reserved (deprecated)",
    "Reserved (deprecated)",
]


def _csum_line_of(raw: bytes, at: int) -> str:
    """The checksum line of a stored structure whose checksum field is at ``at``."""
    stored = int.from_bytes(raw[at : at + 4], "big")
    return _csum_line(stored, checksum(raw[:at] + bytes(4) + raw[at + 4 :]))


def _csum_line(stored: int, computed: int) -> str:
    verdict = "Good!" if stored == computed else "Bad!"
    return f"Checksum            : {stored:#x}|{computed:#x} ({verdict})"


def _print_footer(f: Footer, hexa: bool, raw: bytes) -> None:
    c, h, s = f.geometry >> 16, (f.geometry >> 8) & 0xFF, f.geometry & 0xFF
    os_name = {0x5769326B: "Windows", 0x4D616320: "Macintosh"}.get(f.creator_os, "Unknown!")
    features = ("<TEMP>" if f.features & 1 else "") + ("<RESV>" if f.features & 2 else "")
    lines = [
        "VHD Footer Summary:",
        "-------------------",
        f"Cookie              : {f.cookie.decode('latin-1')}",
        f"Features            : (0x{f.features:08x}) {features}",
        f"File format version : Major: {f.version >> 16}, Minor: {f.version & 0xFFFF}",
        f"Data offset         : {num(hexa, f.data_offset)}",
        f"Timestamp           : {_time(f.timestamp)}",
        f"Creator Application : '{f.creator_app.decode('latin-1').rstrip(chr(0))}'",
        f"Creator version     : Major: {f.creator_version >> 16}, "
        f"Minor: {f.creator_version & 0xFFFF}",
        f"Creator OS          : {os_name}",
        f"Original disk size  : {num(hexa, f.original_size >> 20)} MB "
        f"({num(hexa, f.original_size)} Bytes)",
        f"Current disk size   : {num(hexa, f.current_size >> 20)} MB "
        f"({num(hexa, f.current_size)} Bytes)",
        f"Geometry            : Cyl: {num(hexa, c)}, Hds: {num(hexa, h)}, Sctrs: {num(hexa, s)}",
        f"                    : = {num(hexa, (c * h * s) >> 11)} MB "
        f"({num(hexa, c * h * s << 9)} Bytes)",
        f"Disk type           : {TYPE_STR[f.disk_type] if f.disk_type < 7 else 'Unknown type!'}",
        _csum_line_of(raw, 64),
        f"UUID                : {uuidlib.UUID(bytes=f.uuid)}",
        f"Saved state         : {'No' if f.saved_state == 0 else 'Yes'}",
        f"Hidden              : {f.hidden}",
        "",
    ]
    print("\n".join(lines))


def _print_header(h: Header, hexa: bool, raw: bytes) -> None:
    lines = [
        "VHD Header Summary:",
        "-------------------",
        f"Cookie              : {h.cookie.decode('latin-1')}",
        f"Data offset (unusd) : {num(hexa, h.data_offset)}",
        f"Table offset        : {num(hexa, h.table_offset)}",
        f"Header version      : 0x{h.version:08x}",
        f"Max BAT size        : {num(hexa, h.max_table_entries)}",
        f"Block size          : {num(hexa, h.block_size)} ({num(hexa, h.block_size >> 20)} MB)",
        f"Parent name         : {h.parent_name}",
        f"Parent UUID         : {uuidlib.UUID(bytes=h.parent_uuid)}",
        f"Parent timestamp    : {_time(h.parent_timestamp)}",
        _csum_line_of(raw, 36),
        "",
    ]
    print("\n".join(lines))


CODE_NAMES = {
    PLAT_NONE: "PLAT_CODE_NONE",
    PLAT_WI2R: "PLAT_CODE_WI2R",
    PLAT_WI2K: "PLAT_CODE_WI2K",
    PLAT_W2RU: "PLAT_CODE_W2RU",
    PLAT_W2KU: "PLAT_CODE_W2KU",
    PLAT_MAC: "PLAT_CODE_MAC",
    PLAT_MACX: "PLAT_CODE_MACX",
}


def _print_locators(fd: int, meta: Metadata, hexa: bool) -> None:
    assert meta.header is not None
    print("VHD Parent Locators:\n--------------------")
    for i, loc in enumerate(meta.header.locators):
        if loc.code == PLAT_NONE:
            continue
        name = decode_locator(loc.code, read_at(fd, loc.data_offset, loc.data_length))
        print(f"locator:            : {i}")
        print(f"       code         : {CODE_NAMES.get(loc.code, 'UNKOWN')}")
        print(f"       data_space   : {num(hexa, loc.data_space)}")
        print(f"       data_length  : {num(hexa, loc.data_length)}")
        print(f"       data_offset  : {num(hexa, loc.data_offset)}")
        print(f"       decoded name : {name}" if name else "failed to read parent name")
        print()


def _print_batmap(meta: Metadata, bh: BatmapHeader, hexa: bool) -> None:
    computed = batmap_checksum(meta.batmap or b"", meta.footer.current_size, bh.version)
    print("VHD Batmap Summary:\n-------------------")
    print(f"Batmap offset       : {num(hexa, bh.offset)}")
    print(f"Batmap size (secs)  : {num(hexa, bh.size_sectors)}")
    print(f"Batmap version      : 0x{bh.version:08x}")
    if bh.keyhash_cookie == 1:
        print(f"Batmap keyhash nonce: {bh.nonce.hex()}")
        print(f"Batmap keyhash hash : {bh.keyhash.hex()}")
    print(_csum_line(bh.checksum, computed))
    print()
