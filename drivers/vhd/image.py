"""The VHD driver (``vhd:/path``): fixed, dynamic and differencing images, chains of any depth.

Reads of a block whose sector bitmap is full go straight to the file at an
offset computed from the cached BAT (``read_nowait`` serves page-cache hits
inline); other reads walk the bitmap in runs and fall through to the backing
image (the VHD parent) for sectors this image does not hold.  Writes to new
blocks allocate through ``BlockStore`` (see ``alloc`` for the crash ordering);
a partial write marks only the sectors written, so the backing image's other
sectors stay visible.  VHD metadata is not page aligned, so the registry
refuses the ``direct`` option.
"""

from __future__ import annotations

import errno
import os

from ..backing import chain_guard, close_unserved, open_remote_backing
from ..base import Capabilities, Extent, ExtentFlags, Image, ImageFormatError
from ..fileio import ImageFile
from ..raw import RawImage
from ..registry import OpenOptions
from . import bitmap as bits
from .alloc import ZERO_CHUNK, BlockStore
from .chain import check_parent_uuid, cluster_parent, find_parent
from .format import BAT_UNUSED, FOOTER_SIZE, KEYHASH_XATTR, POISON_COOKIE, SECTOR
from .meta import Metadata, cut_to, load

HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO
#: Block status answers stop after this many bytes; the client asks again.
EXTENTS_SPAN = 1 << 30


def open_vhd(path: str, options: OpenOptions) -> VhdImage:
    """Opener registered for ``vhd:``."""
    return VhdImage(
        path, read_only=options.read_only, allowed_dirs=options.allowed_dirs, options=options
    )


