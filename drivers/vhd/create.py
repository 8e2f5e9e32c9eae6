"""Creating VHDs the way blktap does: ``create_vhd`` and ``snapshot_vhd``.

Layout of a dynamic or differencing image we write::

    0     footer copy
    512   dynamic header
    1536  BAT (padded to a sector), then the ``tdbatmap`` header and map
          differencing: MacX, W2ku, W2ru parent locators (relative paths; a
          parent in a cluster: its spec in MacX)
    ...   data blocks, appended as written, data areas 4 KiB aligned
    end   footer

Creator ``tap`` version 1.3, 2 MiB blocks.  Fixed images are the data
followed by the footer, the data preallocated so that writing it can never fail
for want of space.  On an existing block device (an LVM volume, as SM's LVM SRs
create them) the trailing footer goes at the device's end, where readers look.
"""

from __future__ import annotations

import errno
import os
import stat

from ..backing import is_remote_backing, refuse_cluster_options
from ..base import ImageError
from ..paths import open_disk
from ..registry import NewBacking
from .format import (
    BATMAP_VERSION,
    DEFAULT_BLOCK_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_VIRTUAL_SIZE,
    PARENT_NAME_CHARS,
    PLAT_MACX,
    PLAT_W2KU,
    PLAT_W2RU,
    SECTOR,
    TYPE_DIFF,
    TYPE_DYNAMIC,
    TYPE_FIXED,
    VHD_EPOCH,
    BatmapHeader,
    Footer,
    Header,
    Locator,
    batmap_checksum,
    encode_geometry,
    new_uuid,
    pad_sector,
    vhd_now,
)
from .meta import load, write_at

TABLE_OFFSET = FOOTER_SIZE + HEADER_SIZE


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR:
        raise ImageError(f"VHD size {size} must be a positive multiple of 512 bytes")
    if size > MAX_VIRTUAL_SIZE:
        raise ImageError(f"VHD size {size} exceeds the format's limit of {MAX_VIRTUAL_SIZE}")


def _footer(disk_type: int, size: int) -> Footer:
    return Footer(
        disk_type=disk_type,
        current_size=size,
        original_size=size,
        data_offset=FOOTER_SIZE if disk_type != TYPE_FIXED else 0xFFFFFFFFFFFFFFFF,
        uuid=new_uuid(),
        geometry=encode_geometry(size),
        timestamp=vhd_now(),
    )


def relative_locator_path(child: str, parent: str) -> str:
    """The parent's path relative to the child's directory, ``./`` prefixed as blktap does."""
    rel = os.path.relpath(os.path.abspath(parent), os.path.dirname(os.path.abspath(child)))
    return rel if rel.startswith("../") else f"./{rel}"


def create_from_options(
    path: str, size: int, backing: NewBacking | None, options: dict[str, str]
) -> None:
    """Creator registered for ``vhd:`` (takes no options); a differencing image over a
    backing file takes that file's size.  A parent in a cluster is refused with options in
    its spec: tapdisk would refuse to open the child (see ``backing.open_remote_backing``)."""
    in_cluster = backing is not None and is_remote_backing(backing.path)
    if backing is not None and in_cluster:
        refuse_cluster_options(path, backing.path)
    create_vhd(
        path,
        size if backing is None or in_cluster else 0,
        parent=None if backing is None else backing.path,
        parent_raw=backing is not None and backing.format == "raw",
    )


