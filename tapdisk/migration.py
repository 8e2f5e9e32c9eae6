"""Live storage migration of one VBD: mirror to a target, copy, switch (``tap-ctl mirror``).

A ``Migration``'s life, in order:

1. **Start**: open the target (any ``TYPE:PATH`` a VBD can open) and check its
   size, then put a ``MirrorImage`` (drivers/mirror.py) under the device's CBT
   layer behind a brief drain (``VBD.swap``): from then on every guest write
   goes to the source and the target.  A failure here is the caller's error;
   the device never noticed.
2. **Copy**: walk the source's allocation (block status) in chunks.  Each chunk
   runs exclusively against guest writes to its bytes (``MirrorImage.copy_range``)
   and asks for block status inside that lock: data is read from the source and
   written to the target (all-zero data as zeroes), holes and zero runs become
   write-zeroes that may unmap, so a target that held old data ends identical
   and stays sparse where the source is.  The VBD is never paused by the copy.
3. **Switch** (if asked): behind another brief drain, flush both, take the
   target out of the mirror and run on it (under the same CBT log), and close
   the source stack, so that no file of the source stays open.  Without a
   switch the mirror stays on: the target keeps up with every write until a
   pause or a close.
4. **Failure**: a target that fails or hangs (``SECONDARY_TIMEOUT``) during a
   guest write or a chunk is dropped; the job then takes the mirror out again
   and the device runs on its source, untouched, with the reason in ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Final

from tapdisk.drivers.base import ExtentFlags, Image, ImageError
from tapdisk.drivers.cbtlayer import CbtImage
from tapdisk.drivers.mirror import MirrorImage
from tapdisk.drivers.registry import OpenOptions, open_image

from .config import image_path
from .vbd import VBD, VBDError

log = logging.getLogger("tapdisk.migration")

#: Most data bytes one chunk reads and writes.
DATA_CHUNK: Final = 1 << 20
#: Most bytes of holes one chunk zeroes (a few fallocate calls).
HOLE_CHUNK: Final = 256 << 20
_ZEROS: Final = bytes(DATA_CHUNK)
_NO_DATA: Final = ExtentFlags.HOLE | ExtentFlags.ZERO


class Migration:
    """One copy job of one VBD; ``status()`` is what ``mirror_status`` answers."""

    def __init__(
        self,
        vbd: VBD,
        target: str,
        options: OpenOptions,
        switch: bool,
        on_switch: Callable[[str], None],
    ) -> None:
        self.vbd = vbd
        self.target = target
        self.options = options
        self.switch = switch
        self.on_switch = on_switch
        #: starting, copying, switching, mirroring (copied, mirror kept), switched, failed.
        self.state = "starting"
        self.error: str | None = None
        self.total = vbd.size
        self.done = 0
        self.copied = 0
        self.zeroed = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self.task: asyncio.Task[None] | None = None
        self._mirror: MirrorImage | None = None

    @property
    def running(self) -> bool:
        return self.state in ("starting", "copying", "switching")

    def status(self) -> dict[str, Any]:
        """MIRROR-STATUS (tapdisk/ctl/protocol.py)."""
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "state": self.state,
            "target": self.target,
            "switch": self.switch,
            "total": self.total,
            "done": self.done,
            "copied": self.copied,
            "zeroed": self.zeroed,
            "seconds": round(end - self.started, 3),
            "error": self.error,
        }

    # -- 1. start ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the target and mirror to it; then copy in the background.

        Raises ImageError, VBDError or OSError naming the problem; the device is
        untouched then.
        """
        if self.vbd.read_only:
            raise VBDError(f"{self.vbd.name} is read-only: nothing to migrate")
        if self.vbd.secondary is not None:
            raise VBDError(f"{self.vbd.name} already has a secondary ({self.vbd.secondary})")
        path = image_path(self.target)
        if path is not None and os.path.realpath(path) in map(os.path.realpath, self.vbd.chain()):
            raise VBDError(f"target {self.target} is the device's own image or one of its parents")
        target = await asyncio.to_thread(open_image, self.target, self.options)
        if target.size != self.vbd.size:
            await target.close()
            raise VBDError(
                f"target {target.spec} has {target.size} bytes but the device has "
                f"{self.vbd.size}; create it with the same size"
            )
        if target.read_only:
            await target.close()
            raise VBDError(f"target {target.spec} is read-only")

        async def install(top: Image) -> Image:
            holder = top if isinstance(top, CbtImage) else None
            mirror = MirrorImage(holder.inner if holder else top, target)
            self._mirror = mirror
            if holder is None:
                return mirror
            holder.inner = mirror
            return holder

        try:
            await self.vbd.swap(install)
        except BaseException:
            await target.close()
            raise
        log.info("%s: mirroring to %s; copying %d bytes", self.vbd.name, target.spec, self.total)
        self.state = "copying"
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self._copy()
            if self.switch:
                self.state = "switching"
                await self._switch()
            else:
                self.state = "mirroring"
            log.info(
                "%s: %s %s after %.1f s (%d bytes copied, %d zeroed)",
                self.vbd.name,
                self.state,
                self.target,
                time.monotonic() - self.started,
                self.copied,
                self.zeroed,
            )
        except asyncio.CancelledError:
            if self.state != "switched":
                self._fail("cancelled")
                await self._unmirror()
            raise
        except (OSError, ImageError, VBDError) as exc:
            self._fail(str(exc))
            await self._unmirror()
        finally:
            self.finished = time.monotonic()

    async def cancel(self) -> None:
        """Stop the copy if it runs; the device is back on its source when this returns."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _fail(self, reason: str) -> None:
        mirror = self._mirror
        if mirror is not None and mirror.failure is not None:
            reason = f"the target failed: {mirror.failure}"
        self.state = "failed"
        self.error = reason
        log.error("%s: migration to %s failed: %s", self.vbd.name, self.target, reason)

    # -- 2. copy -----------------------------------------------------------------

    async def _copy(self) -> None:
        mirror = self._mirror
        assert mirror is not None
        buf = bytearray(DATA_CHUNK)
        while self.done < self.total:
            if self.vbd.mirror is not mirror:
                raise VBDError(f"{self.vbd.name} was paused or closed during the copy")
            offset = self.done
            end = offset + await self._chunk_length(mirror.inner, offset)
            self.done += await mirror.copy_range(
                offset,
                end - offset,
                lambda source, target, at=offset, to=end: self._chunk(source, target, at, to, buf),
            )
        await mirror.flush_secondary()

    async def _chunk_length(self, source: Image, offset: int) -> int:
        """Bytes the next chunk locks: a run of holes up to HOLE_CHUNK, of data up to
        DATA_CHUNK (guest writes elsewhere go on meanwhile)."""
        rest = self.total - offset
        first = (await source.extents(offset, min(HOLE_CHUNK, rest)))[0]
        if first.length <= 0:
            raise OSError(errno.EIO, f"{source.spec}: block status at {offset} covered no bytes")
        limit = HOLE_CHUNK if first.flags & _NO_DATA else DATA_CHUNK
        return min(first.length, limit, rest)

    async def _chunk(
        self, source: Image, target: Image, offset: int, end: int, buf: bytearray
    ) -> int:
        """Copy ``[offset, end)``, or its first DATA_CHUNK bytes of data; bytes done.

        The block status is asked again here, under the lock: a guest write may have
        filled a hole since ``_chunk_length`` looked.
        """
        position = offset
        data = 0
        for extent in await source.extents(offset, end - offset):
            length = min(extent.length, end - position)
            if extent.flags & _NO_DATA:
                await target.write_zeroes(position, length, may_unmap=True)
                self.zeroed += length
            else:
                length = min(length, DATA_CHUNK - data)
                view = memoryview(buf)[:length]
                await source.read(position, view)
                if view == _ZEROS[:length]:
                    await target.write_zeroes(position, length, may_unmap=True)
                    self.zeroed += length
                else:
                    await target.write(position, view)
                    self.copied += length
                data += length
            position += length
            if position >= end or data >= DATA_CHUNK:
                break
        if position == offset:
            raise OSError(errno.EIO, f"{source.spec}: block status at {offset} covered no bytes")
        return position - offset

    # -- 3. switch ---------------------------------------------------------------

    async def _switch(self) -> None:
        mirror = self._mirror
        assert mirror is not None
        await mirror.flush()  # most of the dirty data, before the drain: a short flush inside
        sources: list[Image] = []

        async def switch(top: Image) -> Image:
            if self.vbd.mirror is not mirror:
                raise VBDError(f"{self.vbd.name} was paused or closed during the copy")
            await top.flush()  # the source and the target
            target = mirror.detach()
            log_path = top.log_path if isinstance(top, CbtImage) else None
            try:
                if log_path is None:
                    new = target
                else:
                    new = await asyncio.to_thread(CbtImage, target, log_path)
            except BaseException:
                mirror.secondary = target
                raise
            sources.append(top)
            return new

        await self.vbd.swap(switch)
        self._mirror = None
        self.state = "switched"
        self.on_switch(self.target)
        log.info("%s: switched to %s", self.vbd.name, self.target)
        try:  # the source stack and the old mapping of the log, once the device runs again
            await asyncio.shield(sources[0].close())
        except (OSError, ImageError) as exc:
            log.warning("%s: closing the source failed: %s", self.vbd.name, exc)

    # -- 4. failure --------------------------------------------------------------

    async def _unmirror(self) -> None:
        """Take the mirror layer out of the running stack; the device runs on its source."""
        mirror, self._mirror = self._mirror, None
        if mirror is None or self.vbd.mirror is not mirror:
            return

        async def remove(top: Image) -> Image:
            if top is mirror:
                return mirror.inner
            assert isinstance(top, CbtImage) and top.inner is mirror
            top.inner = mirror.inner
            return top

        try:
            await self.vbd.swap(remove)
        except VBDError:
            return  # paused or closed meanwhile: the mirror went with the stack
        await mirror.release()  # the target, once the device runs again
