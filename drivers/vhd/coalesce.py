"""Coalesce: copy every sector a differencing VHD holds into its parent.

The child is read directly (its own sectors only, from its bitmaps); the
parent is opened read-write through its driver, so a VHD parent allocates with
the same crash ordering as any write and a raw parent (a file, or an image in a
cluster) is written in place; a parent that opens read-only (an RBD snapshot) is
refused before anything is copied.  The parent is flushed before returning; the
child is left untouched.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from ..base import Image, ImageError
from ..registry import OpenOptions, open_image
from . import bitmap as bits
from .format import BAT_UNUSED, SECTOR
from .image import VhdImage

#: ``progress(done_blocks, total_blocks)`` is called after each allocated block.
Progress = Callable[[int, int], None]


def commit(spec: str, progress: Progress | None, allowed_dirs: tuple[str, ...]) -> str:
    """``Committer`` registered for ``vhd:``: coalesce into the parent (progress in blocks)."""
    backing_spec, _ = coalesce(spec.partition(":")[2], progress=progress, allowed_dirs=allowed_dirs)
    return backing_spec


def coalesce(
    child_path: str, *, progress: Progress | None = None, allowed_dirs: tuple[str, ...] = ()
) -> tuple[str, int]:
    """Copy ``child_path``'s data into its parent; returns (parent's spec, sectors copied)."""
    return asyncio.run(_coalesce(child_path, progress, allowed_dirs))


async def _coalesce(
    child_path: str, progress: Progress | None, allowed_dirs: tuple[str, ...]
) -> tuple[str, int]:
    child = VhdImage(child_path, read_only=True, allowed_dirs=allowed_dirs)
    try:
        if child.backing is None or child.store is None:
            raise ImageError(f"{child_path} is not a differencing VHD: nothing to coalesce into")
        below = child.backing
        roots = allowed_dirs or (os.path.dirname(child.path),)
        backing = open_image(below.spec, OpenOptions(allowed_dirs=roots))
        try:
            if backing.read_only:
                raise ImageError(f"cannot coalesce into {below.spec}: it is read-only")
            sectors = await _copy_sectors(child, backing, progress)
            await backing.flush()
        finally:
            await backing.close()
        return below.spec, sectors
    finally:
        await child.close()


async def _copy_sectors(child: VhdImage, backing: Image, progress: Progress | None) -> int:
    store = child.store
    assert store is not None
    used = [b for b in range(store.blocks) if store.bat[b] != BAT_UNUSED]
    buf = memoryview(bytearray(store.block_size))
    copied = 0
    for done, b in enumerate(used, 1):
        bm = await store.bitmap(b)
        base = store.data_base(b)
        block_start = b << store.shift
        for first, stop, present in bits.runs(bm, 0, store.sectors_per_block):
            if not present:
                continue
            lo, hi = first * SECTOR, stop * SECTOR
            hi = min(hi, max(0, backing.size - block_start))
            if hi <= lo:
                continue
            part = buf[: hi - lo]
            await child.file.read(base + lo, part)
            await backing.write(block_start + lo, part)
            copied += (hi - lo) // SECTOR
        if progress is not None:
            progress(done, len(used))
    return copied
