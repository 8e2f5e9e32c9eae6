"""Committing an image's own clusters into its backing file (QCOW v1 and QCOW2).

The format says range by range what the image itself holds (a
``BlockStatus``): ranges that read as zeros are zeroed below, data is copied,
and ranges left to the backing file are skipped.  The backing file is opened
read-write through its own driver, so it allocates with its own crash
ordering, and is flushed before returning; the image itself is left untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .base import Image, ImageError
from .l2tables import BACKING, ZERO
from .registry import BlockStatus, OpenOptions, Progress, open_image

#: Largest piece copied at once, in bytes.
COPY_CHUNK = 2 << 20
#: Largest range zeroed at once, and asked about at once: a sparse image of terabytes is
#: walked in a few thousand steps, not a million.
ZERO_CHUNK = 256 << 20
SCAN_CHUNK = 1 << 30
#: ``own(offset, length)``: (kind, run) of what an image itself holds from ``offset``
#: (``l2tables``' kinds: DATA, ZERO, BACKING, or compressed data).
OwnStatus = Callable[[int, int], Awaitable[tuple[int, int]]]


def commit_clusters(
    spec: str, status: BlockStatus, progress: Progress | None, allowed_dirs: tuple[str, ...]
) -> str:
    """Merge image ``spec``'s own data into its backing file; returns the backing file's spec."""
    return asyncio.run(_commit(spec, status, progress, allowed_dirs))


async def _commit(
    spec: str, status: BlockStatus, progress: Progress | None, allowed_dirs: tuple[str, ...]
) -> str:
    top = open_image(spec, OpenOptions(read_only=True, allowed_dirs=allowed_dirs))
    try:
        if top.backing is None:
            raise ImageError(f"{spec} has no backing file to commit into")
        base_spec = top.backing.spec
        base = open_image(base_spec, OpenOptions(allowed_dirs=allowed_dirs))
        try:
            if base.read_only:  # an RBD snapshot, say: no write could land
                raise ImageError(f"cannot commit into {base_spec}: it is read-only")

            async def own(offset: int, length: int) -> tuple[int, int]:
                kind, _, run = status(top, offset, length)
                return kind, run

            await copy_own_clusters(top, base, own, progress)
        finally:
            await base.close()
        return base_spec
    finally:
        await top.close()


async def copy_own_clusters(
    top: Image, base: Image, own: OwnStatus, progress: Progress | None = None
) -> None:
    """Copy what ``top`` holds itself (``own``) into ``base``, which is then flushed: data
    is copied, zeroed ranges zeroed, ranges left to the backing file skipped.  Used by
    ``commit_clusters`` and by a running device's online commit (tapdisk/commitjob.py)."""
    size = min(top.size, base.size)
    buf = bytearray(COPY_CHUNK)
    pos = 0
    while pos < size:
        kind, run = await own(pos, min(size - pos, SCAN_CHUNK))
        end = pos + run
        while pos < end:  # the run in pieces, with no second look at its mapping
            if kind == BACKING:
                piece = end - pos  # left to the backing file: nothing to do
            elif kind == ZERO:
                piece = min(end - pos, ZERO_CHUNK)
                await base.write_zeroes(pos, piece)
            else:
                piece = min(end - pos, COPY_CHUNK)
                view = memoryview(buf)[:piece]
                await top.read(pos, view)
                await base.write(pos, view)
            pos += piece
            if progress:
                progress(pos, size)
            # Reads and writes that the page cache takes inline never give the event loop
            # back: without this a running device's requests would wait for the whole run.
            await asyncio.sleep(0)
    await base.flush()
