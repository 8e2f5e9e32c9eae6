"""Ceph RBD images: ``rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=NAME][:KEY=VALUE]``.

The spec is qemu's, so one string works in ``qemu-img`` and here; any other
``KEY=VALUE`` is a Ceph option set on the connection, as qemu does, and ``\\:``
escapes a colon.  Cluster and identity default to the ``OpenOptions`` (the YAML
configuration's ``ceph_conf``/``ceph_id``), then to Ceph's own
(``/etc/ceph/ceph.conf``, ``client.admin``).

I/O goes through librbd's asynchronous calls (through ctypes, ``librbd.py``): each
request is submitted from the event loop, librbd signals completions on an eventfd,
and the loop collects them in batches (``Completions``), so many requests are in
flight with no thread per request and no librbd thread ever takes the GIL.  Block
status comes from RBD's diff iteration (an object map makes it cheap).  A snapshot
(``@SNAP``) opens read-only.

Connecting is bounded: librados waits ``client_mount_timeout`` for the monitors
(300 s by default; we lower it), and data operations time out after
``rados_osd_op_timeout`` with ETIMEDOUT, which the VBD retries until its
deadline, so an OSD or monitor restart during I/O reaches no client.  A full pool
(Ceph holds its writes until space is freed) is told apart from that by asking the
monitors: its writes fail with ENOSPC, and a read-write open says so.  librados and
librbd are loaded on first open: a tapdisk serving files never maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from ctypes import byref, c_uint64
from functools import partial
from typing import Any

from .base import Capabilities, Extent, ExtentFlags, Image, ImageError, IoDone
from .librbd import (
    DIFF_CALLBACK,
    EVENT_TYPE_EVENTFD,
    WRITE_ZEROES_FLAG_THICK_PROVISION,
    check,
    encode,
    handle,
    lib,
    mon_command,
)
from .rbdname import RbdName, location_end, parse_name, valid_name
from .registry import NewBacking, OpenOptions

log = logging.getLogger("tapdisk.rbd")

#: Seconds to reach the monitors and authenticate before an open fails.
MOUNT_TIMEOUT = 10
#: Seconds a monitor command (pool lookup) may take before it fails.
MON_OP_TIMEOUT = 10
#: Seconds an OSD operation may wait for an OSD before it fails with ETIMEDOUT (retried).
OSD_OP_TIMEOUT = 15
#: The Objecter's in-flight limits (Ceph's: 1024 ops, 100 MiB), set far above the requests
#: and bytes the VBD and the NBD connections admit, so a submission never waits for them.
OBJECTER_INFLIGHT_OPS = 65536
OBJECTER_INFLIGHT_BYTES = 4 << 30
#: Seconds between two warnings that an image's pool is full.
FULL_WARNING_INTERVAL = 60
#: Largest range one block status call walks, so a huge image answers in pieces.
EXTENTS_WINDOW = 1 << 30


def connect(name: RbdName, options: OpenOptions) -> Any:
    """A connected ``rados_t`` for ``name``, within ``MOUNT_TIMEOUT`` seconds."""
    calls = lib()
    conf = name.conf or options.ceph_conf
    user = name.user or options.ceph_id
    cluster = handle()
    result = calls.rados_create(byref(cluster), encode(user))
    if result < 0:
        who = f"client.{user or 'admin'}"
        raise ImageError(f"rbd:{name}: cannot set up {who}: {os.strerror(-result)}")
    # Ceph's defaults wait 300 s for a cluster that is not there, and forever for an OSD;
    # ours are bounded, and a value the spec gives wins.
    settings = [
        ("client_mount_timeout", str(MOUNT_TIMEOUT)),
        ("rados_mon_op_timeout", str(MON_OP_TIMEOUT)),
        ("rados_osd_op_timeout", str(OSD_OP_TIMEOUT)),
        # librbd's cache acknowledges a write before the OSD has it and reports a failure
        # at the next flush; the VBD retries a failed flush, which then finds nothing to
        # do: a write that timed out would be lost while acknowledged.  Without the cache
        # every write's own completion says whether it is on the OSD.
        ("rbd_cache", "false"),
        # librbd's own dispatch thread costs a wake-up and a hand-over per request (about
        # 20 us of a ~100 us request here); without it the aio call dispatches on the
        # event loop's thread, and never waits there: lock acquisition and image refresh
        # queue the request, and the Objecter's in-flight throttle, the one place that
        # would block, is raised far above what tapdisk lets a device have in flight.
        ("rbd_non_blocking_aio", "false"),
        # librbd copies every write's data unless told the caller keeps it unchanged until
        # the write completes, which ours does (the request owns its buffer, and
        # ``Completions`` keeps it referenced): 15-20% of the event loop's time per
        # 1 MiB write.
        ("rbd_disable_zero_copy_writes", "false"),
        ("objecter_inflight_ops", str(OBJECTER_INFLIGHT_OPS)),
        ("objecter_inflight_op_bytes", str(OBJECTER_INFLIGHT_BYTES)),
        *name.options,
    ]
    try:
        check(calls.rados_conf_read_file(cluster, encode(conf)), "reading the conf")
        for key, value in settings:
            check(calls.rados_conf_set(cluster, key.encode(), value.encode()), f"option {key}")
        check(calls.rados_connect(cluster), "connecting")
    except OSError as exc:
        calls.rados_shutdown(cluster)
        where = f"the Ceph cluster of {conf or 'the default ceph.conf'} as {user or 'admin'}"
        raise ImageError(f"rbd:{name}: cannot connect to {where}: {_reason(exc)}") from None
    return cluster


def _reason(exc: OSError) -> str:
    """The one-line cause of a librados/librbd error, in words a person can act on."""
    if exc.errno in (errno.ETIMEDOUT, errno.EINTR):
        return f"no answer within {MOUNT_TIMEOUT} s (are the monitors up and the address right?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (wrong key or missing capabilities?)"
    if exc.errno == errno.ENOENT:
        return "a file it names does not exist (conf or keyring)"
    return str(exc.strerror or exc)


def pool_full(cluster: Any, pool: str) -> bool:
    """Whether the monitors' OSD map marks ``pool`` (or the whole cluster) full, when Ceph
    holds writes until space is freed: they wait, then time out like an absent OSD.  False
    when the monitors cannot say (no answer, or a key without ``osd`` read capability)."""
    try:
        osd_map = json.loads(mon_command(cluster, '{"prefix": "osd dump", "format": "json"}'))
    except (OSError, ValueError):
        return False
    if "full" in osd_map.get("flags", "").split(","):
        return True
    return any(
        entry.get("pool_name") == pool and "full" in entry.get("flags_names", "").split(",")
        for entry in osd_map.get("pools", [])
    )


def _open_pool(cluster: Any, name: RbdName) -> Any:
    """The ``rados_ioctx_t`` of the image's pool and namespace; ImageError if there is none."""
    calls = lib()
    ioctx = handle()
    result = calls.rados_ioctx_create(cluster, name.pool.encode(), byref(ioctx))
    if result == -errno.ENOENT:
        raise ImageError(f"rbd:{name}: no pool {name.pool!r} in the cluster")
    if result < 0:
        raise ImageError(f"rbd:{name}: cannot open pool {name.pool!r}: {os.strerror(-result)}")
    calls.rados_ioctx_set_namespace(ioctx, name.namespace.encode())
    return ioctx


