"""The ``vhd-util`` subcommands that only read images: query, check, scan and read.

Their output is blktap's, line for line, so scripts that parse it run unchanged.
"""

from __future__ import annotations

import errno
import glob
import os
import sys
import time
import uuid as uuidlib

from tapdisk.drivers.base import ImageError
from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.chain import decode_locator
from tapdisk.drivers.vhd.check import check_vhd
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

from .args import UsageError, parse_options, require
from .chain import ANYWHERE, chain_depth, open_meta, parent_of


def cmd_query(argv: list[str]) -> int:
    usage = (
        "options: <-n name> [-v print virtual size (in MB)] [-s print physical utilization "
        "(bytes)] [-p print parent] [-f print fields] [-m print marker] [-d print chain depth] "
        "[-S print max virtual size (MB) for fast resize] [-a print allocated block count] "
        "[-u don't resolve parent path]"
    )
    o, rest = parse_options(argv, "n:vspfdSmauh", usage)
    require(o, usage, "n")
    if rest:
        raise UsageError(usage)
    name = o["n"]
    meta = open_meta(name)
    err = 0
    if "v" in o:
        print(meta.footer.current_size >> 20)
    if "s" in o:
        print(_phys_size(meta))
    if "p" in o:
        if not meta.is_diff:
            print(f"{name} has no parent")
        else:
            try:
                print(parent_of(name, meta, resolve="u" not in o))
            except (ImageError, OSError, IndexError):
                print("query failed")
                err = err or errno.EINVAL
    if "f" in o:
        print(f"hidden: {meta.footer.hidden}")
    if "m" in o:
        print(f"marker: {edit.get_marker(meta)}")
    if "d" in o:
        try:
            print(f"chain depth: {chain_depth(name)}")
        except (ImageError, OSError) as exc:
            print(f"error checking chain depth: -{getattr(exc, 'errno', None) or errno.EINVAL}")
            err = err or errno.EINVAL
    if "a" in o:
        print(0 if meta.is_fixed else meta.allocated_blocks())
    if "S" in o:
        print(meta.header.max_table_entries * meta.header.block_size >> 20 if meta.header else 0)
    return err


def _phys_size(meta: Metadata) -> int:
    """blktap's physical utilisation: end of data plus the footer."""
    if meta.is_fixed:
        return meta.footer.current_size + FOOTER_SIZE
    return meta.data_end + FOOTER_SIZE


def cmd_check(argv: list[str]) -> int:
    usage = (
        "options: -n <file> [-i ignore missing primary footers] [-p check parents] "
        "[-b check bitmaps] [-h help]"
    )
    o, rest = parse_options(argv, "n:ipbh", usage)
    require(o, usage, "n")
    if rest:
        raise UsageError(usage)
    name = o["n"]
    problems = check_vhd(
        name, parents="p" in o, bitmaps="b" in o, ignore_footer="i" in o, allowed_dirs=ANYWHERE
    )
    if problems:
        for line in problems:
            print(line)
        print(f"{name} appears invalid", file=sys.stderr)
        return errno.EINVAL
    print(f"{name} is valid")
    return 0


def cmd_scan(argv: list[str]) -> int:
    usage = (
        "usage: [OPTIONS] FILES\noptions: [-m match filter] [-f fast] [-c continue on failure] "
        "[-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] [-h help] "
        "[-M show markers]"
    )
    o, files = parse_options(argv, "m:fcl:pavMh", usage)
    if "m" not in o and not files:
        raise UsageError(usage)
    if "l" in o:
        raise ImageError("LVM volume scanning (-l) is not supported")
    names = set(os.path.abspath(f) for f in files)
    if "m" in o:
        names.update(os.path.abspath(f) for f in glob.glob(o["m"]))
    images = {n: _scan_one(n) for n in names}
    if "a" in o:
        todo = [i for i in images.values() if i.parent]
        while todo:
            img = todo.pop()
            if img.parent and img.parent not in images:
                images[img.parent] = _scan_one(img.parent)
                todo.append(images[img.parent])
    verbose, markers = "v" in o, "M" in o
    failed = False
    if "p" in o:
        children: dict[str, list[ScanImage]] = {}
        for img in images.values():
            if img.parent in images:
                children.setdefault(img.parent, []).append(img)

        def tree(img: ScanImage, depth: int) -> None:
            print(img.line(verbose, markers, depth * 3, pretty_missing=False))
            kids = sorted(children.get(img.path, []), key=lambda i: i.path)
            for kid in [k for k in kids if not k.hidden] + [k for k in kids if k.hidden]:
                tree(kid, depth + 1)

        for img in sorted(images.values(), key=lambda i: i.path):
            if img.parent not in images:
                print(img.line(verbose, markers, 0, pretty_missing=True))
                kids = sorted(children.get(img.path, []), key=lambda i: i.path)
                for kid in [k for k in kids if not k.hidden] + [k for k in kids if k.hidden]:
                    tree(kid, 1)
            failed |= img.error is not None
    else:
        for img in sorted(images.values(), key=lambda i: i.path):
            print(img.line(verbose, markers, 0, pretty_missing=False))
            failed |= img.error is not None
    return errno.EINVAL if failed and "c" not in o else 0