class VhdImage(Image):
    """One VHD file, with its backing chain opened read-only below it: VHD parents, down to
    a raw file or an image in a cluster."""

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        allowed_dirs: tuple[str, ...] = (),
        options: OpenOptions | None = None,
    ) -> None:
        """``allowed_dirs``: where file parents may live (default: beside ``path``);
        ``options``: how a parent in a cluster opens (the daemon's ``ceph_conf``/``ceph_id``;
        default: Ceph's own)."""
        path = os.path.abspath(path)
        self.spec = f"vhd:{path}"
        self.path = path
        self.read_only = read_only
        self.backing: Image | None = None
        self.file = ImageFile(path, writable=not read_only)
        try:
            self.meta: Metadata = load(self.file.fd, path)
            self.size = self.meta.footer.current_size
            if self.meta.footer.cookie == POISON_COOKIE:
                raise ImageFormatError(f"{path}: footer.cookie is v_poison (image disabled)")
            if _encrypted(self.file.fd, self.meta):
                raise ImageFormatError(
                    f"{path}: encrypted (it holds a key hash); tapdisk has no block crypto"
                )
            if not read_only and self.meta.batmap_error:
                raise ImageFormatError(
                    f"{path}: {self.meta.batmap_error} (vhd-util repair rebuilds it)"
                )
            if self.meta.is_diff:
                roots = allowed_dirs or (os.path.dirname(path),)
                below = options or OpenOptions()
                self.backing = _open_backing(path, self.file.fd, self.meta, roots, below)
            if not read_only and self.meta.footer_recovered:
                self._restore_footer()
        except BaseException:
            self._close_files()
            raise
        self.store = None if self.meta.is_fixed else BlockStore(self.file, self.meta)
        self._dirty = False
        self._caps = Capabilities(
            trim=not read_only,
            zero=not read_only,
            extents=True,
        )

    def _close_files(self) -> None:
        """Close this file and the chain's below it, without an event loop (failed opens)."""
        self.file.close()
        backing = self.backing
        if isinstance(backing, VhdImage):
            backing._close_files()
        elif isinstance(backing, RawImage):
            backing.file.close()
        elif backing is not None:
            close_unserved(backing)

    def _restore_footer(self) -> None:
        """Rewrite a footer torn by a crash from the backup copy, dropping the torn tail."""
        end = self.meta.data_end
        os.pwrite(self.file.fd, self.meta.footer.pack(), end)
        cut_to(self.file.fd, end + FOOTER_SIZE)
        os.fdatasync(self.file.fd)
        self.meta.file_size = self.file.size()
        self.meta.footer_recovered = False

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "vhd"

    # -- reads ---------------------------------------------------------------

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        store = self.store
        if store is None:
            return self.file.read_nowait(offset, buf)
        b = offset >> store.shift
        in_block = offset - (b << store.shift)
        if in_block + len(buf) > store.block_size:
            return False
        base = store.fast[b]
        if base:
            return self.file.read_nowait(base + in_block, buf)
        if store.bat[b] == BAT_UNUSED:
            return self._below_nowait(offset, buf)
        return False

    async def read(self, offset: int, buf: memoryview) -> None:
        store = self.store
        if store is None:
            await self.file.read(offset, buf)
            return
        b = offset >> store.shift
        in_block = offset - (b << store.shift)
        if in_block + len(buf) <= store.block_size and store.fast[b]:
            await self.file.read(store.fast[b] + in_block, buf)
            return
        pos, total = 0, len(buf)
        while pos < total:
            off = offset + pos
            b = off >> store.shift
            in_block = off - (b << store.shift)
            take = min(total - pos, store.block_size - in_block)
            await self._read_block(b, in_block, buf[pos : pos + take])
            pos += take

    async def _read_block(self, b: int, in_block: int, view: memoryview) -> None:
        store = self.store
        assert store is not None
        block_start = b << store.shift
        if store.bat[b] == BAT_UNUSED:
            await self._read_below(block_start + in_block, view)
            return
        base = store.data_base(b)
        if store.fast[b]:
            await self.file.read(base + in_block, view)
            return
        bm = await store.bitmap(b)
        end = in_block + len(view)
        for first, stop, present in bits.runs(bm, in_block // SECTOR, -(-end // SECTOR)):
            lo = max(first * SECTOR, in_block)
            hi = min(stop * SECTOR, end)
            part = view[lo - in_block : hi - in_block]
            if present:
                await self.file.read(base + lo, part)
            else:
                await self._read_below(block_start + lo, part)

    def _below_nowait(self, offset: int, buf: memoryview) -> bool:
        backing = self.backing
        if backing is None:
            buf[:] = bytes(len(buf))
            return True
        if offset + len(buf) > backing.size:
            return False
        try:
            done = backing.read_nowait(offset, buf)
        except Exception:
            backing.child_read_bytes += len(buf)
            backing.child_failed_bytes += len(buf)
            raise
        if done:
            backing.child_read_bytes += len(buf)
        return done

    async def _read_below(self, offset: int, view: memoryview) -> None:
        """Read what the backing image holds at ``offset`` (zeros without one or past its end),
        counted on the backing (``Image.child_read_bytes``)."""
        backing = self.backing
        n = 0 if backing is None else max(0, min(len(view), backing.size - offset))
        if n:
            assert backing is not None
            part = view[:n]
            backing.child_read_bytes += n
            try:
                if not backing.read_nowait(offset, part):
                    await backing.read(offset, part)
            except Exception:
                backing.child_failed_bytes += n
                raise
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    # -- writes --------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        """Writes inside one block whose bitmap is full need no metadata: straight to the file."""
        store = self.store
        if self.read_only:
            return False
        if store is None:
            done = self.file.write_nowait(offset, data)
        else:
            b = offset >> store.shift
            in_block = offset - (b << store.shift)
            base = store.fast[b]
            done = bool(base) and in_block + len(data) <= store.block_size
            done = done and self.file.write_nowait(base + in_block, data)
        if done:
            self._dirty = True
        return done

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._check_writable()
        self._dirty = True
        store = self.store
        if store is None:
            await self.file.write(offset, data)
        else:
            b = offset >> store.shift
            in_block = offset - (b << store.shift)
            if in_block + len(data) <= store.block_size and store.fast[b]:
                await self.file.write(store.fast[b] + in_block, data)
            else:
                await self._write_sparse(offset, data)
        if fua:
            await self.file.sync()

    async def _write_sparse(self, offset: int, data: memoryview) -> None:
        store = self.store
        assert store is not None
        start = offset - offset % SECTOR
        end = -(-(offset + len(data)) // SECTOR) * SECTOR
        if start != offset or end != offset + len(data):
            # Sub-sector edges: merge with what the chain holds now.
            merged = bytearray(end - start)
            view = memoryview(merged)
            await self.read(start, view[:SECTOR])
            await self.read(end - SECTOR, view[-SECTOR:])
            view[offset - start : offset - start + len(data)] = data
            data, offset = view, start
        pos = 0
        while pos < len(data):
            off = offset + pos
            b = off >> store.shift
            in_block = off - (b << store.shift)
            take = min(len(data) - pos, store.block_size - in_block)
            await self._write_block(b, in_block, data[pos : pos + take])
            pos += take

    async def _write_block(self, b: int, in_block: int, data: memoryview) -> None:
        store = self.store
        assert store is not None
        if store.bat[b] == BAT_UNUSED and await store.allocate(b, in_block, data):
            return
        await self.file.write(store.data_base(b) + in_block, data)
        if not store.fast[b]:
            first = in_block // SECTOR
            await store.mark_written(b, first, first + len(data) // SECTOR)

    async def flush(self) -> None:
        # Cleared first: a write during the flush marks it again.  ``close`` flushes only
        # when dirty, so a VBD's pause (flush, then close) syncs once, not twice.
        self._dirty = False
        try:
            if self.store is not None:
                await self.store.write_batmap()
            await self.file.sync()
        except BaseException:
            self._dirty = True
            raise

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        self._check_writable()
        self._dirty = True
        store = self.store
        if store is None:
            await self._zero_fixed(offset, length)
        else:
            plan = await self._zero_plan(offset, length)
            if fast_only and any(not in_file for _, _, in_file in plan):
                raise OSError(errno.ENOTSUP, "zeroing needs blocks allocated in this image")
            for off, n, in_file in plan:
                if in_file:
                    await store.zero_range(off, n)
                else:
                    await self._write_zero_buffers(off, n)
        if fua:
            await self.file.sync()

    async def _zero_fixed(self, offset: int, length: int) -> None:
        """Zero data of a fixed VHD in place (never touching the footer after it)."""
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            await self.file.write(offset, zeros[:n])
            offset += n

    async def _zero_plan(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """How to zero a range: (file offset, length, True) or (virtual offset, length, False).

        Sectors this image holds are zeroed in the file; ranges that would
        otherwise show a backing image's data get zero buffers written (allocating).
        Ranges already reading as zeros through the whole chain are skipped.
        """
        store = self.store
        assert store is not None
        plan: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            b = pos >> store.shift
            in_block = pos - (b << store.shift)
            take = min(end - pos, store.block_size - in_block)
            if store.bat[b] == BAT_UNUSED:
                if self.backing is not None and not await self._below_is_zero(pos, take):
                    plan.append((pos, take, False))
            else:
                base = store.data_base(b)
                bm = await store.bitmap(b)
                lo_s, hi_s = in_block // SECTOR, -(-(in_block + take) // SECTOR)
                for first, stop, present in bits.runs(bm, lo_s, hi_s):
                    lo = max(first * SECTOR, in_block)
                    hi = min(stop * SECTOR, in_block + take)
                    vpos = (b << store.shift) + lo
                    if present or self.backing is None:
                        plan.append((base + lo, hi - lo, True))
                    elif not await self._below_is_zero(vpos, hi - lo):
                        plan.append((vpos, hi - lo, False))
            pos += take
        return plan

    async def _below_is_zero(self, offset: int, length: int) -> bool:
        return all(e.flags & ExtentFlags.ZERO for e in await self._below_extents(offset, length))

    async def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            await self._write_sparse(offset, zeros[:n])
            offset += n

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        """Punch whole 4 KiB pages of data this image holds; other ranges are left alone."""
        self._check_writable()
        store = self.store
        if store is None:
            return
        pos, end = offset, offset + length
        while pos < end:
            b = pos >> store.shift
            in_block = pos - (b << store.shift)
            take = min(end - pos, store.block_size - in_block)
            if store.bat[b] != BAT_UNUSED:
                base = store.data_base(b)
                lo = -(-(base + in_block) // 4096) * 4096
                hi = (base + in_block + take) // 4096 * 4096
                if hi > lo:
                    await store.zero_range(lo, hi - lo)
            pos += take
        if fua:
            await self.file.sync()

    # -- block status ---------------------------------------------------------

    async def extents(self, offset: int, length: int) -> list[Extent]:
        store = self.store
        if store is None:
            return [Extent(length, ExtentFlags.DATA)]
        out: list[Extent] = []
        pos, end = offset, offset + min(length, EXTENTS_SPAN)
        while pos < end:
            b = pos >> store.shift
            in_block = pos - (b << store.shift)
            take = min(end - pos, store.block_size - in_block)
            if store.bat[b] == BAT_UNUSED:
                _append(out, await self._below_extents(pos, take))
            elif store.fast[b]:
                _append(out, [Extent(take, ExtentFlags.DATA)])
            else:
                bm = await store.bitmap(b)
                lo_s, hi_s = in_block // SECTOR, -(-(in_block + take) // SECTOR)
                for first, stop, present in bits.runs(bm, lo_s, hi_s):
                    lo = max(first * SECTOR, in_block)
                    hi = min(stop * SECTOR, in_block + take)
                    if present:
                        _append(out, [Extent(hi - lo, ExtentFlags.DATA)])
                    else:
                        _append(out, await self._below_extents((b << store.shift) + lo, hi - lo))
            pos += take
        return out

    async def _below_extents(self, offset: int, length: int) -> list[Extent]:
        """The backing image's extents for exactly [offset, offset+length)."""
        backing = self.backing
        out: list[Extent] = []
        covered = 0
        limit = 0 if backing is None else max(0, min(length, backing.size - offset))
        while covered < limit:
            assert backing is not None
            got = await backing.extents(offset + covered, limit - covered)
            for ext in got:
                n = min(ext.length, limit - covered)
                _append(out, [Extent(n, ext.flags)])
                covered += n
                if covered >= limit:
                    break
        if covered < length:
            _append(out, [Extent(length - covered, HOLE)])
        return out

    async def close(self) -> None:
        if self.file.fd < 0:
            return
        try:
            if self._dirty:
                await self.flush()
        finally:
            self.file.close()
            if self.backing is not None:
                await self.backing.close()


def _encrypted(fd: int, meta: Metadata) -> bool:
    """blktap encrypted the data of a VHD whose key hash is set (``vhd-util key``)."""
    if meta.batmap_header is not None:
        return meta.batmap_header.keyhash_cookie == 1
    if meta.is_fixed:
        return False
    try:
        return os.getxattr(fd, KEYHASH_XATTR)[:1] == b"\x01"
    except OSError:
        return False


def _append(out: list[Extent], more: list[Extent]) -> None:
    for ext in more:
        if ext.length == 0:
            continue
        if out and out[-1].flags == ext.flags:
            out[-1] = Extent(out[-1].length + ext.length, ext.flags)
        else:
            out.append(ext)


def _open_backing(
    path: str, fd: int, meta: Metadata, roots: tuple[str, ...], options: OpenOptions
) -> Image:
    """Open the backing image (the VHD parent) read-only: a VHD whose UUID matches, or raw
    when the UUID is null (a file, or an image in a cluster)."""
    assert meta.header is not None
    spec = cluster_parent(fd, meta)
    if spec is not None:
        return open_remote_backing(path, spec, "raw", options)
    backing_path = find_parent(path, fd, meta, roots)
    with chain_guard(path, backing_path, "parent"):
        if meta.header.parent_uuid == bytes(16):
            return RawImage(backing_path, read_only=True)
        backing = VhdImage(backing_path, read_only=True, allowed_dirs=roots, options=options)
    try:
        check_parent_uuid(path, meta, backing_path, backing.meta.footer)
    except ImageFormatError:
        backing._close_files()
        raise
    return backing
