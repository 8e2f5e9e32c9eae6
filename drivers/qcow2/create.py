"""Creating empty QCOW2 images (optionally over a backing file), laid out like qemu-img's.

Cluster 0 holds the header, its extensions and the backing file name;
cluster 1 the refcount table; cluster 2 the first refcount block; the L1
table follows.  Everything is written to a temporary name and renamed into
place, so a failed create leaves nothing behind.
"""

from __future__ import annotations

import os
from array import array

from ..base import ImageError
from ..registry import NewBacking
from ..sizes import parse_size
from .format import (
    COMPRESSION_FIELD,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    V2_HEADER,
    V3_HEADER_LEN,
    Header,
    pack_header_cluster,
)
from .refcount import encode_block


def create_from_options(
    path: str, size: int, backing: NewBacking | None, options: dict[str, str]
) -> None:
    """Creator registered for ``qcow2:``; takes qemu-img's ``compat``, ``cluster_size`` and
    ``refcount_bits`` out of ``options``."""
    compat = options.pop("compat", "1.1")
    create_qcow2(
        path,
        size,
        cluster_size=parse_size(options.pop("cluster_size", "65536")),
        version=2 if compat in ("0.10", "v2") else 3,
        refcount_bits=int(options.pop("refcount_bits", "16")),
        backing_file=None if backing is None else backing.name,
        backing_format=None if backing is None else backing.format,
    )


def create_qcow2(
    path: str,
    size: int,
    *,
    cluster_size: int = 65536,
    version: int = 3,
    refcount_bits: int = 16,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> None:
    """Write a new, empty qcow2 image at ``path`` (which must not exist)."""
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not (
        MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
    ):
        raise ImageError(f"cluster_size {cluster_size} must be a power of two, 512 B .. 2 MiB")
    if version not in (2, 3):
        raise ImageError(f"version {version} is not 2 or 3")
    order = refcount_bits.bit_length() - 1
    if refcount_bits != 1 << order or order > 6 or (version == 2 and order != 4):
        raise ImageError(f"refcount_bits {refcount_bits} is not possible here")
    if size < 0 or size % 512:
        raise ImageError(f"size {size} must be a multiple of 512")
    if os.path.exists(path):
        raise ImageError(f"{path} already exists")
    l2_span = (cluster_size // 8) * cluster_size
    l1_size = max(1, -(-size // l2_span))
    l1_clusters = -(-l1_size * 8 // cluster_size)
    header = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=3 * cluster_size,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=V3_HEADER_LEN + COMPRESSION_FIELD.size if version == 3 else V2_HEADER.size,
    )
    cluster0 = pack_header_cluster(header, [], backing_file, backing_format, path)
    used = 3 + l1_clusters
    block_entries = cluster_size * 8 // refcount_bits
    if used > block_entries:
        raise ImageError(f"size {size} needs a larger cluster_size")
    refs = array("Q", [1] * used + [0] * (block_entries - used))
    table = (2 * cluster_size).to_bytes(8, "big")
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, cluster0, 0)
        os.pwrite(fd, table, cluster_size)
        os.pwrite(fd, encode_block(refs, order), 2 * cluster_size)
        os.ftruncate(fd, used * cluster_size)
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