def create_rbd(path: str, size: int, backing: NewBacking | None, options: dict[str, str]) -> None:
    """Creator registered for ``rbd:``: a new image with Ceph's default features."""
    if backing is not None:
        raise ImageError(f"rbd:{path}: an rbd image has no backing file here (use rbd clone)")
    name = parse_name(path)
    if name.snapshot is not None:
        raise ImageError(f"rbd:{name}: create the image, then snapshot it")
    calls = lib()
    cluster = connect(name, OpenOptions())
    try:
        ioctx = _open_pool(cluster, name)
        defaults = handle()
        calls.rbd_image_options_create(byref(defaults))
        try:
            result = calls.rbd_create4(ioctx, name.image.encode(), size, defaults)
        finally:
            calls.rbd_image_options_destroy(defaults)
            calls.rados_ioctx_destroy(ioctx)
        if result == -errno.EEXIST:
            raise ImageError(f"rbd:{name}: the image already exists")
        if result < 0:
            raise ImageError(f"rbd:{name}: cannot create the image: {os.strerror(-result)}")
    finally:
        calls.rados_shutdown(cluster)


def open_rbd(path: str, options: OpenOptions) -> RbdImage:
    """Opener registered for ``rbd:``: connect, open the pool and the image."""
    name = parse_name(path)
    calls = lib()
    cluster = connect(name, options)
    try:
        ioctx = _open_pool(cluster, name)
        read_only = options.read_only or name.snapshot is not None
        opener = calls.rbd_open_read_only if read_only else calls.rbd_open
        image = handle()
        result = opener(ioctx, name.image.encode(), byref(image), encode(name.snapshot))
        if result < 0:
            calls.rados_ioctx_destroy(ioctx)
            if result == -errno.ENOENT:
                what = f"snapshot {name.snapshot!r} of " if name.snapshot else ""
                where = str(name).split("@")[0]
                raise ImageError(f"rbd:{name}: no {what}image {where!r}")
            reason = _open_failure(cluster, name, result, read_only)
            raise ImageError(f"rbd:{name}: cannot open the image: {reason}")
    except BaseException:
        calls.rados_shutdown(cluster)
        raise
    return RbdImage(path, name, (cluster, ioctx, image), read_only=read_only)


