"""One virtual block device: an image stack behind a scheduler, pausable and replaceable.

A ``VBD`` is itself an ``Image``, so ``tapdisk.export.Export(name, vbd)`` serves
it unchanged and every connection to it (NBD clients, kernel sockets) shares
one queue, one set of statistics and one pause state.  Requests go through the
``Scheduler`` (queueing, merging, retry); page-cache hits still take the
``read_nowait``/``write_nowait`` shortcut while the device runs, and any error
there falls back to the queued path so that it is retried.  A hit is timed with
a ``perf_counter_ns`` pair (tens of nanoseconds against the microseconds of the
copy) so that its latency and busy time are real, not zero.  Reads and writes an
image starts itself (librbd's) skip the queue while the device runs
(``Scheduler.start_read``).

Pause quiesces the scheduler (new requests wait, in-flight ones drain),
flushes and closes the image.  Unpause opens the same spec or a new one of
the same size, and the waiting requests run against it.  A snapshot is a pause,
an overlay created on the current leaf, and an unpause on the overlay.

Changed-block tracking: a device opened with a CBT log has a ``CbtImage``
(drivers/cbtlayer.py) on top of its stack.  Pause releases the log with the
rest of the stack; unpause tracks into the log it is given, read afresh from
the file (SM may have coalesced into it, or renamed it away and created a new
one, meanwhile), and tracks nothing without one, as blktap's unpause does.
A snapshot keeps tracking into the same log.

Mirroring: open and unpause may add a secondary image (blktap's ``-2``, with
``-s`` for standby), a ``MirrorImage`` (drivers/mirror.py) under the CBT layer;
pause closes it with the rest, and an unpause without one runs without.
``mirror_failed`` (blktap's ``nbd_mirror_failed``) stays set once a secondary
failed, until an unpause with the secondary ``null``.  ``swap`` replaces the
image of a running device behind a brief drain (the live migration's start and
switch, tapdisk/migration.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any, Final

from tapdisk.drivers.base import Capabilities, Extent, Image, ImageError, IoDone
from tapdisk.drivers.cbtlayer import CbtImage
from tapdisk.drivers.fileio import io_pool
from tapdisk.drivers.imageops import create_image
from tapdisk.drivers.mirror import MirrorImage
from tapdisk.drivers.registry import (
    LAYERS,
    OpenOptions,
    open_image,
    parse_spec,
    snapshotter_for,
)

from .scheduler import Scheduler, SchedulerLimits

log = logging.getLogger("tapdisk.vbd")

#: Formats an overlay can be created in.
OVERLAY_FORMATS: Final = ("qcow2", "vhd")
#: Leaf types an overlay can sit on, with the backing format recorded for them.
LEAF_FORMATS: Final = {"raw": "raw", "aio": "raw", "qcow2": "qcow2", "vhd": "vhd"}


class VBDError(Exception):
    """A control operation is not possible in the VBD's current state."""


