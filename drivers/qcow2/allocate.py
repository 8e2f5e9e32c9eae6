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

from ..base import Image, ImageFormatError
from .format import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from .metadata import Qcow2Metadata

#: Subcluster bitmap of an extended L2 entry whose 32 subclusters are all allocated.
ALL_SUBCLUSTERS = 0xFFFFFFFF


class Qcow2Allocation(Qcow2Metadata, Image):
    """The allocating half of the qcow2 ``Image``; ``image.Qcow2Image`` completes it.

    Methods that change metadata run under the image's lock; ``_overwrite_at``
    and the checks it calls only read it, to find writes that can go in place.
    """

    def _writable(self) -> bool:
        return not self.read_only and self.refcounts is not None

    def _check_writable(self) -> None:
        if not self._writable():
            raise OSError(errno.EPERM, f"{self.path} is open read-only")

    def _check_data_cluster(self, host: int, gc: int) -> None:
        """Refuse a guest write into a metadata cluster (hostile or corrupt L2)."""
        c = host >> self.cluster_bits
        rc = self.refcounts
        assert rc is not None
        table_first = rc.table_offset >> self.cluster_bits
        if (
            c in self.meta
            or c in rc.block_clusters
            or table_first <= c < table_first + rc.table_clusters
        ):
            raise ImageFormatError(
                f"{self._where(gc)}: L2 entry points at metadata cluster {host:#x}"
            )

    async def _l2_for_write(self, l1i: int) -> tuple[int, array]:
        """The L2 table for ``l1i``, allocated or copied (if shared) so it can be changed."""
        l1e = self.l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off and l1e & OFLAG_COPIED:
            return off, await self._load_l2(off)
        rc = self.refcounts
        assert rc is not None
        new = rc.alloc(1) << self.cluster_bits
        if off:
            table = array("Q", await self._load_l2(off))
            self.l2cache.forget(off)
            self.meta.discard(off >> self.cluster_bits)
            rc.free_later(off >> self.cluster_bits)
        else:
            table = array("Q", bytes(self.cluster_size))
        self.l2cache.put(new, table, dirty=True)
        self.meta.add(new >> self.cluster_bits)
        self.l1[l1i] = new | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return new, table

    def _release(self, entry: int) -> None:
        """Drop this L2 entry's hold on host clusters, once it is gone from disk."""
        rc = self.refcounts
        assert rc is not None
        if entry & OFLAG_COMPRESSED:
            coffset, csize = self.compressed_span(entry)
            first = coffset >> self.cluster_bits
            last = (coffset + csize - 1) >> self.cluster_bits
            rc.free_later(first, last - first + 1)
            return
        off = entry & L2E_OFFSET_MASK
        if off:
            rc.free_later(off >> self.cluster_bits)

    def _in_place(self, table: array | None, idx: int) -> bool:
        """Whether guest cluster ``idx`` of ``table`` can be overwritten where it is."""
        if table is None:
            return False
        if self.extended_l2:
            entry = table[2 * idx]
            if table[2 * idx + 1] != ALL_SUBCLUSTERS:
                return False
        else:
            entry = table[idx]
        return (
            entry & OFLAG_COPIED != 0
            and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO)
            and entry & L2E_OFFSET_MASK != 0
        )

    def _overwrite_at(self, offset: int, length: int) -> int | None:
        """Where in the file a write of ``length`` bytes at ``offset`` goes if it needs no
        metadata change, else None.

        That is an overwrite inside one cluster this image owns alone (COPIED) whose L2
        table is cached; it cannot race with allocation, so it takes no lock.
        """
        within = offset & self._cluster_mask
        if within + length > self.cluster_size or self.extended_l2:
            return None
        l1e = self.l1[offset >> self._l1_shift]
        table = self.l2cache.tables.get(l1e & L1E_OFFSET_MASK)
        if table is None or not l1e & OFLAG_COPIED:
            return None
        gc = offset >> self.cluster_bits
        entry = table[gc & self._l2_mask]
        if not entry & OFLAG_COPIED or not self._in_place(table, gc & self._l2_mask):
            return None
        host = entry & L2E_OFFSET_MASK
        self._check_data_cluster(host, gc)
        return host + within

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        cb = self.cluster_bits
        cs = self.cluster_size
        l2b = self.l2_bits
        l2mask = (1 << l2b) - 1
        n = len(data)
        pos = 0
        while pos < n:
            off = offset + pos
            gc = off >> cb
            within = off & (cs - 1)
            l1i = gc >> l2b
            idx = gc & l2mask
            l2off = self.l1[l1i] & L1E_OFFSET_MASK
            table = await self._load_l2(l2off) if l2off else None
            st = 2 if self.extended_l2 else 1
            if self._in_place(table, idx):
                assert table is not None
                entry = table[st * idx]
                # Extend over following in-place clusters contiguous on the host.
                host = entry & L2E_OFFSET_MASK
                self._check_data_cluster(host, gc)
                run = min(cs - within, n - pos)
                i = idx + 1
                while pos + run < n and table is not None and i <= l2mask:
                    e = table[st * i]
                    if not self._in_place(table, i) or e & L2E_OFFSET_MASK != host + (i - idx) * cs:
                        break
                    self._check_data_cluster(e & L2E_OFFSET_MASK, gc + i - idx)
                    run += min(cs, n - pos - run)
                    i += 1
                await self.file.write(host + within, data[pos : pos + run])
                pos += run
                continue
            # A run of clusters in this L2 table that all need new host clusters.
            k = 1
            covered = min(cs - within, n - pos)
            while pos + covered < n and idx + k <= l2mask:
                if self._in_place(table, idx + k):
                    break
                covered += min(cs, n - pos - covered)
                k += 1
            await self._allocate_and_write(gc, k, within, data[pos : pos + covered])
            pos += covered

    async def _allocate_and_write(self, gc: int, k: int, within: int, data: memoryview) -> None:
        """Write ``data`` (starting ``within`` guest cluster ``gc``) into ``k`` new clusters."""
        cb = self.cluster_bits
        cs = self.cluster_size
        rc = self.refcounts
        assert rc is not None
        host = rc.alloc(k) << cb
        end = within + len(data)  # byte offset of the data's end relative to cluster gc
        head_partial = within != 0 or end < cs
        tail_partial = end % cs != 0 and (k > 1 or not head_partial)
        if head_partial:
            buf = bytearray(cs)
            await self.read(gc << cb, memoryview(buf))
            first = min(end, cs)
            buf[within:first] = data[: first - within]
            await self.file.write(host, memoryview(buf))
            start_full = 1
            dpos = first - within
        else:
            start_full = 0
            dpos = 0
        full_end = k - 1 if (tail_partial and k > 1) else k
        if full_end > start_full:
            nbytes = (full_end - start_full) * cs
            await self.file.write(host + start_full * cs, data[dpos : dpos + nbytes])
            dpos += nbytes
        if tail_partial and k > 1:
            buf = bytearray(cs)
            last_gc = gc + k - 1
            await self.read(last_gc << cb, memoryview(buf))
            rest = len(data) - dpos
            buf[:rest] = data[dpos:]
            await self.file.write(host + (k - 1) * cs, memoryview(buf))
        l2off, table = await self._l2_for_write(gc >> self.l2_bits)
        idx = gc & ((1 << self.l2_bits) - 1)
        for i in range(k):
            st = 2 if self.extended_l2 else 1
            old = table[st * (idx + i)]
            table[st * (idx + i)] = (host + i * cs) | OFLAG_COPIED
            if st == 2:
                table[st * (idx + i) + 1] = ALL_SUBCLUSTERS
            self._release(old)
        self.l2cache.mark_dirty(l2off)

    async def _set_entries(self, gc: int, count: int, value_for: int) -> None:
        """Set ``count`` whole clusters from ``gc`` to zero (``value_for`` = OFLAG_ZERO) or
        unallocated (0), releasing what they held."""
        l2b = self.l2_bits
        l2mask = (1 << l2b) - 1
        done = 0
        while done < count:
            g = gc + done
            l1i = g >> l2b
            idx = g & l2mask
            k = min(count - done, l2mask + 1 - idx)
            l1e = self.l1[l1i]
            if not l1e & L1E_OFFSET_MASK and (value_for == 0 or self.backing is None):
                done += k  # reads as zeros already: no L2 table needed
                continue
            l2off, table = await self._l2_for_write(l1i)
            if self.extended_l2:
                # No zero flag in extended entries: every subcluster reads as zero instead.
                bitmap = ALL_SUBCLUSTERS << 32 if value_for == OFLAG_ZERO else 0
                for i in range(idx, idx + k):
                    old = table[2 * i]
                    table[2 * i] = 0
                    table[2 * i + 1] = bitmap
                    self._release(old)
            else:
                for i in range(idx, idx + k):
                    old = table[i]
                    if old != value_for:
                        table[i] = value_for
                        self._release(old)
            self.l2cache.mark_dirty(l2off)
            done += k

    async def _write_list(self, writes: list[tuple[int, bytes]]) -> None:
        for off, data in writes:
            await self.file.write(off, memoryview(data))

    async def _flush_locked(self) -> None:
        rc = self.refcounts
        assert rc is not None
        synced = False
        blocks = rc.dirty_block_writes()
        if blocks:
            await self._write_list(blocks)
            await self.file.sync()
            synced = True
        table_writes = rc.table_writes()
        if table_writes:
            await self._write_list(table_writes)
            await self.file.sync()
            if rc.table_moved:
                self.header.refcount_table_offset = rc.table_offset
                self.header.refcount_table_clusters = rc.table_clusters
                await self.file.write(0, memoryview(self.header.pack()))
                await self.file.sync()
                rc.table_moved = False
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
        if rc.apply_frees():
            await self._write_list(rc.dirty_block_writes())
            await self.file.sync()
            synced = True
        if not synced:
            await self.file.sync()
