"""The ``vhd-util`` subcommands that change images: create, snapshot, set, repair,
coalesce, modify, fill and copy (resize and revert are in ``journaled``).

The work itself lives in ``tapdisk.drivers.vhd``; these parse blktap's options and
print blktap's output.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys

from tapdisk.drivers.base import ImageError
from tapdisk.drivers.paths import open_disk
from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.check import repair_vhd
from tapdisk.drivers.vhd.coalesce import coalesce
from tapdisk.drivers.vhd.create import create_vhd
from tapdisk.drivers.vhd.format import (
    BAT_UNUSED,
    DEFAULT_BLOCK_SIZE,
    FOOTER_SIZE,
    SECTOR,
    Footer,
)
from tapdisk.drivers.vhd.image import VhdImage
from tapdisk.drivers.vhd.meta import read_at

from .args import UsageError, no_operands, number, parse_options, require
from .chain import ANYWHERE, chain_depth, open_meta, parent_of

MiB = 1 << 20


def whole_blocks(size: int) -> int:
    """blktap creates in whole 2 MiB blocks: ``-s 9`` makes a 10 MiB disk."""
    return -(-size // DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE


def cmd_create(argv: list[str]) -> int:
    usage = (
        "options: <-n name> <-s size (MB)> [-r reserve] [-h help] "
        "[<-S size (MB) for metadata preallocation (see vhd-util resize)>]"
    )
    o, rest = parse_options(argv, "n:s:S:rh", usage)
    require(o, usage, "n", "s")
    no_operands(rest, usage)
    size = whole_blocks(number(o["s"], "size") * MiB)
    max_mb = number(o["S"], "-S") if "S" in o else 0  # blktap reads -S 0 as no -S
    max_size = whole_blocks(max_mb * MiB) if max_mb else None
    if max_size is not None and max_size < size:
        raise UsageError("Error: <-S size> must be greater than <-s size>")
    create_vhd(o["n"], size, fixed="r" in o, max_size=max_size)
    return 0


def cmd_snapshot(argv: list[str]) -> int:
    usage = (
        "options: <-n name> <-p parent name> [-l snapshot depth limit] [-m parent_is_raw] "
        "[-S size (MB) for metadata preallocation (see vhd-util resize)] [-e link to "
        "supplied parent name even if it's empty] [-h help]"
    )
    o, rest = parse_options(argv, "n:p:S:l:meh", usage)
    require(o, usage, "n", "p")
    no_operands(rest, usage)
    supplied = os.path.abspath(o["p"])
    raw = "m" in o
    parent = supplied if raw or "e" in o else _snapshot_target(supplied)
    limit = number(o["l"], "limit") if "l" in o else 0
    if limit and not raw:
        depth = chain_depth(parent)
        if depth + 1 > limit:
            print(f"snapshot depth exceeded: current depth: {depth}, limit: {limit}")
            print(f"vhd-util snapshot: {parent} is {depth} deep already", file=sys.stderr)
            return errno.ENOSPC
    max_size = number(o["S"], "-S") * MiB if "S" in o else 0
    # Past empty parents the chain's sizes may differ: the supplied parent's size counts.
    size = 0 if parent == supplied else open_meta(supplied).footer.current_size
    create_vhd(o["n"], size, parent=parent, parent_raw=raw, max_size=max_size or None)
    if not raw:
        _inherit_keyhash(o["n"], parent)
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


def _inherit_keyhash(child: str, parent: str) -> None:
    """A snapshot of an encrypted VHD carries its key hash, as blktap's does."""
    fd = open_disk(parent, os.O_RDONLY)
    try:
        cookie, nonce, keyhash = edit.get_keyhash(fd, open_meta(parent))
    finally:
        os.close(fd)
    if cookie == 1:
        edit.set_keyhash(child, nonce, keyhash)


def cmd_set(argv: list[str]) -> int:
    usage = "options: <-n name> <-f field> <-v value> [-h help]"
    o, rest = parse_options(argv, "n:f:v:h", usage)
    require(o, usage, "n", "f", "v")
    no_operands(rest, usage)
    value = number(o["v"], "value")
    if o["f"] == "hidden":
        edit.set_hidden(o["n"], value)
    elif o["f"] == "marker":
        edit.set_marker(o["n"], value)
    else:
        raise UsageError(f"invalid field {o['f']} (hidden or marker)")
    return 0


