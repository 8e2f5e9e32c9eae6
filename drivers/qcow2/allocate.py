"""The qcow2 write path's metadata side: cluster allocation, L2 updates, crash-safe flush.

Like qemu's qcow2-cluster.c: a write into a cluster this image owns alone
(COPIED) goes in place; anything else gets new host clusters from the
refcounts, filled with the old contents around the written bytes, and an L2
entry pointing at them (the L2 table itself copied first when it is shared).
Discard and zeroing rewrite entries and hold back the refcount decrements of
what they drop.  ``_flush_locked`` writes it all back in qemu's crash-safe
order: refcount blocks, then the refcount table (and header when it moved),
then L2 tables, then L1 entries, each step synced before the next, and only
then the held-back decrements.  Newly allocated data is written before the
first of those syncs, so an L2 entry never reaches disk ahead of its data.
"""

from __future__ import annotations

import errno
from array import array

from ..base import Image
from .cluster import STD_RESERVED, classify, classify_ext
from .format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_HOST_OFFSET,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)
from .metadata import Qcow2Metadata
from .overlap import L2_TABLE, Qcow2Corruption

#: Subcluster bitmap of an extended L2 entry whose 32 subclusters are all allocated.
ALL_SUBCLUSTERS = 0xFFFFFFFF
#: Flags of a standard L2 entry; an entry written in place has COPIED alone among them.
_IN_PLACE_FLAGS = OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO | STD_RESERVED


