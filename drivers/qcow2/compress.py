"""Decompression of QCOW2 compressed clusters: raw deflate (qemu's "zlib") and zstd.

Compressed data is only known to 512-byte precision, so both decoders stop
after one cluster of output and ignore the slop that follows.  Deflate is
shared with QCOW v1 (``drivers/deflate.py``); zstd support comes from the
``zstandard`` package, and an image that needs it without the package
installed fails with an error saying so.
"""

from __future__ import annotations

from ..base import ImageFormatError
from ..deflate import inflate_cluster
from .format import COMPRESSION_DEFLATE, COMPRESSION_ZSTD


def unzstd_cluster(data: bytes, cluster_size: int, where: str) -> bytes:
    """Decode one zstd-compressed cluster, ignoring bytes after the frame."""
    try:
        import zstandard
    except ImportError as exc:
        raise ImageFormatError(
            f"{where}: image uses zstd compression; install the 'zstandard' package"
        ) from exc
    try:
        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as exc:
        raise ImageFormatError(f"{where}: compressed cluster is not valid zstd: {exc}") from exc
    if len(out) < cluster_size:
        raise ImageFormatError(f"{where}: compressed cluster decodes to {len(out)} bytes")
    return out[:cluster_size]


def decompress_cluster(kind: int, data: bytes, cluster_size: int, where: str) -> bytes:
    """Decompress with the image's compression type."""
    if kind == COMPRESSION_DEFLATE:
        return inflate_cluster(data, cluster_size, where)
    if kind == COMPRESSION_ZSTD:
        return unzstd_cluster(data, cluster_size, where)
    raise ImageFormatError(f"{where}: unknown compression_type {kind}")
