"""``vhd-util``: blktap's VHD tool, with its subcommands, flags and output formats.

Scripts written for blktap's ``vhd-util`` run unchanged.  Every subcommand
exits 0 on success, or with a positive errno after a message on stderr.  The
work itself lives in ``tapdisk.drivers.vhd`` (shared with ``tap-img``); this
module only parses blktap-style options and prints blktap-style output.
"""

from __future__ import annotations

import asyncio
import errno
import getopt
import glob
import os
import sys
import time
import uuid as uuidlib
from collections.abc import Callable

from tapdisk.drivers.base import ImageError
from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.chain import decode_locator, find_parent, locator_paths
from tapdisk.drivers.vhd.check import check_vhd, repair_vhd
from tapdisk.drivers.vhd.coalesce import coalesce
from tapdisk.drivers.vhd.create import create_vhd, snapshot_vhd
from tapdisk.drivers.vhd.format import (
    BAT_UNUSED,
    FOOTER_SIZE,
    HEADER_SIZE,
    PLAT_MAC,
    PLAT_MACX,
    PLAT_NONE,
    PLAT_W2KU,
    PLAT_W2RU,
    PLAT_WI2K,
    PLAT_WI2R,
    SECTOR,
    VHD_EPOCH,
    BatmapHeader,
    Footer,
    Header,
    batmap_checksum,
    checksum,
    has_batmap,
)
from tapdisk.drivers.vhd.image import VhdImage
from tapdisk.drivers.vhd.meta import Metadata, load, read_at

MiB = 1 << 20
#: Like blktap's tool, vhd-util follows parents wherever they are; only the driver that
#: serves images confines them to allowed directories.
ANYWHERE = ("/",)


class UsageError(Exception):
    """Bad or missing options; the message is the subcommand's usage line."""


def _open_meta(path: str) -> Metadata:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return load(fd, os.path.abspath(path))
    finally:
        os.close(fd)


def _parent_of(path: str, meta: Metadata, resolve: bool = True) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not resolve:
            return locator_paths(fd, meta)[0][1]
        return find_parent(os.path.abspath(path), fd, meta, ANYWHERE)
    finally:
        os.close(fd)


def _phys_size(meta: Metadata) -> int:
    """blktap's physical utilisation: end of data plus the footer."""
    if meta.is_fixed:
        return meta.footer.current_size + FOOTER_SIZE
    return meta.data_end + FOOTER_SIZE


def _chain_depth(path: str) -> int:
    depth, current = 1, os.path.abspath(path)
    while True:
        meta = _open_meta(current)
        if not meta.is_diff or meta.header is None or meta.header.parent_uuid == bytes(16):
            return depth
        current = _parent_of(current, meta)
        depth += 1
        if depth > 4096:
            raise ImageError(f"{path}: parent chain has a loop")


def _opts(argv: list[str], spec: str, usage: str) -> tuple[dict[str, str], list[str]]:
    try:
        pairs, rest = getopt.getopt(argv, spec)
    except getopt.GetoptError as exc:
        raise UsageError(f"{exc}\n{usage}") from None
    opts: dict[str, str] = {}
    for k, v in pairs:
        opts[k[1]] = v
    if "h" in opts:
        print(usage)
        raise SystemExit(0)
    return opts, rest


def _need(opts: dict[str, str], usage: str, *keys: str) -> None:
    if any(k not in opts for k in keys):
        raise UsageError(usage)