class Qcow2Allocation(Qcow2Metadata, Image):
    """The allocating half of the qcow2 ``Image``; ``image.Qcow2Image`` completes it.

    Methods that change metadata run under the image's lock; ``_overwrite_at``
    and the checks it calls only read it, to find writes that can go in place.
    Every L2 entry a write, discard or zeroing replaces is first decoded as reads
    decode it and its host cluster checked against the metadata map
    (``_entry_for_write``), so a bad entry fails the request before anything
    changes: nothing is written through it, nor freed.
    """

    #: Set when the image was found corrupt: writes fail from then on.
    corrupt: bool

    def _writable(self) -> bool:
        return not self.read_only and self.refcounts is not None and not self.corrupt

    def _check_writable(self) -> None:
        if self.corrupt:
            raise OSError(
                errno.EIO, f"{self.path} is marked corrupt: writes are refused until it is repaired"
            )
        if not self._writable():
            raise OSError(errno.EPERM, f"{self.path} is open read-only")

    def _entry_for_write(self, table: array | None, idx: int, guest_cluster: int) -> int:
        """Host offset of entry ``idx`` of ``table`` when a write can go there in place, else 0.

        Raises Qcow2Corruption when the entry is malformed (``cluster.classify``, as
        for reads) or names a host cluster that holds metadata.
        """
        if table is None:
            return 0
        cluster_size = self.cluster_size
        if self.extended_l2:
            entry, bitmap = table[2 * idx], table[2 * idx + 1]
            classify_ext(entry, bitmap, 0, cluster_size, cluster_size, self.path)
            whole = bitmap == ALL_SUBCLUSTERS
        else:
            entry = table[idx]
            classify(entry, 0, cluster_size, cluster_size, self.v3, self.path)
            whole = True
        host = entry & L2E_OFFSET_MASK
        if entry & OFLAG_COMPRESSED:
            host = 0
            clusters = self._compressed_clusters(entry, guest_cluster)
        else:
            clusters = range(host >> self.cluster_bits, (host >> self.cluster_bits) + bool(host))
        for cluster in clusters:
            self._check_not_metadata(cluster << self.cluster_bits, guest_cluster)
        if whole and entry & _IN_PLACE_FLAGS == OFLAG_COPIED:
            return host
        return 0

    def _compressed_clusters(self, entry: int, guest_cluster: int) -> range:
        """The host clusters a compressed cluster's data lies in."""
        coffset, csize = self.compressed_span(entry)
        if coffset == 0 or coffset + csize > MAX_HOST_OFFSET:
            raise Qcow2Corruption(
                f"{self._where(guest_cluster)}: compressed offset {coffset:#x} invalid"
            )
        return range(coffset >> self.cluster_bits, ((coffset + csize - 1) >> self.cluster_bits) + 1)

    async def _l2_for_write(self, l1_index: int) -> tuple[int, array]:
        """The L2 table for ``l1_index``, allocated or copied (if shared) so it can be changed.

        A shared table stays in the metadata map (a snapshot still uses it) until
        its refcount drops to 0.
        """
        l1_entry = self.l1[l1_index]
        off = l1_entry & L1E_OFFSET_MASK
        if off and l1_entry & OFLAG_COPIED:
            return off, await self._load_l2(off)
        refcounts = self.refcounts
        assert refcounts is not None
        new = refcounts.alloc(1) << self.cluster_bits
        if off:
            table = array("Q", await self._load_l2(off))
            self.l2cache.forget(off)
            refcounts.free_later(off >> self.cluster_bits)
        else:
            table = array("Q", bytes(self.cluster_size))
        self.l2cache.put(new, table, dirty=True)
        self.meta[new >> self.cluster_bits] = L2_TABLE
        self.l1[l1_index] = new | OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        return new, table

    def _release(self, entry: int) -> None:
        """Drop this L2 entry's hold on host clusters, once it is gone from disk.

        The entry was checked by ``_entry_for_write``.
        """
        refcounts = self.refcounts
        assert refcounts is not None
        if entry & OFLAG_COMPRESSED:
            coffset, csize = self.compressed_span(entry)
            first = coffset >> self.cluster_bits
            last = (coffset + csize - 1) >> self.cluster_bits
            refcounts.free_later(first, last - first + 1)
            return
        off = entry & L2E_OFFSET_MASK
        if off:
            refcounts.free_later(off >> self.cluster_bits)

    def _overwrite_at(self, offset: int, length: int) -> int | None:
        """Where in the file a write of ``length`` bytes at ``offset`` goes if it needs no
        metadata change, else None.

        That is an overwrite inside one cluster this image owns alone (COPIED) whose L2
        table is cached; it cannot race with allocation, so it takes no lock.  Only a
        plain entry (no other flag, aligned) whose host cluster holds no metadata goes
        here: anything else takes the locked path, which refuses a bad entry.
        """
        within = offset & self._cluster_mask
        if within + length > self.cluster_size or self.extended_l2:
            return None
        l1_entry = self.l1[offset >> self._l1_shift]
        table = self.l2cache.tables.get(l1_entry & L1E_OFFSET_MASK)
        if table is None or not l1_entry & OFLAG_COPIED:
            return None
        entry = table[(offset >> self.cluster_bits) & self._l2_mask]
        host = entry & L2E_OFFSET_MASK
        if (
            entry & _IN_PLACE_FLAGS != OFLAG_COPIED
            or not host
            or host & self._cluster_mask
            or host >> self.cluster_bits in self.meta
        ):
            return None
        return host + within

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        cluster_bits = self.cluster_bits
        cluster_size = self.cluster_size
        l2_bits = self.l2_bits
        l2mask = (1 << l2_bits) - 1
        length = len(data)
        pos = 0
        while pos < length:
            off = offset + pos
            guest_cluster = off >> cluster_bits
            within = off & (cluster_size - 1)
            l1_index = guest_cluster >> l2_bits
            idx = guest_cluster & l2mask
            l2off = self.l1[l1_index] & L1E_OFFSET_MASK
            table = await self._load_l2(l2off) if l2off else None
            host = self._entry_for_write(table, idx, guest_cluster)
            if host:
                # Extend over following in-place clusters contiguous on the host.
                run = min(cluster_size - within, length - pos)
                i = idx + 1
                while pos + run < length and i <= l2mask:
                    next_host = self._entry_for_write(table, i, guest_cluster + i - idx)
                    if next_host != host + (i - idx) * cluster_size:
                        break
                    run += min(cluster_size, length - pos - run)
                    i += 1
                await self.file.write(host + within, data[pos : pos + run])
                pos += run
                continue
            # A run of clusters in this L2 table that all need new host clusters.
            count = 1
            covered = min(cluster_size - within, length - pos)
            while pos + covered < length and idx + count <= l2mask:
                if self._entry_for_write(table, idx + count, guest_cluster + count):
                    break
                covered += min(cluster_size, length - pos - covered)
                count += 1
            await self._allocate_and_write(guest_cluster, count, within, data[pos : pos + covered])
            pos += covered

    async def _allocate_and_write(
        self, guest_cluster: int, count: int, within: int, data: memoryview
    ) -> None:
        """Write ``data`` (from ``within`` in ``guest_cluster``) into ``count`` new clusters."""
        cluster_bits = self.cluster_bits
        cluster_size = self.cluster_size
        refcounts = self.refcounts
        assert refcounts is not None
        host = refcounts.alloc(count) << cluster_bits
        end = within + len(data)  # byte offset of the data's end relative to guest_cluster
        head_partial = within != 0 or end < cluster_size
        tail_partial = end % cluster_size != 0 and (count > 1 or not head_partial)
        if head_partial:
            buf = bytearray(cluster_size)
            await self.read(guest_cluster << cluster_bits, memoryview(buf))
            first = min(end, cluster_size)
            buf[within:first] = data[: first - within]
            await self.file.write(host, memoryview(buf))
            start_full = 1
            dpos = first - within
        else:
            start_full = 0
            dpos = 0
        full_end = count - 1 if (tail_partial and count > 1) else count
        if full_end > start_full:
            nbytes = (full_end - start_full) * cluster_size
            await self.file.write(host + start_full * cluster_size, data[dpos : dpos + nbytes])
            dpos += nbytes
        if tail_partial and count > 1:
            buf = bytearray(cluster_size)
            last_cluster = guest_cluster + count - 1
            await self.read(last_cluster << cluster_bits, memoryview(buf))
            rest = len(data) - dpos
            buf[:rest] = data[dpos:]
            await self.file.write(host + (count - 1) * cluster_size, memoryview(buf))
        l2off, table = await self._l2_for_write(guest_cluster >> self.l2_bits)
        idx = guest_cluster & ((1 << self.l2_bits) - 1)
        for i in range(count):
            step = 2 if self.extended_l2 else 1
            old = table[step * (idx + i)]
            table[step * (idx + i)] = (host + i * cluster_size) | OFLAG_COPIED
            if step == 2:
                table[step * (idx + i) + 1] = ALL_SUBCLUSTERS
            self._release(old)
        self.l2cache.mark_dirty(l2off)

    async def _set_entries(self, first_cluster: int, count: int, value_for: int) -> None:
        """Set ``count`` whole clusters from ``first_cluster`` to zero (``value_for`` =
        OFLAG_ZERO) or unallocated (0), releasing what they held."""
        l2_bits = self.l2_bits
        l2mask = (1 << l2_bits) - 1
        done = 0
        while done < count:
            guest_cluster = first_cluster + done
            l1_index = guest_cluster >> l2_bits
            idx = guest_cluster & l2mask
            span = min(count - done, l2mask + 1 - idx)
            l1_entry = self.l1[l1_index]
            old_off = l1_entry & L1E_OFFSET_MASK
            if not old_off and (value_for == 0 or self.backing is None):
                done += span  # reads as zeros already: no L2 table needed
                continue
            if old_off:
                old = await self._load_l2(old_off)
                for i in range(idx, idx + span):
                    self._entry_for_write(old, i, guest_cluster + i - idx)
            l2off, table = await self._l2_for_write(l1_index)
            if self.extended_l2:
                # No zero flag in extended entries: every subcluster reads as zero instead.
                bitmap = ALL_SUBCLUSTERS << 32 if value_for == OFLAG_ZERO else 0
                for i in range(idx, idx + span):
                    old = table[2 * i]
                    table[2 * i] = 0
                    table[2 * i + 1] = bitmap
                    self._release(old)
            else:
                for i in range(idx, idx + span):
                    old = table[i]
                    if old != value_for:
                        table[i] = value_for
                        self._release(old)
            self.l2cache.mark_dirty(l2off)
            done += span

    async def _write_list(self, writes: list[tuple[int, bytes]]) -> None:
        for off, data in writes:
            await self.file.write(off, memoryview(data))

    async def _flush_locked(self) -> None:
        refcounts = self.refcounts
        assert refcounts is not None
        synced = False
        blocks = refcounts.dirty_block_writes()
        if blocks:
            await self._write_list(blocks)
            await self.file.sync()
            synced = True
        table_writes = refcounts.table_writes()
        if table_writes:
            await self._write_list(table_writes)
            await self.file.sync()
            if refcounts.table_moved:
                self.header.refcount_table_offset = refcounts.table_offset
                self.header.refcount_table_clusters = refcounts.table_clusters
                await self.file.write(0, memoryview(self.header.pack()))
                await self.file.sync()
                refcounts.table_moved = False
            synced = True
        l2_writes = self.l2cache.take_dirty()
        if l2_writes:
            await self._write_list(l2_writes)
            await self.file.sync()
            synced = True
        if self.l1_dirty:
            l1_off = self.header.l1_table_offset
            writes = [
                (l1_off + 8 * i, self.l1[i].to_bytes(8, "big")) for i in sorted(self.l1_dirty)
            ]
            self.l1_dirty.clear()
            await self._write_list(writes)
            await self.file.sync()
            synced = True
        if refcounts.apply_frees():
            await self._write_list(refcounts.dirty_block_writes())
            await self.file.sync()
            synced = True
        if not synced:
            await self.file.sync()
