"""The request scheduler of one VBD: bounded queue, merging, ordering, retry.

Every request from every NBD connection to a VBD passes through one
``Scheduler``.  Its life, in order:

1. **Slot**: at most ``queue_depth`` requests are queued or in flight; a caller
   beyond that awaits a free slot, which is back-pressure on the connection
   (its task does not finish, so the server stops reading from the socket).
2. **Plug**: the request joins the pending list, and one dispatch is scheduled
   for the end of the current event-loop turn.  Requests that arrive in the
   same turn (a client's pipelined batch) are dispatched together.
3. **Dispatch**: the batch is cut into segments at FLUSH requests (a FLUSH is
   never reordered with the requests around it, and waits for every write
   dispatched before it to complete).  Inside a segment, adjacent reads or
   adjacent writes are merged into one I/O of at most ``max_merge`` bytes.
   The first request of each group is its *leader*: its own coroutine performs
   the group's I/O, so a lone request costs one future and no extra task.
4. **Retry**: transient errors (EAGAIN, EBUSY, EINTR, EIO, ETIMEDOUT — what an
   NFS soft mount returns) are retried with exponential back-off until the
   request's deadline (``timeout`` seconds after its first attempt); then the
   error goes to the caller.  A merged group that fails otherwise is split and
   its requests retried one by one, so only the guilty request sees the error.
5. **Pause**: while paused, dispatch stops (new requests wait in the pending
   list, they do not fail) and a group in back-off goes back to the list, so
   a pause never waits for a retrying request's deadline.

**Direct requests** skip steps 2 and 3: when the image starts requests itself and
ends them in a callback (librbd, ``Image.start_read``/``start_write``), a read or
write that finds the device running and a slot free starts at once, with no task
and no future, on the way from the socket to librbd.  It holds its slot, is
watched and counted, a FLUSH waits for such a write, and a pause waits for it like
any executing request.  If it fails with a transient error, it is retried through the
queue (step 4) before its caller hears of it, its deadline counting from the retry; any
other error goes to the caller at once.

A watchdog logs requests that make no progress for ``watchdog`` seconds.
Statistics are plain integers updated on the request path (see ``iostats.Stats``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from tapdisk.drivers.base import Image, IoDone

from .iostats import Stats

log = logging.getLogger("tapdisk.scheduler")

#: Errnos worth retrying: the device or the network may come back.
TRANSIENT: Final = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ETIMEDOUT})

# Request kinds.
READ: Final = 0
WRITE: Final = 1
FLUSH: Final = 2
OTHER: Final = 3  # discard, write_zeroes, extents, cache: never merged


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """Limits of a VBD's scheduler: queue depth, merge size, retry deadline and back-off,
    watchdog threshold (tap-ctl ``-t`` sets ``timeout``)."""

    queue_depth: int = 256
    max_merge: int = 1 << 20  # bytes; 0 disables merging
    timeout: float = 120.0
    backoff_initial: float = 0.01
    backoff_max: float = 1.0
    watchdog: float = 10.0

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise ValueError(f"queue_depth must be at least 1, got {self.queue_depth}")
        if self.max_merge < 0:
            raise ValueError(f"max_merge must not be negative, got {self.max_merge}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")


def _transient(exc: BaseException | None) -> bool:
    """Whether the failure ``exc`` may pass if the request is tried again (see Retry)."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT


class _Req:
    """One request on its way through the scheduler."""

    __slots__ = (
        "barrier",
        "buf",
        "fn",
        "fua",
        "future",
        "kind",
        "name",
        "nomerge",
        "offset",
        "result",
        "seq",
        "started",
        "submitted",
        "warned",
    )

    def __init__(
        self,
        kind: int,
        name: str,
        offset: int = 0,
        buf: memoryview | None = None,
        fua: bool = False,
        fn: Callable[[Image], Awaitable[Any]] | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.offset = offset
        self.buf = buf
        self.fua = fua
        self.fn = fn
        self.future: asyncio.Future[list[_Req] | None] | None = None
        self.result: Any = None
        self.nomerge = False
        self.seq = 0
        self.barrier = 0
        self.submitted = 0
        self.started = 0.0
        self.warned = 0.0

    def describe(self) -> str:
        if self.buf is not None:
            return f"{self.name} of {len(self.buf)} bytes at offset {self.offset}"
        return self.name


class Scheduler:
    """Queues, merges and retries requests against one (replaceable) image."""

    def __init__(self, image: Image | None, limits: SchedulerLimits, name: str = "vbd") -> None:
        self.image = image
        self.limits = limits
        self.name = name
        self.stats = Stats()
        self.paused = False
        self.closed = False
        self._pending: list[_Req] = []
        self._dispatch_scheduled = False
        self._free = limits.queue_depth
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._active: set[_Req] = set()  # dispatched group leaders
        self._idle: asyncio.Future[None] | None = None
        self._write_seq = 0
        self._writes_active: set[int] = set()
        self._write_waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._busy_since = 0  # monotonic ns when in_flight last went from 0 to 1

    # -- public request API ------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests holding a slot: queued, waiting for a pause to end, or executing."""
        return self.limits.queue_depth - self._free

    def io_time_ns(self) -> int:
        """Nanoseconds with at least one request in flight (node_exporter's io_time)."""
        ns = self.stats.io_ns
        if self._free < self.limits.queue_depth:
            ns += time.monotonic_ns() - self._busy_since
        return ns

    @property
    def queued(self) -> int:
        """Requests not yet dispatched (all of them while paused)."""
        return len(self._pending)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._submit(_Req(READ, "read", offset, buf))

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self._submit(_Req(WRITE, "write", offset, data, fua))

    async def flush(self) -> None:
        await self._submit(_Req(FLUSH, "flush"))

    async def call(self, name: str, fn: Callable[[Image], Awaitable[Any]]) -> Any:
        """Run ``fn(image)`` as a queued, retried, unmerged request; returns its result."""
        return await self._submit(_Req(OTHER, name, fn=fn))

    def start_read(self, offset: int, buf: memoryview, done: IoDone) -> bool:
        """Start a read now, with no task, no queue and no merging, when nothing stands in
        its way: the device runs, a slot is free and nobody waits for one, and the image
        starts reads itself (``Image.start_read``, librbd).  It holds a slot, is watched
        and counted like a queued read, and a pause waits for it; an attempt that fails
        transiently is retried through the queue (back-off, deadline) before ``done`` hears
        of it.

        False, having started nothing: the caller awaits ``read``.  The first request of
        a device always takes the queue (it sets up the watchdog).
        """
        return self._start_direct(_Req(READ, "read", offset, buf), done)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        """``start_read`` for a write, which a FLUSH dispatched after it waits for as for a
        queued one.  Only while nothing is queued: a write never overtakes a queued one."""
        if self._pending:
            return False
        return self._start_direct(_Req(WRITE, "write", offset, data, fua), done)

    # -- pause -------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Stop dispatching and wait until no request is executing."""
        self.paused = True
        while self._active:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def unpause(self, image: Image | None = None) -> None:
        """Dispatch again, against ``image`` when given; queued requests run now."""
        if image is not None:
            self.image = image
        self.paused = False
        self._schedule_dispatch()

    def close(self) -> None:
        """Fail queued requests with ESHUTDOWN and stop the watchdog.

        The owner quiesces first and closes the image itself.
        """
        self.paused = True
        self.closed = True
        pending, self._pending = self._pending, []
        for req in pending:
            if req.future is not None and not req.future.done():
                req.future.set_exception(OSError(errno.ESHUTDOWN, "device closed"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # -- slots -------------------------------------------------------------------

    async def _submit(self, req: _Req) -> Any:
        if self.closed:
            raise OSError(errno.ESHUTDOWN, "device closed")
        if self._free > 0 and not self._slot_waiters:
            self._take_slot()
        else:
            await self._wait_slot()
        try:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
                self._watchdog = loop.call_later(self._watch_period(), self._watch)
            req.future = loop.create_future()
            req.submitted = time.monotonic_ns()
            self._pending.append(req)
            self._schedule_dispatch()
            while True:
                group = await req.future
                if group is None or await self._execute(group):
                    return req.result
        finally:
            self._release_slot()

    def _take_slot(self) -> None:
        self._free -= 1
        if self._free == self.limits.queue_depth - 1:
            self._busy_since = time.monotonic_ns()

    async def _wait_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # the slot was handed to us; pass it on
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the waiter
                return
        self._free += 1
        if self._free == self.limits.queue_depth:
            self.stats.io_ns += time.monotonic_ns() - self._busy_since

    # -- dispatch and merging ----------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled and not self.paused and self._pending:
            self._dispatch_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self.paused or not self._pending:
            return
        batch, self._pending = self._pending, []
        batch = [req for req in batch if not req.future.done()]  # type: ignore[union-attr]
        now = time.monotonic()
        for group in self._groups(batch):
            leader = group[0]
            if len(group) > 1:
                if leader.kind == READ:
                    self.stats.read_merges += len(group) - 1
                else:
                    self.stats.write_merges += len(group) - 1
            self._executing(leader, now)
            assert leader.future is not None
            leader.future.set_result(group)

    def _groups(self, batch: list[_Req]) -> list[list[_Req]]:
        """Cut the batch at flushes and merge adjacent requests inside each segment."""
        groups: list[list[_Req]] = []
        segment: list[_Req] = []
        for req in batch:
            if req.kind == FLUSH:
                groups += self._merge(segment)
                groups.append([req])
                segment = []
            else:
                segment.append(req)
        groups += self._merge(segment)
        return groups

    def _merge(self, segment: list[_Req]) -> list[list[_Req]]:
        limit = self.limits.max_merge
        if len(segment) < 2 or not limit:
            return [[req] for req in segment]
        groups: list[list[_Req]] = []
        mergeable: list[_Req] = []
        for req in segment:
            if req.kind in (READ, WRITE) and not req.nomerge:
                mergeable.append(req)
            else:
                groups.append([req])
        mergeable.sort(key=lambda r: (r.kind, r.offset))
        current: list[_Req] = []
        end = size = 0
        for req in mergeable:
            n = len(req.buf)  # type: ignore[arg-type]
            if current and req.kind == current[0].kind and req.offset == end and size + n <= limit:
                current.append(req)
                size += n
            else:
                if current:
                    groups.append(current)
                current = [req]
                size = n
            end = req.offset + n
        if current:
            groups.append(current)
        return groups

    # -- execution ---------------------------------------------------------------

    async def _execute(self, group: list[_Req]) -> bool:
        """Perform a group with retries; False if it went back to the queue."""
        leader = group[0]
        limits = self.limits
        deadline = leader.started + limits.timeout
        delay = limits.backoff_initial
        try:
            while True:
                image = self.image
                assert image is not None, "dispatched while no image is open"
                try:
                    await self._perform(image, group)
                except Exception as exc:
                    transient = _transient(exc)
                    remaining = deadline - time.monotonic()
                    if transient and remaining > 0 and not self.paused:
                        if delay == limits.backoff_initial:
                            log.info(
                                "%s: %s failed (%s), retrying", self.name, leader.describe(), exc
                            )
                        self.stats.retries += 1
                        await asyncio.sleep(min(delay, remaining))
                        delay = min(delay * 2, limits.backoff_max)
                        if not self.paused:
                            continue
                    if (transient and remaining > 0) or (len(group) > 1 and not transient):
                        # Paused while retrying, or a merged group to retry one by one.
                        for req in group:
                            req.nomerge = req.nomerge or not transient
                        self._requeue(group)
                        return False
                    self._finish(group, exc)
                    raise
                self._finish(group, None)
                return True
        except asyncio.CancelledError:
            self._finish(group[1:], OSError(errno.EIO, "request cancelled"), leader_first=False)
            raise
        finally:
            self._executed(leader)

    def _executing(self, req: _Req, now: float) -> None:
        """``req`` starts executing (queued or direct): a write takes the sequence number a
        later FLUSH waits for, a FLUSH its barrier, and a pause waits for it."""
        if req.kind == WRITE:
            self._write_seq += 1
            req.seq = self._write_seq
            self._writes_active.add(req.seq)
        elif req.kind == FLUSH:
            req.barrier = self._write_seq
        req.started = now
        req.warned = 0.0
        self._active.add(req)

    def _executed(self, req: _Req) -> None:
        """``req`` has stopped executing (ended, failed or requeued): the FLUSHes and the
        pause waiting for it go on."""
        self._active.discard(req)
        if req.seq:
            self._write_done(req.seq)
            req.seq = 0
        if self._idle is not None and not self._active and not self._idle.done():
            self._idle.set_result(None)

    def _start_direct(self, req: _Req, done: IoDone) -> bool:
        """Have the image start ``req`` itself if nothing stands in its way (see
        ``start_read``); it then holds a slot and counts as executing."""
        image = self.image
        if self.paused or image is None or self._loop is None:
            return False
        if self._free <= 0 or self._slot_waiters:
            return False
        ended = partial(self._direct_done, req, done)
        buf = req.buf
        assert buf is not None
        if req.kind == READ:
            started = image.start_read(req.offset, buf, ended)
        else:
            started = image.start_write(req.offset, buf, req.fua, ended)
        if not started:
            return False
        self._take_slot()
        req.submitted = time.monotonic_ns()
        self._executing(req, time.monotonic())
        return True

    def _direct_done(self, req: _Req, done: IoDone, exc: BaseException | None) -> None:
        """A request ``_start_direct`` started has ended: account for it, or queue it again."""
        self._executed(req)
        self._release_slot()
        if not _transient(exc):  # done, or an error another attempt would repeat
            self._account(req, exc, time.monotonic_ns())
            done(exc)
            return
        self.stats.retries += 1
        assert self._loop is not None
        self._loop.create_task(self._again(req, done))

    async def _again(self, req: _Req, done: IoDone) -> None:
        """Retry a failed direct request through the queue, then tell its caller."""
        buf = req.buf
        assert buf is not None
        try:
            if req.kind == READ:
                await self.read(req.offset, buf)
            else:
                await self.write(req.offset, buf, req.fua)
        except Exception as exc:
            done(exc)
            return
        done(None)

    async def _perform(self, image: Image, group: list[_Req]) -> None:
        leader = group[0]
        kind = leader.kind
        if kind == READ:
            if len(group) == 1:
                await image.read(leader.offset, leader.buf)  # type: ignore[arg-type]
                return
            merged = bytearray(sum(len(r.buf) for r in group))  # type: ignore[arg-type]
            await image.read(leader.offset, memoryview(merged))
            pos = 0
            for req in group:
                n = len(req.buf)  # type: ignore[arg-type]
                req.buf[:] = merged[pos : pos + n]  # type: ignore[index]
                pos += n
        elif kind == WRITE:
            if len(group) == 1:
                await image.write(leader.offset, leader.buf, leader.fua)  # type: ignore[arg-type]
                return
            data = b"".join(req.buf for req in group)  # type: ignore[misc]
            await image.write(leader.offset, memoryview(data), any(r.fua for r in group))
        elif kind == FLUSH:
            while any(seq <= leader.barrier for seq in self._writes_active):
                waiter = asyncio.get_running_loop().create_future()
                self._write_waiters.append(waiter)
                await waiter
            await image.flush()
        else:
            leader.result = await leader.fn(image)  # type: ignore[misc]

    def _write_done(self, seq: int) -> None:
        self._writes_active.discard(seq)
        if self._write_waiters:
            waiters, self._write_waiters = self._write_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _requeue(self, group: list[_Req]) -> None:
        """Put a group back at the head of the queue, in its original order."""
        loop = asyncio.get_running_loop()
        for req in group:
            if req.future is None or req.future.done():
                req.future = loop.create_future()
        self._pending[0:0] = sorted(group, key=lambda r: r.submitted)
        self._schedule_dispatch()

    def _finish(
        self, group: list[_Req], exc: BaseException | None, *, leader_first: bool = True
    ) -> None:
        """Account for every request of a group and wake its followers.

        With ``leader_first`` the first request is the leader, which returns or
        raises by itself; every other request's future is completed.
        """
        now = time.monotonic_ns()
        for i, req in enumerate(group):
            self._account(req, exc, now)
            if i == 0 and leader_first:
                continue
            assert req.future is not None
            if req.future.done():
                continue
            if exc is None:
                req.future.set_result(None)
            elif isinstance(exc, OSError):
                req.future.set_exception(OSError(exc.errno, exc.strerror))
            else:
                req.future.set_exception(exc)

    def _account(self, req: _Req, exc: BaseException | None, now: int) -> None:
        """Count one ended request in the statistics (``now`` in monotonic ns)."""
        stats = self.stats
        us = (now - req.submitted) // 1000
        stats.latency(us)
        kind = req.kind
        if exc is not None:
            stats.error(req.name, getattr(exc, "errno", None))
            if kind == READ:
                stats.bytes_read_failed += len(req.buf)  # type: ignore[arg-type]
            elif kind == WRITE:
                stats.bytes_written_failed += len(req.buf)  # type: ignore[arg-type]
        elif kind == READ:
            stats.reads += 1
            stats.bytes_read += len(req.buf)  # type: ignore[arg-type]
            stats.read_us += us
        elif kind == WRITE:
            stats.writes += 1
            stats.bytes_written += len(req.buf)  # type: ignore[arg-type]
            stats.write_us += us
        elif kind == FLUSH:
            stats.flushes += 1
            stats.flush_us += us
        elif req.name == "discard":
            stats.discards += 1
            stats.discard_us += us
        elif req.name == "write_zeroes":
            stats.zeroes += 1
            stats.zeroes_us += us

    # -- watchdog ----------------------------------------------------------------

    def _watch_period(self) -> float:
        return max(self.limits.watchdog / 2, 0.05)

    def _watch(self) -> None:
        now = time.monotonic()
        limit = self.limits.watchdog
        for req in list(self._active):
            if now - req.started >= limit and now - req.warned >= limit:
                req.warned = now
                log.warning(
                    "%s: %s has made no progress for %.0f s",
                    self.name,
                    req.describe(),
                    now - req.started,
                )
        assert self._loop is not None
        self._watchdog = self._loop.call_later(self._watch_period(), self._watch)