class VBD(Image):
    """An image stack served as one device; see the module docstring."""

    def __init__(
        self,
        image: Image,
        *,
        options: OpenOptions | None = None,
        limits: SchedulerLimits | None = None,
        name: str | None = None,
    ) -> None:
        self.options = options or OpenOptions()
        self.limits = limits or SchedulerLimits()
        self.name = name or image.spec
        self.size = image.size
        self.read_only = image.read_only
        self.block_size = image.block_size
        self._spec = image.spec
        self._format = image.format_name
        self._caps = image.capabilities
        self._cbt_log = _log_of(image)
        self.scheduler = Scheduler(image, self.limits, self.name)
        self.stats = self.scheduler.stats
        self._lock = asyncio.Lock()
        self._paused = False
        self._closed = False
        self._mirror_failed = False
        self._taken_over = False

    @classmethod
    def open(
        cls,
        spec: str,
        options: OpenOptions | None = None,
        limits: SchedulerLimits | None = None,
        name: str | None = None,
    ) -> VBD:
        """Open ``TYPE:PATH`` (any registered driver or layer) as a VBD."""
        return cls(open_image(spec, options), options=options, limits=limits, name=name)

    # -- identity ----------------------------------------------------------------

    @property
    def spec(self) -> str:  # type: ignore[override]
        """Spec of the image currently behind the device (changes on unpause/snapshot, and
        when a standby takes over)."""
        mirror = self.mirror
        return mirror.spec if mirror is not None and mirror.taken_over else self._spec

    @property
    def format_name(self) -> str:
        return self._format

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def chain(self) -> list[str]:
        """Paths of the open image and of its backing files, leaf first (none while paused)."""
        return [image.spec.partition(":")[2] for image in self.chain_images()]

    def chain_images(self) -> list[Image]:
        """The open image and its backing images, leaf first, under any layer (fault, cbt);
        none while paused."""
        images = []
        image = self.scheduler.image
        while image is not None:
            inner = getattr(image, "inner", None)  # a layer (fault, cbt) wraps the image
            if inner is not None:
                image = inner
                continue
            images.append(image)
            image = image.backing
        return images

    @property
    def cbt_log(self) -> str | None:
        """The CBT log the device marks (while paused: marked before the pause, released now)."""
        return self._cbt_log

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def mirror(self) -> MirrorImage | None:
        """The mirror layer of the running stack, if any."""
        image = self.scheduler.image
        while image is not None and not isinstance(image, MirrorImage):
            image = getattr(image, "inner", None)
        return image

    @property
    def secondary(self) -> str | None:
        """Spec of the secondary the device mirrors to or holds in standby, if any."""
        mirror = self.mirror
        return None if mirror is None or mirror.secondary is None else mirror.secondary.spec

    @property
    def mirror_failed(self) -> bool:
        """A secondary failed and was dropped (blktap's ``nbd_mirror_failed``)."""
        mirror = self.mirror
        return self._mirror_failed or (mirror is not None and mirror.failed)

    @mirror_failed.setter
    def mirror_failed(self, failed: bool) -> None:
        """Carried over from a predecessor process (daemon/handover.py)."""
        self._mirror_failed = failed

    @property
    def taken_over(self) -> bool:
        """A standby took over (``-s``): ``spec`` is the former standby's, until an unpause
        names another image."""
        mirror = self.mirror
        return self._taken_over or (mirror is not None and mirror.taken_over)

    @property
    def pausing(self) -> bool:
        """True while a pause is draining requests."""
        return self.scheduler.paused and not self._paused and not self._closed

    # -- data path ---------------------------------------------------------------

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return self._nowait(False, offset, buf)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        return self._nowait(True, offset, data)

    def _nowait(self, write: bool, offset: int, buf: memoryview) -> bool:
        """The page-cache shortcut while running, counted like a queued request.

        An OSError sends the request down the queued path, which retries it
        (writing the same bytes again there is harmless).
        """
        scheduler = self.scheduler
        image = scheduler.image
        if scheduler.paused or image is None:
            return False
        start = perf_counter_ns()
        try:
            done = image.write_nowait(offset, buf) if write else image.read_nowait(offset, buf)
        except OSError:
            return False
        if not done:
            return False
        ns = perf_counter_ns() - start
        us = ns // 1000
        stats = self.stats
        if write:
            stats.writes += 1
            stats.bytes_written += len(buf)
            stats.write_us += us
        else:
            stats.reads += 1
            stats.bytes_read += len(buf)
            stats.read_us += us
        stats.latency(us)
        if not scheduler.in_flight:
            stats.io_ns += ns  # the device was idle: this hit is all of its busy time
        return True

    def start_read(self, offset: int, buf: memoryview, done: IoDone) -> bool:
        return self.scheduler.start_read(offset, buf, done)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        return self.scheduler.start_write(offset, data, fua, done)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self.scheduler.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self.scheduler.write(offset, data, fua)

    async def flush(self) -> None:
        if self._closed:
            return  # close flushed everything (NBDServer.shutdown flushes after a close)
        await self.scheduler.flush()

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        await self.scheduler.call("discard", lambda image: image.discard(offset, length, fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        await self.scheduler.call(
            "write_zeroes",
            lambda image: image.write_zeroes(
                offset, length, may_unmap=may_unmap, fast_only=fast_only, fua=fua
            ),
        )

    async def extents(self, offset: int, length: int) -> list[Extent]:
        result: list[Extent] = await self.scheduler.call(
            "extents", lambda image: image.extents(offset, length)
        )
        return result

    async def cache(self, offset: int, length: int) -> None:
        await self.scheduler.call("cache", lambda image: image.cache(offset, length))

    async def changed_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs of changed (True) and unchanged bytes from ``offset``, from the CBT log.

        Queued like any request, so a paused device answers once it runs again
        and from the log it then has; ENOTSUP once it tracks nothing.
        """

        async def query(image: Image) -> list[tuple[int, bool]]:
            if not isinstance(image, CbtImage):
                raise OSError(errno.ENOTSUP, f"{self.name} tracks no changed blocks now")
            return image.changed_extents(offset, length)

        result: list[tuple[int, bool]] = await self.scheduler.call("extents", query)
        return result

    async def close(self) -> None:
        """Drain, flush and close the image, fail anything still queued; idempotent."""
        async with self._lock:
            if self._closed:
                return
            await self.scheduler.quiesce()
            self._closed = True
            image = self.scheduler.image
            self.scheduler.image = None
            self.scheduler.close()
            if image is None:
                return
            try:
                if not image.read_only:
                    await image.flush()
            except (OSError, ImageError) as exc:
                log.error("%s: flush at close failed: %s", self.name, exc)
            await image.close()

    # -- control -----------------------------------------------------------------

    async def pause(self) -> None:
        """Queue new requests, drain those in flight, flush and close the image.

        Idempotent.  If the flush fails the device keeps running and the error
        is raised.
        """
        async with self._lock:
            await self._pause()

    async def unpause(
        self,
        spec: str | None = None,
        cbt_log: str | None = None,
        secondary: str | None = None,
        standby: bool = False,
    ) -> None:
        """Reopen the image (or ``spec``, which must have the same size) and run.

        ``cbt_log``: the CBT log to mark from now on; None stops tracking.
        ``secondary``: mirror to it (``standby``: hold it for when the image is
        full); ``null`` runs without one and clears ``mirror_failed``.
        Raises VBDError when the device is not paused or the new image does not
        fit, ImageError when the image or the log cannot be opened; the device
        then stays paused, and its log stays what it was.
        """
        async with self._lock:
            await self._unpause(spec, cbt_log, secondary, standby)

    async def swap(self, change: Callable[[Image], Awaitable[Image]]) -> None:
        """Drain the requests in flight, run on ``change(image)``; new requests wait meanwhile.

        If ``change`` raises, the device runs on as it was and the error is raised.
        """
        async with self._lock:
            if self._closed or self._paused:
                raise VBDError(f"{self.name} is not running")
            scheduler = self.scheduler
            await scheduler.quiesce()
            image = scheduler.image
            assert image is not None
            try:
                new = await change(image)
            except BaseException:
                scheduler.unpause()
                raise
            mirror = self.mirror
            self._mirror_failed |= mirror is not None and mirror.failed
            self._run_on(new)

    async def snapshot(self, path: str, fmt: str = "qcow2") -> str:
        """Pause, create a ``fmt`` overlay at ``path`` over the current leaf, run on it.

        Returns the new spec.  A device that was paused stays paused (on the
        overlay).  On failure the overlay is removed and the device goes back
        to the image it had, running unless it was paused before.
        """
        if fmt not in OVERLAY_FORMATS:
            raise VBDError(f"snapshot format {fmt!r} not supported (use qcow2 or vhd)")
        async with self._lock:
            kind, leaf = parse_spec(self.spec)  # the standby's, if it took over
            if kind in LAYERS or kind not in LEAF_FORMATS:
                raise VBDError(f"cannot snapshot {self._spec}: leaf type {kind!r} has no overlay")
            if os.path.exists(path):
                raise VBDError(f"snapshot target {path} already exists")
            was_paused = self._paused
            await self._pause()
            new_spec = f"{fmt}:{os.path.abspath(path)}"
            try:
                await asyncio.to_thread(create_overlay, path, fmt, kind, leaf, self.size)
                image = await self._open_same_size(new_spec, self._cbt_log)
            except BaseException:
                if os.path.exists(path):
                    os.unlink(path)
                if not was_paused:
                    await self._unpause(None, self._cbt_log)
                raise
            if was_paused:
                await image.close()
                self._spec, self._format = image.spec, image.format_name
            else:
                self._run_on(image)
            log.info("%s: snapshot taken, the leaf is now %s", self.name, new_spec)
            return new_spec

    async def snapshot_in_store(self, name: str) -> str:
        """Pause, snapshot the image inside its own store as ``name``, unpause.

        For images that keep snapshots themselves (RBD): the device stays on its image,
        and the snapshot's read-only spec is returned.  A paused device stays paused.
        """
        async with self._lock:
            kind = parse_spec(self.spec)[0]
            take = snapshotter_for(kind)
            if take is None:
                raise VBDError(f"cannot snapshot {self._spec} in place: {kind} images cannot")
            was_paused = self._paused
            await self._pause()
            try:
                snapshot = await asyncio.to_thread(take, self._spec, name, self.options)
            finally:
                if not was_paused:
                    await self._unpause(None, self._cbt_log)
            log.info("%s: snapshot %s taken", self.name, snapshot)
            return snapshot

    async def _pause(self) -> None:
        if self._closed:
            raise VBDError(f"{self.name} is closed")
        if self._paused:
            return
        scheduler = self.scheduler
        await scheduler.quiesce()
        image = scheduler.image
        assert image is not None
        if not image.read_only:
            try:
                await image.flush()
            except (OSError, ImageError):
                scheduler.unpause()
                raise
        self._mirror_failed = self.mirror_failed
        self._taken_over = self.taken_over
        self._spec = self.spec  # the standby's, if it took over: unpause reopens that
        await image.close()
        scheduler.image = None
        self._paused = True
        log.info("%s: paused", self.name)

    async def _unpause(
        self,
        spec: str | None,
        cbt_log: str | None,
        secondary: str | None = None,
        standby: bool = False,
    ) -> None:
        if self._closed:
            raise VBDError(f"{self.name} is closed")
        if not self._paused:
            raise VBDError(f"{self.name} is not paused")
        if secondary == "null":
            secondary = None
            self._mirror_failed = False
        image = await self._open_same_size(spec or self._spec, cbt_log, secondary, standby)
        self._taken_over = self._taken_over and spec is None
        self._run_on(image)

    async def _open_same_size(
        self,
        spec: str,
        cbt_log: str | None,
        secondary: str | None = None,
        standby: bool = False,
    ) -> Image:
        """Open ``spec`` (under ``cbt_log``) with the device's options; refuse another size."""
        image = await open_stack(spec, self.options, cbt_log, secondary, standby)
        if image.size != self.size:
            await image.close()
            raise VBDError(
                f"{image.spec} has {image.size} bytes but the device has {self.size}; "
                "refusing to change the size of a live device"
            )
        return image

    def _run_on(self, image: Image) -> None:
        """Make ``image`` the device's image and let queued requests run."""
        self._spec = image.spec
        self._format = image.format_name
        self._cbt_log = _log_of(image)
        self._paused = False
        self.scheduler.unpause(image)
        tracking = f", marking changed blocks in {self._cbt_log}" if self._cbt_log else ""
        log.info("%s: running on %s%s", self.name, image.spec, tracking)

    # -- statistics --------------------------------------------------------------

    def stats_dict(self) -> dict[str, Any]:
        """The counters as JSON-ready data; the shape is documented in tapdisk/ctl/protocol.py."""
        scheduler = self.scheduler
        return {
            "spec": self._spec,
            "format": self._format,
            "size": self.size,
            "read_only": self.read_only,
            "paused": self._paused,
            "cbt_log": self._cbt_log,
            "secondary": self.secondary,
            **self.stats.as_dict(),
            "io_time_us": scheduler.io_time_ns() // 1000,
            "in_flight": scheduler.in_flight,
            "queued": scheduler.queued,
        }


async def open_stack(
    spec: str,
    options: OpenOptions,
    cbt_log: str | None,
    secondary: str | None = None,
    standby: bool = False,
) -> Image:
    """Open ``spec``, the mirror layer over it given a ``secondary`` (``null``: none), and,
    given a CBT log, the CBT layer on top (which never creates the log).  An ``nbd:``
    secondary that cannot be opened is left out, with ``nbd_mirror_failed`` set.

    Raises ImageError naming the image, the secondary or the log; nothing stays open then.
    """
    # In the I/O pool, whose thread then serves the image's requests: no second thread.
    image = await asyncio.get_running_loop().run_in_executor(io_pool(), open_image, spec, options)
    if secondary is not None and secondary != "null":
        try:
            image = await with_secondary(image, secondary, options, standby)
        except (ImageError, OSError) as exc:
            if not secondary.startswith("nbd:"):
                await image.close()
                raise
            # As blktap: an NBD mirror that cannot be reached must not stop the guest.
            log.error("%s: secondary %s not opened, running without: %s", spec, secondary, exc)
            image = MirrorImage(image, None, failure=str(exc))
        except BaseException:
            await image.close()
            raise
    if cbt_log is None:
        return image
    try:
        return await asyncio.to_thread(CbtImage, image, cbt_log)
    except BaseException:
        await image.close()
        raise


async def with_secondary(
    image: Image, spec: str, options: OpenOptions, standby: bool = False
) -> MirrorImage:
    """``image`` mirrored to (or, ``standby``, backed up by) the image ``spec`` of its size."""
    secondary = await asyncio.to_thread(open_image, spec, options)
    if secondary.size != image.size:
        await secondary.close()
        raise VBDError(
            f"secondary {secondary.spec} has {secondary.size} bytes but {image.spec} "
            f"has {image.size}"
        )
    return MirrorImage(image, secondary, standby=standby)


def _log_of(image: Image) -> str | None:
    """The CBT log ``image`` marks, if it is the CBT layer."""
    return image.log_path if isinstance(image, CbtImage) else None


def create_overlay(path: str, fmt: str, leaf_kind: str, leaf_path: str, size: int) -> None:
    """Create a ``fmt`` image at ``path`` whose backing file is the leaf.

    Uses the same creator as ``tap-img create -b`` and ``vhd-util snapshot``
    (``drivers.imageops.create_image``).  Raises VBDError naming the failure.
    """
    if fmt == "vhd" and leaf_kind not in ("vhd", "raw", "aio"):
        raise VBDError(f"a vhd overlay cannot sit on a {leaf_kind} image")
    try:
        create_image(
            fmt, path, size, backing=os.path.abspath(leaf_path), backing_fmt=LEAF_FORMATS[leaf_kind]
        )
    except (OSError, ImageError) as exc:
        raise VBDError(f"cannot create overlay {path}: {exc}") from exc
