"""Opening a VHD's metadata and following its parents, as ``vhd-util`` does.

Like blktap's tool, vhd-util follows parents wherever they are (``ANYWHERE``); only
the driver that serves images confines them to allowed directories.  Either way a
parent is opened only if it is a regular file or block device (``open_disk``).
"""

from __future__ import annotations

import os

from tapdisk.drivers.backing import extend_chain, file_identity
from tapdisk.drivers.paths import open_disk
from tapdisk.drivers.vhd.chain import cluster_parent, find_parent, locator_paths
from tapdisk.drivers.vhd.meta import Metadata, load

ANYWHERE = ("/",)


def open_meta(path: str) -> Metadata:
    """The metadata (footer, header, BAT...) of the VHD at ``path``."""
    fd = open_disk(path, os.O_RDONLY)
    try:
        return load(fd, os.path.abspath(path))
    finally:
        os.close(fd)


def parent_of(path: str, meta: Metadata, resolve: bool = True) -> str:
    """The parent's path, found on disk, or the spec of a parent in a cluster; with
    ``resolve`` False, the first locator's text."""
    fd = open_disk(path, os.O_RDONLY)
    try:
        if not resolve:
            return locator_paths(fd, meta)[0][1]
        in_cluster = cluster_parent(fd, meta)
        if in_cluster is not None:
            return in_cluster
        return find_parent(os.path.abspath(path), fd, meta, ANYWHERE)
    finally:
        os.close(fd)


def chain_depth(path: str) -> int:
    """Images in the chain from ``path`` down to its base, ``path`` and a raw base included."""
    current = os.path.abspath(path)
    chain = (file_identity(current),)
    while True:
        meta = open_meta(current)
        if not meta.is_diff or meta.header is None:
            return len(chain)
        if meta.header.parent_uuid == bytes(16):
            return len(chain) + 1
        backing = parent_of(current, meta)
        chain = extend_chain(chain, current, backing, "parent locator")
        current = backing
