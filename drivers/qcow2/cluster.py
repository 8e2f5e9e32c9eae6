"""QCOW2 L2 entries: what a standard or extended entry says about a guest range.

The kinds of range, the table codec and the L2 cache are shared with QCOW v1
and live in ``drivers/l2tables.py``.  Reads and writes decode an entry through
the same functions here, so an entry a read refuses is never written through
(nor freed) either: a malformed entry raises ``Qcow2Corruption``.
"""

from __future__ import annotations

from ..l2tables import BACKING, COMPRESSED, DATA, ZERO
from .format import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from .overlap import Qcow2Corruption

STD_RESERVED = 0x3F000000000001FE
EXT_RESERVED = 0x3F000000000001FF


def classify(
    entry: int, within: int, length: int, cluster_size: int, v3: bool, where: str
) -> tuple[int, int, int]:
    """Decode a standard L2 entry for ``length`` bytes at ``within`` in its cluster.

    Returns (kind, host offset or raw entry, length).
    """
    if entry & OFLAG_COMPRESSED:
        if entry & OFLAG_COPIED:
            raise Qcow2Corruption(f"{where}: compressed L2 entry has the COPIED flag")
        return COMPRESSED, entry, length
    if entry & STD_RESERVED:
        raise Qcow2Corruption(f"{where}: L2 entry {entry:#x} has reserved bits set")
    off = entry & L2E_OFFSET_MASK
    if off & (cluster_size - 1):
        raise Qcow2Corruption(f"{where}: L2 entry {entry:#x} is not cluster aligned")
    if entry & OFLAG_ZERO:
        if not v3:
            raise Qcow2Corruption(f"{where}: L2 entry has the zero flag in a version 2 image")
        return ZERO, 0, length
    if not off:
        return BACKING, 0, length
    return DATA, off + within, length


def classify_ext(
    entry: int, bitmap: int, within: int, length: int, cluster_size: int, where: str
) -> tuple[int, int, int]:
    """Decode an extended L2 entry: the run of like subclusters from ``within``."""
    if entry & OFLAG_COMPRESSED:
        if entry & OFLAG_COPIED:
            raise Qcow2Corruption(f"{where}: compressed L2 entry has the COPIED flag")
        return COMPRESSED, entry, length
    if entry & EXT_RESERVED:
        raise Qcow2Corruption(f"{where}: extended L2 entry {entry:#x} has reserved bits set")
    alloc = bitmap & 0xFFFFFFFF
    zero = bitmap >> 32
    if alloc & zero:
        raise Qcow2Corruption(f"{where}: subcluster bitmap {bitmap:#x} is both zero and allocated")
    off = entry & L2E_OFFSET_MASK
    if off & (cluster_size - 1):
        raise Qcow2Corruption(f"{where}: L2 entry {entry:#x} is not cluster aligned")
    if alloc and not off:
        raise Qcow2Corruption(f"{where}: subclusters allocated in an unallocated cluster")
    sc_size = cluster_size >> 5
    sub = within // sc_size

    def state(i: int) -> int:
        if (alloc >> i) & 1:
            return DATA
        if (zero >> i) & 1:
            return ZERO
        return BACKING

    kind = state(sub)
    end_sub = sub + 1
    while end_sub < 32 and end_sub * sc_size < within + length and state(end_sub) == kind:
        end_sub += 1
    run = min(length, end_sub * sc_size - within)
    return kind, (off + within if kind == DATA else 0), run