def _open_failure(cluster: Any, name: RbdName, result: int, read_only: bool) -> str:
    """Why ``rbd_open`` failed with ``result``: a timeout is the OSDs' (a read-write open
    writes, which a full pool holds), anything else ``_reason``'s."""
    if result != -errno.ETIMEDOUT:
        return _reason(OSError(-result, os.strerror(-result)))
    if not read_only and pool_full(cluster, name.pool):
        return f"pool {name.pool!r} is full (a read-write open writes; read-only opens work)"
    return f"no OSD answered within {OSD_OP_TIMEOUT} s (is an OSD of pool {name.pool!r} up?)"


def create_snapshot(spec: str, name: str, options: OpenOptions) -> str:
    """Snapshotter registered for ``rbd:``: RBD snapshot ``name`` of the image of ``spec``."""
    kind, _, path = spec.partition(":")
    image = parse_name(path)
    if kind != "rbd" or image.snapshot is not None:
        raise ImageError(f"{spec}: only an rbd image's head can be snapshotted")
    if not valid_name(name):
        raise ImageError(f"{spec}: bad snapshot name {name!r}")
    opened = open_rbd(path, options)
    try:
        opened.snapshot(name)
    finally:
        opened._release()
    cut = location_end(path)
    return f"rbd:{path[:cut]}@{name}{path[cut:]}"


