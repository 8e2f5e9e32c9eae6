"""Raw deflate of compressed clusters, as QCOW v1 stores them and QCOW2 by default.

Compressed data is only known to 512-byte precision, so decoding stops after
one cluster of output and ignores the slop that follows.
"""

from __future__ import annotations

import zlib

from .base import ImageFormatError


def inflate_cluster(data: bytes, cluster_size: int, where: str) -> bytes:
    """Inflate one raw-deflate compressed cluster (any window up to 32 KiB)."""
    try:
        out = zlib.decompressobj(-15).decompress(data, cluster_size)
    except zlib.error as exc:
        raise ImageFormatError(f"{where}: compressed cluster is not valid deflate: {exc}") from exc
    if len(out) != cluster_size:
        raise ImageFormatError(f"{where}: compressed cluster inflates to {len(out)} bytes")
    return out
