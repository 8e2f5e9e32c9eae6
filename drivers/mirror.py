"""The mirror layer: a primary image with a secondary, blktap's ``-2`` and ``-s``.

Reads always come from the primary (the guest never reads a half-copied
secondary).  Two modes:

1. **Mirror** (default): every write, write-zeroes, trim and flush goes to the
   primary and the secondary at once and completes when both are done (a trim
   goes to the primary first; the secondary then gets zeroes, or a copy, for
   what the primary reads there, as formats trim at different granularities).  A
   secondary that fails, or takes more than ``timeout`` seconds, is dropped:
   the request completes with the primary's result, ``failed`` becomes True
   (the VBD's ``nbd_mirror_failed``) and the device carries on with the
   primary alone.  Page-cache shortcuts for writes stand aside while a
   secondary is attached, so that no write skips it.
2. **Standby** (``-s``): the secondary is only held open.  When the primary
   runs out of space (ENOSPC on a write or write-zeroes) the secondary takes
   over: the request is done again on it, and from then on it is the image
   the device reads and writes.  It must therefore hold the primary's data
   (a copy, or an overlay whose backing file is the primary).

A copy job (``tapdisk/migration.py``) fills a mirrored secondary with what the
primary held before mirroring began.  ``copy_range`` runs one chunk of it
exclusively against guest writes to the same bytes: the chunk waits for the
overlapping writes in flight, and overlapping writes arriving meanwhile wait
for the chunk, so a chunk never lands on the secondary after a newer write.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from .base import ExtentFlags, Image, ImageError, IoDone
from .layer import Layer

log = logging.getLogger("tapdisk.mirror")

#: Seconds a secondary may take over one request before it is dropped.
SECONDARY_TIMEOUT: Final = 5.0
#: Most bytes of data one step of re-copying a trimmed range reads.
MATCH_CHUNK: Final = 1 << 20


class MirrorImage(Layer):
    """``inner`` (the primary) with a ``secondary``; see the module docstring."""

    def __init__(
        self,
        inner: Image,
        secondary: Image | None,
        *,
        standby: bool = False,
        timeout: float = SECONDARY_TIMEOUT,
        failure: str | None = None,
    ) -> None:
        """``secondary`` None: it could not be opened (``failure`` says why); the layer
        then only carries ``failed`` for the device's statistics."""
        super().__init__(inner)
        self.secondary: Image | None = secondary
        self.standby = standby
        self.timeout = timeout
        #: The secondary was dropped after a failure (blktap's ``nbd_mirror_failed``).
        self.failed = secondary is None
        #: Why it was dropped, for the copy job and the log.
        self.failure = failure
        #: Primaries replaced by a standby takeover, closed with the layer.
        self._retired: list[Image] = []
        self._closing: set[asyncio.Task[None]] = set()
        #: Guest writes in flight on the secondary: token -> (start, end).
        self._writes: dict[int, tuple[int, int]] = {}
        self._next_token = 0
        #: The byte range a copy chunk holds, and the event set when it lets go.
        self._copy_range: tuple[int, int] | None = None
        self._copy_idle = asyncio.Event()
        self._copy_idle.set()
        self._writes_done: asyncio.Event | None = None
        #: Called once the secondary is dropped or has taken over: whoever keeps a record
        #: of what the device serves (the daemon's VBD records) brings it up to date.
        self.on_change: Callable[[], None] | None = None

    @property
    def taken_over(self) -> bool:
        """The standby took over: ``inner`` (and ``spec``) is the former secondary."""
        return bool(self._retired)

    @property
    def mirroring(self) -> bool:
        """True while writes go to a secondary too."""
        return self.secondary is not None and not self.standby

    # -- the secondary -----------------------------------------------------------

    def drop(self, reason: str) -> None:
        """Stop using the secondary (closed in the background); the primary carries on."""
        secondary = self.secondary
        if secondary is None:
            return
        self.secondary = None
        self.failed = True
        self.failure = reason
        log.error("%s: secondary %s dropped: %s", self.spec, secondary.spec, reason)
        task = asyncio.ensure_future(_close_quietly(secondary))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._release_waiters()
        self._changed()

    def detach(self) -> Image:
        """Take the secondary out of the layer, open, for the caller to use (the switch)."""
        secondary = self.secondary
        if secondary is None:
            raise OSError(errno.EIO, f"{self.spec}: no secondary to detach ({self.failure})")
        self.secondary = None
        return secondary

    async def _on_secondary(self, what: str, call: Callable[[Image], Awaitable[None]]) -> None:
        """Run ``call`` on the secondary; a failure or a timeout drops it, never raises."""
        secondary = self.secondary
        if secondary is None:
            return
        try:
            await asyncio.wait_for(call(secondary), self.timeout)
        except TimeoutError:
            if self.secondary is secondary:
                self.drop(f"{what} took more than {self.timeout:g} s")
        except (OSError, ImageError) as exc:  # never the guest's failure
            if self.secondary is secondary:
                self.drop(f"{what} failed: {_reason(exc)}")

    async def _both(
        self,
        offset: int,
        length: int,
        what: str,
        call: Callable[[Image], Awaitable[None]],
        then: Callable[[Image], Awaitable[None]] | None = None,
    ) -> None:
        """``call`` on the primary and (mirroring) the secondary at once, or, given ``then``,
        ``call`` on the primary and ``then`` on the secondary after it; the primary's result
        counts."""
        if not self.mirroring:
            await self._on_primary(call)
            return
        end = offset + length
        while self._copy_range is not None and _overlap(self._copy_range, offset, end):
            await self._copy_idle.wait()
        token = self._next_token
        self._next_token += 1
        self._writes[token] = (offset, end)
        try:
            if then is not None:
                await self._on_primary(call)
                await self._on_secondary(what, then)
            else:
                primary = asyncio.ensure_future(self._on_primary(call))
                await self._on_secondary(what, call)
                await primary
        finally:
            del self._writes[token]
            if self._writes_done is not None:
                self._writes_done.set()

    async def _on_primary(self, call: Callable[[Image], Awaitable[None]]) -> None:
        """``call`` on the primary; in standby, ENOSPC hands the device to the secondary."""
        primary = self.inner
        try:
            await call(primary)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not self.standby or self.secondary is None:
                raise
            if self.inner is primary:
                self._take_over()
            await call(self.inner)

    def _take_over(self) -> None:
        """Standby: the secondary becomes the image the device uses."""
        secondary = self.secondary
        assert secondary is not None
        log.warning("%s: out of space; %s takes over", self.spec, secondary.spec)
        self._retired.append(self.inner)
        self.inner = secondary
        self.secondary = None
        self.standby = False
        self.spec = secondary.spec
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- copy jobs ---------------------------------------------------------------

    async def copy_range(
        self, offset: int, length: int, copy: Callable[[Image, Image], Awaitable[int]]
    ) -> int:
        """Run ``copy(primary, secondary)`` exclusively against guest writes to
        ``[offset, offset + length)``; returns its result.  Raises OSError if the
        secondary is gone, or after dropping it if the copy fails or hangs."""
        end = offset + length
        self._copy_range = (offset, end)
        self._copy_idle.clear()
        try:
            while any(_overlap(span, offset, end) for span in self._writes.values()):
                self._writes_done = asyncio.Event()
                await self._writes_done.wait()
            secondary = self.secondary
            if secondary is None or self.standby:
                raise OSError(errno.EIO, f"the mirror is gone: {self.failure}")
            try:
                return await asyncio.wait_for(copy(self.inner, secondary), self.timeout)
            except TimeoutError:
                self.drop(f"copying at {offset} took more than {self.timeout:g} s")
                raise OSError(errno.ETIMEDOUT, self.failure) from None
            except (OSError, ImageError) as exc:
                self.drop(f"copying at {offset} failed: {_reason(exc)}")
                raise
        finally:
            self._writes_done = None
            self._copy_range = None
            self._copy_idle.set()

    async def flush_secondary(self) -> None:
        """Make the secondary durable; OSError (after dropping it) if it cannot be."""
        await self._on_secondary("flush", lambda image: image.flush())
        if self.secondary is None:
            raise OSError(errno.EIO, f"the mirror is gone: {self.failure}")

    def _release_waiters(self) -> None:
        if self._writes_done is not None:
            self._writes_done.set()

    # -- the Image interface -----------------------------------------------------

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if self.mirroring:
            return False
        return self.inner.write_nowait(offset, data)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        if self.mirroring:
            return False  # both images, in write
        return self.inner.start_write(offset, data, fua, done)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self._both(offset, len(data), "write", lambda image: image.write(offset, data, fua))

    async def flush(self) -> None:
        if not self.mirroring:
            await self.inner.flush()
            return
        primary = asyncio.ensure_future(self.inner.flush())
        await self._on_secondary("flush", lambda image: image.flush())
        await primary

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        # Formats discard at their own granularity (clusters, pages, bytes), so the
        # secondary is made to read what the primary reads afterwards, not trimmed alike.
        await self._both(
            offset,
            length,
            "trim",
            lambda image: image.discard(offset, length, fua),
            lambda image: self._match(image, offset, length, fua),
        )

    async def _match(self, secondary: Image, offset: int, length: int, fua: bool) -> None:
        """Make ``[offset, offset + length)`` of the secondary what the primary holds:
        zeroes (which may unmap) where it reads zeros, a copy where it holds data."""
        end = offset + length
        while offset < end:
            extent = (await self.inner.extents(offset, end - offset))[0]
            count = min(max(extent.length, 1), end - offset)
            if extent.flags & (ExtentFlags.HOLE | ExtentFlags.ZERO):
                await secondary.write_zeroes(offset, count, may_unmap=True, fua=fua)
            else:
                count = min(count, MATCH_CHUNK)
                buf = memoryview(bytearray(count))
                await self.inner.read(offset, buf)
                await secondary.write(offset, buf, fua)
            offset += count

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        async def zero(image: Image) -> None:
            # The secondary zeroes however it can: FAST_ZERO is the primary's promise.
            fast = fast_only and image is self.inner
            await image.write_zeroes(offset, length, may_unmap=may_unmap, fast_only=fast, fua=fua)

        await self._both(offset, length, "write-zeroes", zero)

    async def release(self) -> None:
        """Close the secondary, and wait a while for those dropped to close, but not the
        primary: for a layer taken out of a running stack."""
        secondary, self.secondary = self.secondary, None
        self._release_waiters()
        if secondary is not None:
            await _close_quietly(secondary)
        if self._closing:  # a hung secondary must not hang the device's close
            await asyncio.wait(self._closing, timeout=self.timeout)

    async def close(self) -> None:
        await self.release()
        for image in self._retired:
            await _close_quietly(image)
        await self.inner.close()


def _reason(exc: Exception) -> str:
    """An error as a short reason: the errno's text alone when it has one."""
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _overlap(span: tuple[int, int], start: int, end: int) -> bool:
    return span[0] < end and start < span[1]


async def _close_quietly(image: Image) -> None:
    """Close an image whose data no longer matters to the device; log a failure."""
    try:
        await image.close()
    except Exception as exc:  # a dropped secondary may fail in any way; the VBD runs on
        log.warning("closing %s failed: %s", image.spec, exc)
