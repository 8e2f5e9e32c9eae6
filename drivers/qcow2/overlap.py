"""Overlap checking: which host clusters hold metadata, so that no guest data lies in one.

Like qemu's metadata overlap check, but kept as one map from host cluster index
to what the cluster holds (header, L1, L2 and snapshot tables, refcount table
and blocks), updated as tables are allocated, moved and freed, so the check on
the hot paths is one dict lookup.  Writes never go to such a cluster, reads never
take guest data from one.  The map is filled at open; the tables
in it must not overlap each other, except L2 tables, which an image and its
internal snapshots share.

A read-write open also checks that the refcounts agree with that metadata
(``check_refcounts``): a table counted free would be handed out for guest data.
That is what a mutated ``refcount_order`` or a damaged refcount block looks
like.  Any inconsistency found while the image is in use raises
``Qcow2Corruption``; the image's entry points turn it into EIO and, on a
read-write image, set the header's incompatible "corrupt" bit (as qemu does),
so the image opens read-only until it is repaired.
"""

from __future__ import annotations

from array import array
from typing import Protocol

from ..base import ImageFormatError
from .format import L1E_OFFSET_MASK, OFLAG_COPIED

HEADER = "header"
ACTIVE_L1 = "active L1 table"
L2_TABLE = "L2 table"
REFCOUNT_TABLE = "refcount table"
REFCOUNT_BLOCK = "refcount block"
SNAPSHOT_TABLE = "snapshot table"
SNAPSHOT_L1 = "snapshot L1 table"
SNAPSHOT_L2 = "snapshot L2 table"
#: Kinds that a cluster may hold together with another of these (a shared L2 table).
SHARED = frozenset((L2_TABLE, SNAPSHOT_L2))

#: Host cluster index -> what it holds.
MetadataMap = dict[int, str]


class Qcow2Corruption(ImageFormatError):
    """Metadata found inconsistent while the image is in use: the request fails with EIO."""


class RefcountLookup(Protocol):
    def get(self, cluster: int) -> int: ...


def claim(meta: MetadataMap, offset: int, length: int, kind: str, where: str, bits: int) -> None:
    """Record the clusters of a table at ``offset``, refusing overlap with any recorded one.

    ``where`` names the file and the field the offset comes from.
    """
    first = offset >> bits
    last = (offset + max(length, 1) - 1) >> bits
    for cluster in range(first, last + 1):
        have = meta.get(cluster)
        if have is not None:
            raise ImageFormatError(
                f"{where} {offset:#x} ({kind}) overlaps the {have} at cluster {cluster}"
            )
        meta[cluster] = kind


def claim_l2(meta: MetadataMap, cluster: int, kind: str, path: str, named_by: str) -> None:
    """Record an L2 table; it may be shared with another L2 table, nothing else."""
    have = meta.get(cluster)
    if have is not None and have not in SHARED:
        raise ImageFormatError(
            f"{path}: {named_by} points its L2 table at cluster {cluster}, which holds the {have}"
        )
    if have != L2_TABLE:
        meta[cluster] = kind


def check_refcounts(
    meta: MetadataMap, refcounts: RefcountLookup, l1: array, bits: int, path: str
) -> None:
    """Every metadata cluster is counted, and an L2 table flagged COPIED is counted once.

    Raises Qcow2Corruption naming the first cluster that disagrees.
    """
    for cluster, kind in meta.items():
        if refcounts.get(cluster) == 0:
            raise Qcow2Corruption(
                f"{path}: the {kind} at cluster {cluster} has refcount 0 (the refcounts are "
                "damaged: allocating from them would overwrite metadata)"
            )
    for i, entry in enumerate(l1):
        off = entry & L1E_OFFSET_MASK
        if off and entry & OFLAG_COPIED:
            count = refcounts.get(off >> bits)
            if count != 1:
                raise Qcow2Corruption(
                    f"{path}: L1 entry {i} marks its L2 table as not shared, but the table's "
                    f"refcount is {count} (the refcounts are damaged)"
                )
