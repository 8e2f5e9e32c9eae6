"""Pointing a QCOW2 image at another backing file, its data untouched (``qemu-img rebase -u``).

An online commit drops an image from the middle of a chain: once its data is in its
backing file, the image above it must name that backing file instead.  The header
cluster is rebuilt as qemu rebuilds it: the header fields, every extension as it was
on disk (unknown ones too, such as a storage manager's own flags) except the backing
format, which is replaced, the end marker, then the backing file's name.  It is
written in one ``pwrite`` and synced.  The image may be open (read-only or not): its
in-memory header learns the new name too, so no later header write can undo it.
"""

from __future__ import annotations

import os

from ..base import ImageError
from ..fileio import pread_full, pwrite_full
from .format import Header, pack_header_cluster, walk_extensions
from .image import Qcow2Image


def rewrite_backing(image: Qcow2Image, name: str, backing_format: str | None) -> None:
    """Make ``image`` name ``name`` (of ``backing_format``, if given) as its backing file
    on disk and in memory.  Raises ImageError when the new header does not fit in the
    header cluster."""
    if not name:
        raise ImageError(f"{image.path}: an empty backing file name")
    fd = os.open(image.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        header_cluster = bytearray(image.cluster_size)
        pread_full(fd, memoryview(header_cluster), 0)
        header = Header.unpack(bytes(header_cluster))
        entries, _ = walk_extensions(bytes(header_cluster), header, image.path)
        old_end = header.backing_file_offset + header.backing_file_size
        cluster = pack_header_cluster(header, entries, name, backing_format, image.path)
        cluster += bytes(max(0, old_end - len(cluster)))  # no trace of a longer old name
        pwrite_full(fd, memoryview(cluster), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    image.header.backing_file_offset = header.backing_file_offset
    image.header.backing_file_size = header.backing_file_size
    image.ext.backing_format = backing_format
    image.backing_name = name