def _int(value: str, what: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise UsageError(f"{what} must be a number, not {value!r}") from None


# -- subcommands ----------------------------------------------------------------


def cmd_create(argv: list[str]) -> int:
    usage = (
        "options: <-n name> <-s size (MB)> [-r reserve] [-S size (MB) for metadata preallocation]"
    )
    o, rest = _opts(argv, "n:s:S:rh", usage)
    _need(o, usage, "n", "s")
    if rest:
        raise UsageError(usage)
    size = _int(o["s"], "size") * MiB
    max_size = _int(o["S"], "-S") * MiB if "S" in o else None
    if max_size is not None and max_size < size:
        raise UsageError("Error: <-S size> must be greater than <-s size>")
    create_vhd(o["n"], size, fixed="r" in o, max_size=max_size)
    return 0


def cmd_snapshot(argv: list[str]) -> int:
    usage = (
        "options: <-n name> <-p parent name> [-l snapshot depth limit] [-m parent_is_raw] "
        "[-S size (MB) for metadata preallocation] [-e link to supplied parent name even "
        "if it's empty]"
    )
    o, rest = _opts(argv, "n:p:S:l:meh", usage)
    _need(o, usage, "n", "p")
    if rest:
        raise UsageError(usage)
    parent = os.path.abspath(o["p"])
    raw = "m" in o
    if not raw and "e" not in o:
        parent = _snapshot_target(parent)
    limit = _int(o["l"], "limit") if "l" in o else 0
    if limit and not raw:
        depth = _chain_depth(parent)
        if depth + 1 > limit:
            print(f"snapshot depth exceeded: current depth: {depth}, limit: {limit}")
            return errno.ENOSPC
    max_size = _int(o["S"], "-S") * MiB if "S" in o else None
    snapshot_vhd(o["n"], parent, parent_raw=raw, max_size=max_size)
    return 0


def _snapshot_target(path: str) -> str:
    """Skip empty differencing parents, as blktap does: link to the first with data."""
    while True:
        meta = _open_meta(path)
        if not meta.is_diff or meta.allocated_blocks():
            return path
        assert meta.header is not None
        if meta.header.parent_uuid == bytes(16):
            return path
        path = _parent_of(path, meta)


def cmd_query(argv: list[str]) -> int:
    usage = (
        "options: <-n name> [-v print virtual size (in MB)] [-s print physical utilization "
        "(bytes)] [-p print parent] [-f print fields] [-m print marker] [-d print chain depth] "
        "[-S print max virtual size (MB) for fast resize] [-a print allocated block count] "
        "[-u don't resolve parent path]"
    )
    o, rest = _opts(argv, "n:vspfdSmauh", usage)
    _need(o, usage, "n")
    if rest:
        raise UsageError(usage)
    name = o["n"]
    meta = _open_meta(name)
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
                print(_parent_of(name, meta, resolve="u" not in o))
            except (ImageError, OSError, IndexError):
                print("query failed")
                err = err or errno.EINVAL
    if "f" in o:
        print(f"hidden: {meta.footer.hidden}")
    if "m" in o:
        print(f"marker: {edit.get_marker(meta)}")
    if "d" in o:
        try:
            print(f"chain depth: {_chain_depth(name)}")
        except (ImageError, OSError) as exc:
            print(f"error checking chain depth: -{getattr(exc, 'errno', None) or errno.EINVAL}")
            err = err or errno.EINVAL
    if "a" in o:
        print(0 if meta.is_fixed else meta.allocated_blocks())
    if "S" in o:
        print(meta.header.max_table_entries * meta.header.block_size >> 20 if meta.header else 0)
    return err


def cmd_check(argv: list[str]) -> int:
    usage = (
        "options: -n <file> [-i ignore missing primary footers] [-p check parents] "
        "[-b check bitmaps] [-h help]"
    )
    o, rest = _opts(argv, "n:ipbh", usage)
    _need(o, usage, "n")
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


def cmd_set(argv: list[str]) -> int:
    usage = "options: <-n name> <-f field> <-v value> [-h help]"
    o, rest = _opts(argv, "n:f:v:h", usage)
    _need(o, usage, "n", "f", "v")
    if rest:
        raise UsageError(usage)
    value = _int(o["v"], "value")
    if o["f"] == "hidden":
        edit.set_hidden(o["n"], value)
    elif o["f"] == "marker":
        edit.set_marker(o["n"], value)
    else:
        raise UsageError(f"invalid field {o['f']!r} (hidden or marker)")
    return 0


def cmd_repair(argv: list[str]) -> int:
    usage = "options: <-n name> <-b use the back-up footer> [-h help]"
    o, rest = _opts(argv, "n:bh", usage)
    _need(o, usage, "n")
    if rest:
        raise UsageError(usage)
    if "b" in o:
        _restore_backup_footer(o["n"])
    for line in repair_vhd(o["n"]):
        print(line)
    return 0


def _restore_backup_footer(path: str) -> None:
    """Copy the offset-0 footer over the trailing one (``repair -b``)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        backup = read_at(fd, 0, FOOTER_SIZE)
        Footer.unpack(backup, f"{path} (backup footer)")
        size = os.fstat(fd).st_size
        os.pwrite(fd, backup, size - size % SECTOR - FOOTER_SIZE)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def cmd_coalesce(argv: list[str]) -> int:
    usage = "options: <-n name> [-s sparse] [-p progress] [-h help]"
    o, rest = _opts(argv, "n:o:a:x:sph", usage)
    _need(o, usage, "n")
    if rest:
        raise UsageError(usage)
    show = sys.stdout.isatty()

    def progress(done: int, total: int) -> None:
        print(f"\r{100.0 * done / total:6.2f}%", end="", flush=True)

    _, sectors = coalesce(o["n"], progress=progress if show else None, allowed_dirs=ANYWHERE)
    if show:
        print("\r100.00%")
    print(f"Coalesced {sectors} sectors")
    return 0


def cmd_resize(argv: list[str]) -> int:
    usage = "options: <-n name> <-s size (MB)> <-f | -j journal> [-h help]"
    o, rest = _opts(argv, "n:s:j:fh", usage)
    _need(o, usage, "n", "s")
    if rest or ("f" not in o and "j" not in o):
        raise UsageError(usage)
    edit.resize(o["n"], _int(o["s"], "size") * MiB)
    return 0


def cmd_modify(argv: list[str]) -> int:
    usage = "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size]"
    o, rest = _opts(argv, "n:s:p:mh", usage)
    _need(o, usage, "n")
    if rest or ("p" not in o and "s" not in o):
        raise UsageError(usage)
    if "p" in o:
        edit.set_parent(o["n"], o["p"], parent_raw="m" in o)
    if "s" in o:
        edit.set_physical_size(o["n"], _int(o["s"], "size"))
    return 0


def cmd_scan(argv: list[str]) -> int:
    usage = (
        "usage: [OPTIONS] FILES\noptions: [-m match filter] [-f fast] [-c continue on failure] "
        "[-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] [-h help] "
        "[-M show markers]"
    )
    o, files = _opts(argv, "m:fcl:pavMh", usage)
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
        meta = _open_meta(path)
        img.capacity = meta.footer.current_size
        img.size = os.stat(path).st_size
        img.hidden = meta.footer.hidden
        img.marker = edit.get_marker(meta)
        if meta.batmap_header is not None and meta.batmap_header.keyhash_cookie == 1:
            img.keyhash = meta.batmap_header.keyhash.hex()
        if meta.is_diff:
            img.parent = _parent_of(path, meta)
    except (ImageError, OSError) as exc:
        code = getattr(exc, "errno", None) or errno.EINVAL
        img.error = (-code, str(exc).replace("'", '"'))
    return img


def cmd_read(argv: list[str]) -> int:
    usage = "options: <-n name> [-p print headers] [-x print in hex] [-h help]"
    o, rest = _opts(argv, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", usage)
    _need(o, usage, "n")
    if rest or "p" not in o:
        raise UsageError(usage)
    meta = _open_meta(o["n"])
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


def cmd_fill(argv: list[str]) -> int:
    usage = "options: <-n name> [-h help]"
    o, rest = _opts(argv, "n:h", usage)
    _need(o, usage, "n")
    if rest:
        raise UsageError(usage)
    asyncio.run(_fill(o["n"]))
    return 0


async def _fill(path: str) -> None:
    """Allocate every block, keeping the contents (read through the chain, write back)."""
    image = VhdImage(path)
    try:
        store = image.store
        if store is None:
            return
        buf = memoryview(bytearray(store.block_size))
        for b in range(store.blocks):
            start = b << store.shift
            n = min(store.block_size, image.size - start)
            if store.bat[b] == BAT_UNUSED or not store.fast[b]:
                await image.read(start, buf[:n])
                await image.write(start, buf[:n])
        await image.flush()
    finally:
        await image.close()


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "create": cmd_create,
    "snapshot": cmd_snapshot,
    "query": cmd_query,
    "check": cmd_check,
    "set": cmd_set,
    "repair": cmd_repair,
    "coalesce": cmd_coalesce,
    "resize": cmd_resize,
    "scan": cmd_scan,
    "modify": cmd_modify,
    "read": cmd_read,
    "fill": cmd_fill,
}


EXAMPLES = """
examples:
  vhd-util create -n disk.vhd -s 10240            10 GiB dynamic VHD
  vhd-util snapshot -n leaf.vhd -p disk.vhd       differencing child of disk.vhd
  vhd-util query -n leaf.vhd -v -s -p             virtual size, physical size, parent
  vhd-util check -n leaf.vhd                      "leaf.vhd is valid" or what is wrong
  vhd-util coalesce -n leaf.vhd                   copy leaf's data into its parent
  vhd-util scan -f -m '/images/*.vhd' -p          the chains as a tree
  vhd-util COMMAND -h                             the options of one command
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(f"usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := {{ {' | '.join(COMMANDS)} }}")
        if args and args[0] in ("-h", "--help"):
            print(EXAMPLES, end="")
            return 0
        return errno.EINVAL
    cmd = args[0]
    try:
        return COMMANDS[cmd](args[1:])
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return errno.EINVAL
    except FileExistsError as exc:
        print(f"vhd-util {cmd}: {exc.filename}: already exists", file=sys.stderr)
        return errno.EEXIST
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vhd-util {cmd}: {where}{exc.strerror or exc}", file=sys.stderr)
        return exc.errno or errno.EIO
    except ImageError as exc:
        print(f"vhd-util {cmd}: {exc}", file=sys.stderr)
        return errno.EINVAL


if __name__ == "__main__":
    raise SystemExit(main())