class RbdImage(Image):
    """An RBD image (or snapshot) open through librbd."""

    def __init__(
        self, path: str, name: RbdName, handles: tuple[Any, Any, Any], *, read_only: bool
    ) -> None:
        self.spec = f"rbd:{path}"
        self.name = name
        self.read_only = read_only
        self._calls = calls = lib()
        self._cluster, self._ioctx, self._image = handles
        size = c_uint64()
        check(calls.rbd_get_size(self._image, byref(size)), f"{self.spec}: size")
        self.size = size.value
        #: librbd caches writes (a spec turned rbd_cache back on): FUA needs a flush.
        #: Without the cache a write completes once the OSDs have committed it.
        value = ctypes.create_string_buffer(16)
        calls.rados_conf_get(self._cluster, b"rbd_cache", value, len(value))
        self._cached = value.value == b"true"
        self._completions: Completions | None = None
        self._full_warned = -float(FULL_WARNING_INTERVAL)
        writable = not read_only
        self._caps = Capabilities(
            trim=writable, zero=writable, fast_zero=writable, extents=True, multi_conn=True
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "rbd"

    def _submit(
        self, start: Callable[[Any], int], keep: Any = None, *, modifies: bool = False
    ) -> asyncio.Future[None]:
        """Start one librbd aio call; the future settles on the event loop.

        ``start(completion)`` submits the call; ``keep`` (the buffer librbd reads or
        fills) stays referenced until librbd is done with it, even if the caller is
        cancelled meanwhile.  A call that ``modifies`` the image ends through
        ``_modify_ended``.
        """
        # asyncio.get_running_loop() costs a getpid() system call: asked only when the
        # loop the completions were collected on is gone (or there is none yet).
        completions = self._attached() or self._attach(asyncio.get_running_loop())
        future = completions.loop.create_future()
        ended = partial(_settle, future)
        completions.submit(start, keep, partial(self._modify_ended, ended) if modifies else ended)
        return future

    def _attach(self, loop: asyncio.AbstractEventLoop) -> Completions:
        """Collect this image's completions on ``loop`` (the first, or a new, event loop)."""
        if self._completions is None:
            self._completions = Completions(self._image, loop)
        else:
            self._completions.move_to(loop)
        return self._completions

    def _read_call(self, offset: int, buf: memoryview) -> tuple[Callable[[Any], int], Any]:
        """The aio call that fills ``buf`` (librbd writes into it), and what to keep."""
        length = len(buf)
        target, address = _pinned(buf)
        image, aio_read = self._image, self._calls.rbd_aio_read2
        return lambda completion: aio_read(image, offset, length, address, completion, 0), target

    def _write_call(self, offset: int, data: memoryview) -> tuple[Callable[[Any], int], Any]:
        """The aio call that writes ``data`` (librbd sends from it), and what to keep; a
        read-only buffer, which ctypes cannot point into, is copied once."""
        self._check_writable()
        length = len(data)
        source, address = _pinned(bytearray(data) if data.readonly else data)
        image, aio_write = self._image, self._calls.rbd_aio_write2
        return lambda completion: aio_write(image, offset, length, address, completion, 0), source

    def _check_writable(self) -> None:
        """EROFS for a write, discard or zeroing on a read-only image (a snapshot, or opened
        read-only): librbd never completes such a request (measured: the request and the
        image's close would wait forever), so it is refused before it reaches librbd."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.spec}: the image is read-only")

    def _attached(self) -> Completions | None:
        """The completions collected on the running loop; None before the first awaited
        request (or the first on a new loop), which attaches them."""
        completions = self._completions
        if completions is None or completions.loop.is_closed():
            return None
        return completions

    def _modify_ended(self, done: IoDone, error: BaseException | None) -> None:
        """The end of a write, discard or zeroing: a timeout is first checked for a full pool
        (off the loop), where it becomes ENOSPC (not retried: space has to be freed first)."""
        if not _timed_out(error):
            done(error)
            return
        loop = asyncio.get_running_loop()
        asked = loop.run_in_executor(None, pool_full, self._cluster, self.name.pool)
        asked.add_done_callback(
            lambda full: done(self._pool_full_error() if full.result() else error)
        )

    def _pool_full_error(self) -> OSError:
        """ENOSPC for a write to the full pool, warned about once a minute at most."""
        message = f"{self.spec}: pool {self.name.pool!r} is full: Ceph refuses writes"
        now = time.monotonic()
        if now - self._full_warned >= FULL_WARNING_INTERVAL:
            self._full_warned = now
            log.warning("%s until space is freed; they fail with ENOSPC", message)
        return OSError(errno.ENOSPC, message)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._submit(*self._read_call(offset, buf))

    def start_read(self, offset: int, buf: memoryview, done: IoDone) -> bool:
        """The read without a task or a future: ``done`` is called from ``Completions``."""
        completions = self._attached()
        if completions is None:
            return False
        completions.submit(*self._read_call(offset, buf), done)
        return True

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self._submit(*self._write_call(offset, data), modifies=True)
        if fua and self._cached:
            await self.flush()

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        """The write without a task or a future (FUA too, unless librbd caches writes)."""
        completions = self._attached()
        if completions is None or (fua and self._cached):
            return False
        completions.submit(*self._write_call(offset, data), partial(self._modify_ended, done))
        return True

    async def flush(self) -> None:
        image, aio_flush = self._image, self._calls.rbd_aio_flush
        await self._submit(lambda done: aio_flush(image, done))

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        image, aio_discard = self._image, self._calls.rbd_aio_discard
        await self._submit(lambda done: aio_discard(image, offset, length, done), modifies=True)
        if fua and self._cached:
            await self.flush()

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        # librbd zeroes by deallocating whole objects and zeroing partial ones, or, when the
        # range must stay allocated (NBD's NO_HOLE), by a write-same of zeroes that the OSDs
        # expand: neither sends the zeroes, so both are fast.
        self._check_writable()
        image, aio_zero = self._image, self._calls.rbd_aio_write_zeroes
        flags = 0 if may_unmap else WRITE_ZEROES_FLAG_THICK_PROVISION
        await self._submit(
            lambda done: aio_zero(image, offset, length, done, flags, 0), modifies=True
        )
        if fua and self._cached:
            await self.flush()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        length = min(length, EXTENTS_WINDOW, self.size - offset)
        return await asyncio.to_thread(self._diff, offset, length)

    def _diff(self, offset: int, length: int) -> list[Extent]:
        """Allocated runs from RBD's diff iteration, with the gaps between them as holes."""
        runs: list[tuple[int, int]] = []

        def allocated(start: int, run: int, exists: int, _arg: Any) -> int:
            if exists:
                runs.append((start, run))
            return 0

        callback = DIFF_CALLBACK(allocated)  # referenced until the call returns
        iterate = self._calls.rbd_diff_iterate2
        check(iterate(self._image, None, offset, length, 1, 0, callback, None), self.spec)
        result: list[Extent] = []
        pos, end = offset, offset + length
        for start, run in sorted(runs):
            if start > pos:
                result.append(Extent(start - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
            stop = min(start + run, end)
            if stop > max(start, pos):
                result.append(Extent(stop - max(start, pos), ExtentFlags.DATA))
            pos = max(pos, stop)
        if pos < end:
            result.append(Extent(end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
        return result

    def snapshot(self, name: str) -> None:
        """Create RBD snapshot ``name`` (blocking); ImageError naming it when librbd refuses."""
        result = self._calls.rbd_snap_create(self._image, name.encode())
        if result == -errno.EEXIST:
            raise ImageError(f"{self.spec}: snapshot {name!r} already exists")
        if result < 0:
            reason = _reason(OSError(-result, os.strerror(-result)))
            raise ImageError(f"{self.spec}: cannot snapshot as {name!r}: {reason}")

    async def close(self) -> None:
        completions = self._completions
        if completions is not None and not completions.loop.is_closed():
            await completions.settled()
            completions.detach()
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        calls = self._calls
        try:
            calls.rbd_close(self._image)  # waits for what is in flight
            calls.rados_ioctx_destroy(self._ioctx)
        finally:
            calls.rados_shutdown(self._cluster)
            if self._completions is not None:
                self._completions.close()


def _pinned(buf: memoryview | bytearray) -> tuple[Any, int]:
    """A ctypes object over writable ``buf``'s first byte, which keeps the buffer from
    moving while librbd uses it, and the buffer's address (one c_char, not an array type
    made for each length)."""
    pin = ctypes.c_char.from_buffer(buf) if len(buf) else (ctypes.c_char * 0).from_buffer(buf)
    return pin, ctypes.addressof(pin)


def _timed_out(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ETIMEDOUT


def _request_error(result: int) -> OSError:
    """The error a request's negative librbd result stands for."""
    return OSError(-result, f"rbd: {os.strerror(-result)}")


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Settle ``future`` as its request ended: done, or ``error``."""
    if future.done():
        return  # the awaiting caller was cancelled
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


class Completions:
    """librbd's completions for one image, collected on the event loop.

    librbd writes to an eventfd as requests complete (``rbd_set_image_notification``);
    the loop, woken once for however many completed meanwhile, takes them all with
    ``rbd_poll_io_events``.  No librbd thread runs Python or waits for the GIL.
    """

    #: Completions taken per ``rbd_poll_io_events`` call.
    BATCH = 64

    def __init__(self, image: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._calls = lib()
        self._image = image
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            result = self._calls.rbd_set_image_notification(image, self._fd, EVENT_TYPE_EVENTFD)
            check(result, "rbd_set_image_notification")
        except BaseException:
            os.close(self._fd)
            raise
        #: completion -> (what to call with its result, the buffer librbd uses until then)
        self._pending: dict[int, tuple[IoDone, Any]] = {}
        #: Settled when nothing is pending any more (``settled``).
        self._idle: asyncio.Future[None] | None = None
        self._slots = (handle * self.BATCH)()
        self.loop = loop
        loop.add_reader(self._fd, self._reap)

    def submit(self, start: Callable[[Any], int], keep: Any, ended: IoDone) -> None:
        """Create a completion and start the call with it; ``ended`` runs on the loop once
        librbd is done, with the request's error or None (raises OSError, having called
        nothing, if librbd refuses the call)."""
        calls = self._calls
        completion = handle()
        check(calls.rbd_aio_create_completion(None, None, byref(completion)), "rbd aio")
        result = start(completion)
        if result < 0:
            calls.rbd_aio_release(completion)
            raise _request_error(result)
        self._pending[completion.value] = (ended, keep)  # type: ignore[index]

    def _reap(self) -> None:
        """On the loop: settle every completion librbd has finished."""
        with contextlib.suppress(BlockingIOError):  # once per wake-up, not per completion
            os.eventfd_read(self._fd)
        calls, image, slots, pending = self._calls, self._image, self._slots, self._pending
        while True:
            count = calls.rbd_poll_io_events(image, slots, self.BATCH)
            for completion in slots[:count]:
                ended, _ = pending.pop(completion)
                result = calls.rbd_aio_get_return_value(completion)
                calls.rbd_aio_release(completion)
                try:
                    ended(None if result >= 0 else _request_error(result))
                except Exception:  # a caller's bug must not strand the rest of the batch
                    log.exception("rbd: a completion's handler failed")
            if count < self.BATCH:
                break
        idle = self._idle
        if idle is not None and not pending and not idle.done():
            idle.set_result(None)

    async def settled(self) -> None:
        """Wait until every request submitted so far has completed (before a close)."""
        while self._pending:
            self._idle = self.loop.create_future()
            await self._idle

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Collect on ``loop`` from now on (the image outlived the loop it was used on)."""
        self.detach()
        self.loop = loop
        loop.add_reader(self._fd, self._reap)

    def detach(self) -> None:
        """Stop watching the eventfd (on the loop, before the image closes)."""
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)

    def close(self) -> None:
        os.close(self._fd)
