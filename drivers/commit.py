"""Committing an image's own clusters into its backing file (QCOW v1 and QCOW2).

The format says range by range what the image itself holds (a
``BlockStatus``): ranges that read as zeros are zeroed below, data is copied,
and ranges left to the backing file are skipped.  The backing file is opened
read-write through its own driver, so it allocates with its own crash
ordering, and is flushed before returning; the image itself is left untouched.
"""

from __future__ import annotations

import asyncio

from .base import ImageError
from .l2tables import BACKING, ZERO
from .registry import BlockStatus, OpenOptions, Progress, open_image

#: Largest piece copied at once, in bytes.
COPY_CHUNK = 2 << 20


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
            size = min(top.size, base.size)
            buf = bytearray(COPY_CHUNK)
            pos = 0
            while pos < size:
                kind, _, run = status(top, pos, min(size - pos, COPY_CHUNK))
                if kind == ZERO:
                    await base.write_zeroes(pos, run)
                elif kind != BACKING:
                    view = memoryview(buf)[:run]
                    await top.read(pos, view)
                    await base.write(pos, view)
                pos += run
                if progress:
                    progress(pos, size)
            await base.flush()
        finally:
            await base.close()
        return base_spec
    finally:
        await top.close()
