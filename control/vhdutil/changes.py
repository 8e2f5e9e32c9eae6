"""The ``vhd-util`` subcommands that change images: create, snapshot, set, repair,
coalesce, resize, modify and fill.

The work itself lives in ``tapdisk.drivers.vhd``; these parse blktap's options and
print blktap's output.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys

from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.check import repair_vhd
from tapdisk.drivers.vhd.coalesce import coalesce
from tapdisk.drivers.vhd.create import create_vhd, snapshot_vhd
from tapdisk.drivers.vhd.format import BAT_UNUSED, FOOTER_SIZE, SECTOR, Footer
from tapdisk.drivers.vhd.image import VhdImage
from tapdisk.drivers.vhd.meta import read_at

from .args import UsageError, number, parse_options, require
from .chain import ANYWHERE, chain_depth, open_meta, parent_of

MiB = 1 << 20


def cmd_create(argv: list[str]) -> int:
    usage = (
        "options: <-n name> <-s size (MB)> [-r reserve] [-S size (MB) for metadata preallocation]"
    )
    o, rest = parse_options(argv, "n:s:S:rh", usage)
    require(o, usage, "n", "s")
    if rest:
        raise UsageError(usage)
    size = number(o["s"], "size") * MiB
    max_size = number(o["S"], "-S") * MiB if "S" in o else None
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
    o, rest = parse_options(argv, "n:p:S:l:meh", usage)
    require(o, usage, "n", "p")
    if rest:
        raise UsageError(usage)
    parent = os.path.abspath(o["p"])
    raw = "m" in o
    if not raw and "e" not in o:
        parent = _snapshot_target(parent)
    limit = number(o["l"], "limit") if "l" in o else 0
    if limit and not raw:
        depth = chain_depth(parent)
        if depth + 1 > limit:
            print(f"snapshot depth exceeded: current depth: {depth}, limit: {limit}")
            return errno.ENOSPC
    max_size = number(o["S"], "-S") * MiB if "S" in o else None
    snapshot_vhd(o["n"], parent, parent_raw=raw, max_size=max_size)
    return 0


def _snapshot_target(path: str) -> str:
    """Skip empty differencing parents, as blktap does: link to the first with data."""
    while True:
        meta = open_meta(path)
        if not meta.is_diff or meta.allocated_blocks():
            return path
        assert meta.header is not None
        if meta.header.parent_uuid == bytes(16):
            return path
        path = parent_of(path, meta)


def cmd_set(argv: list[str]) -> int:
    usage = "options: <-n name> <-f field> <-v value> [-h help]"
    o, rest = parse_options(argv, "n:f:v:h", usage)
    require(o, usage, "n", "f", "v")
    if rest:
        raise UsageError(usage)
    value = number(o["v"], "value")
    if o["f"] == "hidden":
        edit.set_hidden(o["n"], value)
    elif o["f"] == "marker":
        edit.set_marker(o["n"], value)
    else:
        raise UsageError(f"invalid field {o['f']!r} (hidden or marker)")
    return 0


def cmd_repair(argv: list[str]) -> int:
    usage = "options: <-n name> <-b use the back-up footer> [-h help]"
    o, rest = parse_options(argv, "n:bh", usage)
    require(o, usage, "n")
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
    o, rest = parse_options(argv, "n:o:a:x:sph", usage)
    require(o, usage, "n")
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
    o, rest = parse_options(argv, "n:s:j:fh", usage)
    require(o, usage, "n", "s")
    if rest or ("f" not in o and "j" not in o):
        raise UsageError(usage)
    edit.resize(o["n"], number(o["s"], "size") * MiB)
    return 0


def cmd_modify(argv: list[str]) -> int:
    usage = "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size]"
    o, rest = parse_options(argv, "n:s:p:mh", usage)
    require(o, usage, "n")
    if rest or ("p" not in o and "s" not in o):
        raise UsageError(usage)
    if "p" in o:
        edit.set_parent(o["n"], o["p"], parent_raw="m" in o)
    if "s" in o:
        edit.set_physical_size(o["n"], number(o["s"], "size"))
    return 0


def cmd_fill(argv: list[str]) -> int:
    usage = "options: <-n name> [-h help]"
    o, rest = parse_options(argv, "n:h", usage)
    require(o, usage, "n")
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