class ScanImage:
    """One line of ``vhd-util scan`` output."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: tuple[int, str] | None = None
        self.capacity = self.size = self.hidden = self.marker = 0
        self.keyhash = ""
        self.parent: str | None = None

    def line(self, verbose: bool, markers: bool, tab: int, pretty_missing: bool) -> str:
        pad = " " * tab
        if self.error:
            return (
                f"{pad}vhd={self.path} scan-error={self.error[0]} error-message='{self.error[1]}'"
            )
        name = self.path if verbose else os.path.basename(self.path)
        parent = "none"
        if self.parent:
            parent = self.parent if verbose else os.path.basename(self.parent)
        note = " (not found in scan)" if pretty_missing and self.parent else ""
        if markers:
            return (
                f"{pad}vhd={name} capacity={self.capacity} size={self.size} hidden={self.hidden} "
                f"marker={self.marker} keyhash={self.keyhash} parent={parent}{note}"
            )
        return (
            f"{pad}vhd={name} capacity={self.capacity} size={self.size} hidden={self.hidden} "
            f"parent={parent}{note}"
        )


def _scan_one(path: str) -> ScanImage:
    img = ScanImage(path)
    try:
        meta = open_meta(path)
        img.capacity = meta.footer.current_size
        img.size = os.stat(path).st_size
        img.hidden = meta.footer.hidden
        img.marker = edit.get_marker(meta)
        if meta.batmap_header is not None and meta.batmap_header.keyhash_cookie == 1:
            img.keyhash = meta.batmap_header.keyhash.hex()
        if meta.is_diff:
            img.parent = parent_of(path, meta)
    except (ImageError, OSError) as exc:
        code = getattr(exc, "errno", None) or errno.EINVAL
        img.error = (-code, str(exc).replace("'", '"'))
    return img


def cmd_read(argv: list[str]) -> int:
    usage = "options: <-n name> [-p print headers] [-x print in hex] [-h help]"
    o, rest = parse_options(argv, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", usage)
    require(o, usage, "n")
    if rest or "p" not in o:
        raise UsageError(usage)
    meta = open_meta(o["n"])
    hexa = "x" in o
    fd = os.open(o["n"], os.O_RDONLY | os.O_CLOEXEC)
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
    return 0


def _num(hexa: bool, n: int) -> str:
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
        f"Data offset         : {_num(hexa, f.data_offset)}",
        f"Timestamp           : {_time(f.timestamp)}",
        f"Creator Application : '{f.creator_app.decode('latin-1').rstrip(chr(0))}'",
        f"Creator version     : Major: {f.creator_version >> 16}, "
        f"Minor: {f.creator_version & 0xFFFF}",
        f"Creator OS          : {os_name}",
        f"Original disk size  : {_num(hexa, f.original_size >> 20)} MB "
        f"({_num(hexa, f.original_size)} Bytes)",
        f"Current disk size   : {_num(hexa, f.current_size >> 20)} MB "
        f"({_num(hexa, f.current_size)} Bytes)",
        f"Geometry            : Cyl: {_num(hexa, c)}, Hds: {_num(hexa, h)}, Sctrs: {_num(hexa, s)}",
        f"                    : = {_num(hexa, (c * h * s) >> 11)} MB "
        f"({_num(hexa, c * h * s << 9)} Bytes)",
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
        f"Data offset (unusd) : {_num(hexa, h.data_offset)}",
        f"Table offset        : {_num(hexa, h.table_offset)}",
        f"Header version      : 0x{h.version:08x}",
        f"Max BAT size        : {_num(hexa, h.max_table_entries)}",
        f"Block size          : {_num(hexa, h.block_size)} ({_num(hexa, h.block_size >> 20)} MB)",
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
        print(f"       data_space   : {_num(hexa, loc.data_space)}")
        print(f"       data_length  : {_num(hexa, loc.data_length)}")
        print(f"       data_offset  : {_num(hexa, loc.data_offset)}")
        print(f"       decoded name : {name}" if name else "failed to read parent name")
        print()


def _print_batmap(meta: Metadata, bh: BatmapHeader, hexa: bool) -> None:
    computed = batmap_checksum(meta.batmap or b"", meta.footer.current_size, bh.version)
    print("VHD Batmap Summary:\n-------------------")
    print(f"Batmap offset       : {_num(hexa, bh.offset)}")
    print(f"Batmap size (secs)  : {_num(hexa, bh.size_sectors)}")
    print(f"Batmap version      : 0x{bh.version:08x}")
    if bh.keyhash_cookie == 1:
        print(f"Batmap keyhash nonce: {bh.nonce.hex()}")
        print(f"Batmap keyhash hash : {bh.keyhash.hex()}")
    print(_csum_line(bh.checksum, computed))
    print()
