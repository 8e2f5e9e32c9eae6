"""Opening backing files safely (shared by the qcow2 and qcow drivers).

A backing file named inside an image is untrusted input: it is resolved
relative to the image's directory, must lie inside the allowed directories,
is opened read-only through the driver registry with the format the image
names (probed from magic numbers when it names none), and a chain that leads
back to an image already being opened is refused.
"""

from __future__ import annotations

import contextvars
import os

from .base import Image, ImageError, ImageFormatError
from .paths import is_inside
from .registry import DRIVERS, OpenOptions, open_image

#: Longest chain accepted; deeper ones are almost certainly hostile.
MAX_CHAIN_DEPTH = 64

#: qemu format names -> our spec types.
FORMAT_ALIASES = {"vpc": "vhd", "file": "raw", "host_device": "raw"}

_opening: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "tapdisk_backing_chain", default=()
)


def resolve_backing(child: str, name: str, options: OpenOptions) -> str:
    """Absolute path of a backing file, refused if outside the allowed directories."""
    if "\0" in name or not name:
        raise ImageFormatError(f"{child}: backing_file name {name!r} is not a path")
    if name.startswith(("json:", "nbd:", "http:", "https:")) or "://" in name:
        raise ImageFormatError(f"{child}: backing_file {name!r} is not a local file name")
    base = os.path.dirname(child)
    path = os.path.realpath(os.path.join(base, name))
    allowed = options.allowed_dirs or (base,)
    if is_inside(path, allowed):
        return path
    raise ImageFormatError(
        f"{child}: backing_file {name!r} resolves to {path}, outside the allowed directories "
        f"({', '.join(allowed)})"
    )


def probe_format(path: str) -> str:
    """Guess a backing file's format from its magic numbers (raw if none matches)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"QFI\xfb":
            return "qcow" if int.from_bytes(head[4:8], "big") == 1 else "qcow2"
        if head == b"conectix":
            return "vhd"
        f.seek(0, os.SEEK_END)
        if f.tell() >= 512:
            f.seek(-512, os.SEEK_END)
            if f.read(8) == b"conectix":
                return "vhd"
    return "raw"


def open_backing(child: str, name: str, fmt: str | None, options: OpenOptions) -> Image:
    """Open the backing file ``name`` of image ``child`` read-only."""
    path = resolve_backing(child, name, options)
    chain = _opening.get() or (os.path.realpath(child),)
    if path in chain:
        raise ImageFormatError(f"{child}: backing_file {name!r} loops back to {path}")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise ImageFormatError(f"{child}: backing chain deeper than {MAX_CHAIN_DEPTH}")
    if not os.path.exists(path):
        raise ImageError(f"{child}: backing file {path} does not exist")
    kind = FORMAT_ALIASES.get(fmt, fmt) if fmt else probe_format(path)
    if kind not in DRIVERS:
        raise ImageFormatError(f"{child}: backing file format {fmt!r} is not supported")
    token = _opening.set((*chain, path))
    try:
        return open_image(
            f"{kind}:{path}",
            OpenOptions(read_only=True, allowed_dirs=options.allowed_dirs),
        )
    finally:
        _opening.reset(token)
