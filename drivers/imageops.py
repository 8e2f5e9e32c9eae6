"""Format-neutral image operations: create, convert (copy), commit, map, probe.

These work on any ``Image`` through the common interface, so one
implementation serves every pair of formats.  Copies follow the source's
extents, so holes and zero ranges stay unallocated in the target.  What only
some formats can do (create with options, commit, map host offsets) each
driver registers in the registry, which these functions ask.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from .backing import is_remote_backing, probe_format
from .base import ExtentFlags, Image, ImageError
from .commit import COPY_CHUNK
from .l2tables import BACKING, COMPRESSED, DATA
from .registry import (
    DRIVERS,
    FORMAT_ALIASES,
    FORMATS,
    NewBacking,
    OpenOptions,
    Progress,
    block_status_for,
    committer_for,
    creator_for,
    driver_of,
    open_image,
    parse_spec,
)


def detect_format(path: str) -> str:
    """The format of an existing image file, from its magic numbers."""
    return probe_format(path)


def normalise_format(fmt: str) -> str:
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ImageError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    return fmt


def create_image(
    fmt: str,
    path: str,
    size: int | None,
    *,
    backing: str | None = None,
    backing_fmt: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Create an empty image of ``fmt``; with ``backing`` its size defaults to the backing's."""
    fmt = normalise_format(fmt)
    opts = dict(options or {})
    below = None
    if backing is not None and is_remote_backing(backing):
        # qemu's way: the overlay records the cluster image's spec, with format raw.
        if size is None:
            size = _image_size(backing)
        below = NewBacking(backing, backing, "raw")
    elif backing is not None:
        backing_path = os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        backing_fmt = normalise_format(backing_fmt or detect_format(backing_path))
        if size is None:
            size = _image_size(f"{backing_fmt}:{backing_path}")
        below = NewBacking(backing, backing_path, backing_fmt)
    if size is None:
        raise ImageError("a size is needed when there is no backing file")
    creator_for(fmt)(path, size, below, opts)
    if opts:
        raise ImageError(f"unknown options for {fmt}: {', '.join(sorted(opts))}")


def _image_size(spec: str) -> int:
    async def go() -> int:
        img = open_image(spec, OpenOptions(read_only=True))
        try:
            return img.size
        finally:
            await img.close()

    return asyncio.run(go())


async def copy_image(src: Image, dst: Image, progress: Progress | None = None) -> int:
    """Copy what ``src`` shows into ``dst`` (fresh, reading zeros); returns bytes written.

    Ranges the source reports as holes or zeros, and chunks that turn out to be
    all zeros, are skipped, so the target stays sparse.
    """
    size = min(src.size, dst.size)
    buf = bytearray(COPY_CHUNK)
    zeros = bytes(COPY_CHUNK)
    written = 0
    pos = 0
    while pos < size:
        for ext in await src.extents(pos, size - pos):
            run = min(ext.length, size - pos)
            if not ext.flags & ExtentFlags.ZERO:
                end = pos + run
                chunk_start = pos
                while chunk_start < end:
                    chunk = min(COPY_CHUNK, end - chunk_start)
                    view = memoryview(buf)[:chunk]
                    await src.read(chunk_start, view)
                    if view != zeros[:chunk]:
                        await dst.write(chunk_start, view)
                        written += chunk
                    chunk_start += chunk
                    if progress:
                        progress(chunk_start, size)
            pos += run
            if progress:
                progress(pos, size)
            if pos >= size:
                break
    await dst.flush()
    return written


def convert(
    src_spec: str,
    dst_path: str,
    dst_fmt: str,
    *,
    progress: Progress | None = None,
    options: dict[str, str] | None = None,
    allowed_dirs: tuple[str, ...] = (),
) -> int:
    """Convert an image (any spec) into a new image file of ``dst_fmt``."""

    async def go() -> int:
        src = open_image(src_spec, OpenOptions(read_only=True, allowed_dirs=allowed_dirs))
        try:
            fmt = normalise_format(dst_fmt)
            unit = DRIVERS[fmt].size_unit
            size = -(-src.size // unit) * unit
            create_image(fmt, dst_path, size, options=options)
            dst = open_image(f"{fmt}:{dst_path}", OpenOptions())
            try:
                return await copy_image(src, dst, progress)
            finally:
                await dst.close()
        finally:
            await src.close()

    return asyncio.run(go())


@dataclass(frozen=True)
class MapEntry:
    """One run of ``tap-img map`` output, in qemu-img's vocabulary."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None


def map_image(image: Image) -> list[MapEntry]:
    """Where each guest range comes from through the backing chain (blocking, for tools)."""
    out: list[MapEntry] = []
    _map_into(image, 0, image.size, 0, out)
    merged: list[MapEntry] = []
    for entry in out:
        last = merged[-1] if merged else None
        if (
            last
            and (last.depth, last.present, last.zero, last.data)
            == (entry.depth, entry.present, entry.zero, entry.data)
            and (
                (last.offset is None and entry.offset is None)
                or (
                    last.offset is not None
                    and entry.offset is not None
                    and last.offset + last.length == entry.offset
                )
            )
        ):
            merged[-1] = MapEntry(
                last.start,
                last.length + entry.length,
                entry.depth,
                entry.present,
                entry.zero,
                entry.data,
                last.offset,
            )
        else:
            merged.append(entry)
    return merged


def _map_into(image: Image, start: int, end: int, depth: int, out: list[MapEntry]) -> None:
    status = block_status_for(image)
    driver = driver_of(image)
    flat = driver is not None and driver.flat
    pos = start
    while pos < end:
        if status is not None:
            kind, val, run = status(image, pos, end - pos)
            if kind == BACKING:
                backing = image.backing
                if backing is not None and pos < backing.size:
                    run = min(run, backing.size - pos)
                    _map_into(backing, pos, pos + run, depth + 1, out)
                else:
                    out.append(MapEntry(pos, run, depth, False, True, False))
            elif kind == DATA:
                out.append(MapEntry(pos, run, depth, True, False, True, val))
            elif kind == COMPRESSED:
                out.append(MapEntry(pos, run, depth, True, False, True))
            else:
                out.append(MapEntry(pos, run, depth, True, True, False))
            pos += run
            continue
        exts = asyncio.run(image.extents(pos, end - pos))
        for ext in exts:
            run = min(ext.length, end - pos)
            hole = bool(ext.flags & ExtentFlags.HOLE)
            zero = bool(ext.flags & ExtentFlags.ZERO)
            present = not hole or flat
            offset = pos if flat and not zero else None
            out.append(MapEntry(pos, run, depth, present, zero, not zero, offset))
            pos += run
            if pos >= end:
                break


def commit(
    spec: str, *, progress: Progress | None = None, allowed_dirs: tuple[str, ...] = ()
) -> str:
    """Merge a leaf's own data into its backing file; returns the backing file's spec."""
    kind, _ = parse_spec(spec)
    committer = committer_for(kind)
    if committer is None:
        raise ImageError(f"{spec} has no backing file to commit into")
    return committer(spec, progress, allowed_dirs)