def create_vhd(
    path: str,
    size: int,
    *,
    fixed: bool = False,
    parent: str | None = None,
    parent_raw: bool = False,
    max_size: int | None = None,
) -> None:
    """Create a new tap-style VHD at ``path`` (which must not exist).

    ``size`` is the virtual size in bytes.  With ``parent`` the image is a
    differencing child of that VHD (or raw file with ``parent_raw``) and
    ``size`` may be 0 to take the parent's size.  A ``parent`` that is an image in a
    cluster (``rbd:POOL/IMAGE@SNAP``) is a raw parent whose spec the child records as it
    is (see ``chain.cluster_parent``); ``size`` must be given.  ``max_size`` preallocates
    BAT and batmap room for a later fast resize (``vhd-util create -S``).
    """
    pinfo: tuple[bytes, int, int] | None = None
    in_cluster = parent is not None and is_remote_backing(parent)
    if in_cluster:
        if not size:
            raise ImageError(f"a VHD over {parent} needs its size")
        if len(parent) > PARENT_NAME_CHARS:
            raise ImageError(f"{parent}: longer than a VHD parent name ({PARENT_NAME_CHARS})")
        pinfo = bytes(16), 0, size
    elif parent is not None:
        pinfo = _parent_info(parent, parent_raw)
        size = size or pinfo[2]
    _check_size(size)
    if max_size is not None and max_size < size:
        raise ImageError(f"maximum size {max_size} is smaller than the size {size}")
    if fixed:
        if parent is not None:
            raise ImageError("a differencing VHD cannot be fixed")
        _write_new(path, [], _footer(TYPE_FIXED, size).pack(), size, preallocate=True)
        return
    footer = _footer(TYPE_DIFF if parent else TYPE_DYNAMIC, size)
    entries = -(-(max_size or size) // DEFAULT_BLOCK_SIZE)
    bat_bytes = pad_sector(entries * 4)
    batmap_hdr_off = TABLE_OFFSET + bat_bytes
    map_sectors = pad_sector(-(-entries // 8)) // SECTOR
    map_off = batmap_hdr_off + SECTOR
    pos = map_off + map_sectors * SECTOR
    header = Header(table_offset=TABLE_OFFSET, max_table_entries=entries)
    pieces: list[tuple[int, bytes]] = []
    if parent is not None and pinfo is not None:
        header.parent_uuid, header.parent_timestamp = pinfo[0], pinfo[1]
        encoded = _parent_locators(path, parent, in_cluster)
        header.parent_name = parent if in_cluster else os.path.basename(parent)
        for slot, (code, data) in enumerate(encoded):
            space = pad_sector(len(data))
            header.locators[slot] = Locator(code, space, len(data), pos)
            pieces.append((pos, data.ljust(space, b"\x00")))
            pos += space
    bmap = bytes(map_sectors * SECTOR)
    bmh = BatmapHeader(offset=map_off, size_sectors=map_sectors, version=BATMAP_VERSION)
    bmh.checksum = batmap_checksum(bmap, size, BATMAP_VERSION)
    fbytes = footer.pack()
    pieces[:0] = [
        (0, fbytes),
        (FOOTER_SIZE, header.pack()),
        (TABLE_OFFSET, b"\xff" * bat_bytes),
        (batmap_hdr_off, bmh.pack() + bmap),
    ]
    _write_new(path, pieces, fbytes, pos)


def _parent_locators(child: str, parent: str, in_cluster: bool) -> list[tuple[int, bytes]]:
    """(platform code, data) of each parent locator: a cluster image's spec in MacX alone
    (no other platform names it), a file's path relative to the child in all three."""
    if in_cluster:
        return [(PLAT_MACX, parent.encode())]
    rel = relative_locator_path(child, parent)
    return [
        (PLAT_MACX, f"file://{rel}".encode()),
        (PLAT_W2KU, rel.replace("/", "\\").encode("utf-16-le")),
        (PLAT_W2RU, rel.replace("/", "\\").encode("utf-16-le")),
    ]


def _parent_info(parent: str, raw: bool) -> tuple[bytes, int, int]:
    """(UUID, timestamp, virtual size) a child records for its parent."""
    if not os.path.exists(parent):
        raise FileNotFoundError(2, "no such parent", parent)
    mtime = max(0, int(os.stat(parent).st_mtime) - VHD_EPOCH)
    if raw:
        fd = open_disk(parent, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        return bytes(16), mtime, size - size % SECTOR
    fd = open_disk(parent, os.O_RDONLY)
    try:
        meta = load(fd, os.path.abspath(parent))
    finally:
        os.close(fd)
    return meta.footer.uuid, mtime, meta.footer.current_size


def _write_new(
    path: str, pieces: list[tuple[int, bytes]], footer: bytes, end: int, preallocate: bool = False
) -> None:
    """Write ``pieces`` into a new file whose data ends at ``end``, then the footer.

    A regular file must not exist yet; an existing block device is written in place,
    its footer at its end.
    """
    if os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
        fd = open_disk(path, os.O_WRONLY)
        regular = False
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        regular = True
    try:
        if regular:
            if preallocate:
                os.posix_fallocate(fd, 0, end + FOOTER_SIZE)
            else:
                os.ftruncate(fd, end + FOOTER_SIZE)
            footer_at = end
        else:
            footer_at = os.lseek(fd, 0, os.SEEK_END) - FOOTER_SIZE
            if footer_at < end:
                raise OSError(errno.ENOSPC, f"{path}: the device is smaller than the VHD")
        for off, data in pieces:
            write_at(fd, data, off)
        write_at(fd, footer, footer_at)
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        if regular:
            os.unlink(path)
        raise
    os.close(fd)


def snapshot_vhd(
    child: str, parent: str, *, parent_raw: bool = False, max_size: int | None = None
) -> None:
    """Create ``child`` as a differencing VHD over ``parent`` (``vhd-util snapshot``)."""
    create_vhd(child, 0, parent=parent, parent_raw=parent_raw, max_size=max_size)