def cmd_repair(argv: list[str]) -> int:
    usage = "options: <-n name> <-b use the back-up footer> [-h help]"
    o, rest = parse_options(argv, "n:bh", usage)
    require(o, usage, "n")
    no_operands(rest, usage)
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
        size = os.lseek(fd, 0, os.SEEK_END)
        os.pwrite(fd, backup, size - size % SECTOR - FOOTER_SIZE)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def cmd_coalesce(argv: list[str]) -> int:
    usage = "options: <-n name> [-s sparse] [-p progress] [-h help]"
    o, rest = parse_options(argv, "n:o:a:x:sph", usage)
    require(o, usage, "n")
    no_operands(rest, usage)
    show = sys.stdout.isatty()

    def progress(done: int, total: int) -> None:
        print(f"\r{100.0 * done / total:6.2f}%", end="", flush=True)

    _, sectors = coalesce(o["n"], progress=progress if show else None, allowed_dirs=ANYWHERE)
    if show:
        print("\r100.00%")
    print(f"Coalesced {sectors} sectors")
    return 0


def cmd_modify(argv: list[str]) -> int:
    usage = (
        "*** Dangerous operations, use with care ***\n"
        "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size] "
        "[-z zero (kill data)] [-h help]"
    )
    o, rest = parse_options(argv, "n:s:p:mzh", usage)
    require(o, usage, "n")
    no_operands(rest, usage)
    if "z" in o:
        edit.zero_data(o["n"])
    if "s" in o:
        edit.set_physical_size(o["n"], number(o["s"], "size"))
    if "p" in o:
        edit.set_parent(o["n"], o["p"], parent_raw="m" in o)
    return 0


def cmd_fill(argv: list[str]) -> int:
    usage = (
        "options: <-n name> [-h help] [-b initialise the BAT and bitmaps, don't write to the "
        "data blocks (much faster)] [-f start intialisation from this sector, only usable with "
        "-b] [-t intialise up to this sector (inclusive), only usable with -b] [-B ignore the "
        "2 TB limit, only usable with -b]"
    )
    o, rest = parse_options(argv, "n:f:t:bBh", usage)
    require(o, usage, "n")
    no_operands(rest, usage)
    if ("f" in o or "t" in o) and "b" not in o:
        raise UsageError(f"-f/-t can only be used with -b\n{usage}")
    if "B" in o and "b" not in o:
        raise UsageError(f"-B can only be used with -b\n{usage}")
    if "b" not in o:
        asyncio.run(_fill(o["n"]))
        return 0
    meta = open_meta(o["n"])
    if meta.header is None:
        raise ImageError(f"{o['n']}: a fixed VHD is allocated already")
    spb = meta.header.block_size // SECTOR
    first = number(o["f"], "-f") if "f" in o else 0
    last = number(o["t"], "-t") if "t" in o else meta.blocks * spb - 1
    if last < first:
        raise UsageError(f"invalid sector range {first}-{last}\n{usage}")
    if last >= meta.blocks * spb:
        raise UsageError(f"sector {last} is past the end of the disk\n{usage}")
    edit.preallocate(o["n"], first // spb, last // spb)
    return 0


async def _fill(path: str) -> None:
    """Allocate every block, keeping the contents (read through the chain, write back)."""
    image = VhdImage(path, allowed_dirs=ANYWHERE)
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


def cmd_copy(argv: list[str]) -> int:
    usage = (
        "options: -n <name> -N <new VHD name> "
        "[-k <keyfile> | -E (pass encryption key on stdin)] [-h help]"
    )
    o, rest = parse_options(argv, "n:N:k:Eh", usage)
    if "n" not in o or "N" not in o:
        raise UsageError(f"Must supply both existing and new VHD names\n{usage}")
    no_operands(rest, usage)
    if "k" in o or "E" in o:
        raise ImageError("encrypting a copy (-k, -E) needs block crypto, which tapdisk has not")
    if os.path.exists(o["N"]):
        raise ImageError(f"VHD file {o['N']} already exists, chose a different name")
    meta = open_meta(o["n"])
    if meta.is_diff:
        raise ImageError(f"{o['n']} is a differencing VHD: a copy of it would have no parent")
    create_vhd(o["N"], meta.footer.current_size, fixed=meta.is_fixed)
    try:
        asyncio.run(_copy(o["n"], o["N"]))
    except BaseException:
        os.unlink(o["N"])
        raise
    return 0


async def _copy(source_path: str, target_path: str) -> None:
    """Each block the source holds, whole, into the target (a fixed VHD: all of it)."""
    source = VhdImage(source_path, read_only=True, allowed_dirs=ANYWHERE)
    try:
        target = VhdImage(target_path)
        try:
            chunk = source.store.block_size if source.store else 2 * MiB
            buf = memoryview(bytearray(chunk))
            for start in range(0, source.size, chunk):
                b = start // chunk
                if source.store is not None and source.store.bat[b] == BAT_UNUSED:
                    continue
                n = min(chunk, source.size - start)
                await source.read(start, buf[:n])
                await target.write(start, buf[:n])
            await target.flush()
        finally:
            await target.close()
    finally:
        await source.close()
