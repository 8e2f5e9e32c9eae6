"""NBD client images (``nbd:TARGET``): a remote NBD export opened as a disk image.

Targets, after the ``nbd:`` prefix:

- a URI as libnbd reads it: ``nbd://HOST[:PORT]/EXPORT``, ``nbds://…`` (TLS),
  ``nbd+unix:///EXPORT?socket=PATH``, ``nbds+unix://…``, with query parameters such as
  ``tls-certificates=DIR``;
- blktap's forms: ``/path/to/socket`` (a Unix socket), ``HOST:PORT`` (TCP), or the
  name under which a connected socket was handed to this process over its
  ``nbdclient<pid>`` socket (``nbdfds``), as xapi does.

libnbd does the protocol (fixed newstyle, structured replies, ``base:allocation``,
TLS); this module drives its non-blocking ``aio_*`` calls from the asyncio event
loop through the handle's descriptor, so many requests are in flight on one
connection and no thread waits per request.  libnbd is imported on first open,
not with the module: a tapdisk that serves no NBD image never loads it.

A lost connection is re-established in the background with exponential back-off
while requests fail with EAGAIN, which the VBD's scheduler retries until its
deadline; a request caught in flight by the loss is retried the same way.
Resending is safe: every NBD command is idempotent.  A passed descriptor cannot
be reopened, so such an image stays down once its connection is lost.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import stat
from collections.abc import Callable
from typing import Any

from . import nbdfds
from .base import Capabilities, Extent, ExtentFlags, Image, ImageError
from .registry import OpenOptions

log = logging.getLogger("tapdisk.drivers.nbdclient")

#: Largest single NBD request sent; longer reads and writes are split.  32 MiB is
#: the largest payload qemu-nbd and nbdkit accept by default.
MAX_REQUEST = 32 << 20
#: Largest range one TRIM, WRITE_ZEROES or BLOCK_STATUS request covers (counts are 32-bit).
MAX_RANGE = 1 << 30
#: Socket buffers asked for the connection: a 1 MiB write then leaves in one or two
#: sends instead of five, so the two processes wake each other up less often.
SOCKET_BUFFER = 4 << 20
#: Reconnect back-off: first delay, growth, ceiling (seconds).
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
#: How long a request waits for a lost connection to come back before it fails with
#: EAGAIN (and the scheduler retries it, deadline permitting).
RECONNECT_WAIT = 1.0
#: Errors of a connection that is gone, not of the request: reported as EAGAIN.
_CONNECTION_ERRNOS = frozenset(
    {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN, errno.ECONNREFUSED}
)
_HOST_PORT = re.compile(r"^(?P<host>[^:/]+|\[[0-9a-fA-F:]+\]):(?P<port>[0-9]{1,5})$")
META_CONTEXT = "base:allocation"


def open_nbd(path: str, options: OpenOptions) -> NbdImage:
    """Opener registered for ``nbd:``; connects now (blocking: openers run in a thread)."""
    return NbdImage(path, read_only=options.read_only)


def opens_passed_socket(spec: str) -> bool:
    """``spec`` (or the image under its layers) is ``nbd:NAME``, a socket passed to this
    process: once negotiated it cannot be opened again, here or in another process."""
    if spec.startswith("nbd:"):
        target = spec[4:]
    else:
        _, found, target = spec.rpartition(":nbd:")
        if not found:
            return False
    return not ("://" in target or target.startswith("/") or _HOST_PORT.match(target))


def _connector(target: str) -> Callable[[Any], None]:
    """How to connect a fresh libnbd handle to ``target`` (see the module docstring)."""
    if "://" in target:
        return lambda handle: handle.connect_uri(target)
    if target.startswith("/"):
        try:
            mode = os.stat(target).st_mode
        except FileNotFoundError:
            raise ImageError(f"nbd:{target}: no such socket") from None
        if not stat.S_ISSOCK(mode):
            raise ImageError(f"nbd:{target}: not a Unix socket")
        return lambda handle: handle.connect_unix(target)
    match = _HOST_PORT.match(target)
    if match:
        host, port = match["host"].strip("[]"), match["port"]
        return lambda handle: handle.connect_tcp(host, port)
    fd = nbdfds.take(target)
    if fd is None:
        raise ImageError(
            f"nbd:{target}: not a URI, socket path or HOST:PORT, and no descriptor "
            "was passed under that name"
        )
    descriptors = [fd]

    def connect_passed(handle: Any) -> None:
        if not descriptors:
            raise OSError(errno.ENOTCONN, "a passed descriptor cannot be reconnected")
        handle.connect_socket(descriptors.pop())

    return connect_passed


def _connect(spec: str, connector: Callable[[Any], None]) -> Any:
    """A new libnbd handle connected through ``connector``; ImageError in one line if not."""
    import nbd  # lazily: see the module docstring

    handle = nbd.NBD()
    handle.set_request_structured_replies(True)
    handle.add_meta_context(META_CONTEXT)
    handle.set_pread_initialize(False)  # a failed read raises; its buffer is never used
    handle.set_uri_allow_local_file(True)  # tls-psk-file=…; the spec comes from the admin
    try:
        connector(handle)
    except nbd.Error as exc:
        raise ImageError(f"{spec}: cannot connect: {_one_line(exc.string)}") from None
    except OSError as exc:
        raise ImageError(f"{spec}: cannot connect: {exc.strerror}") from None
    return handle


def _one_line(text: str | None) -> str:
    return " ".join((text or "unknown error").split())


class _Wire:
    """One connected handle watched by the event loop in the directions libnbd asks for."""

    def __init__(self, handle: Any, loop: asyncio.AbstractEventLoop, on_dead: Callable) -> None:
        self.handle = handle
        self.loop = loop
        self.fd = handle.aio_get_fd()
        _enlarge_buffers(self.fd)
        self._on_dead = on_dead
        self._writing = False
        self._write_flag = _nbd().AIO_DIRECTION_WRITE
        loop.add_reader(self.fd, self._readable)
        self.update()

    def update(self) -> None:
        """Watch for writability while libnbd has bytes to send (after a command is queued)."""
        if self.handle.aio_get_direction() & self._write_flag:
            if not self._writing:
                self.loop.add_writer(self.fd, self._writable)
                self._writing = True
        elif self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False

    def check(self) -> None:
        """``update``, or report the connection dead (after libnbd met an error).

        Called after every libnbd call that may move the connection: a dead handle has
        closed its socket, and the loop must stop watching that descriptor before it next
        polls (libuv aborts the process on a closed descriptor it was asked to watch).
        """
        if self.handle.aio_is_dead() or self.handle.aio_is_closed():
            self._on_dead(self)
        else:
            self.update()

    def _readable(self) -> None:
        try:
            self.handle.aio_notify_read()
        except _nbd().Error:
            pass  # the connection is dead; check() sees it
        self.check()

    def _writable(self) -> None:
        try:
            self.handle.aio_notify_write()
        except _nbd().Error:
            pass
        self.check()

    def detach(self) -> None:
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False


def _enlarge_buffers(fd: int) -> None:
    """Ask for ``SOCKET_BUFFER`` bytes each way on the connection (the kernel may cap it)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    except OSError:
        pass  # not a socket option this connection has: keep the defaults
    finally:
        sock.close()


_libnbd: Any = None


def _nbd() -> Any:
    """The libnbd module, imported on first use."""
    global _libnbd
    if _libnbd is None:
        import nbd

        _libnbd = nbd
    return _libnbd


class NbdImage(Image):
    """A remote NBD export; what it can do is what the server offered."""

    def __init__(self, target: str, *, read_only: bool = False) -> None:
        self.spec = f"nbd:{target}"
        self._connector = _connector(target)
        handle = _connect(self.spec, self._connector)
        self.size = handle.get_size()
        self.read_only = read_only or bool(handle.is_read_only())
        minimum = handle.get_block_size(_nbd().SIZE_MINIMUM)
        self.block_size = minimum if minimum > 1 else 1
        maximum = handle.get_block_size(_nbd().SIZE_MAXIMUM)
        self._max_request = min(MAX_REQUEST, maximum) if maximum > 0 else MAX_REQUEST
        self._can = {
            "flush": bool(handle.can_flush()),
            "fua": bool(handle.can_fua()),
            "trim": bool(handle.can_trim()) and not self.read_only,
            "zero": bool(handle.can_zero()),
            "fast_zero": bool(handle.can_fast_zero()),
            "extents": bool(handle.can_meta_context(META_CONTEXT)),
            "cache": bool(handle.can_cache()),
        }
        self._caps = Capabilities(
            trim=self._can["trim"],
            zero=not self.read_only,
            fast_zero=self._can["fast_zero"] and not self.read_only,
            extents=self._can["extents"],
            multi_conn=bool(handle.can_multi_conn()),
            cache=self._can["cache"],
        )
        self._handle: Any = handle  # connected, not yet watched by a loop
        self._wire: _Wire | None = None
        #: Futures of the requests in flight on the current wire.
        self._in_flight: set[asyncio.Future[int]] = set()
        self._reconnected: asyncio.Event | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        #: Modifying requests that have ended (acknowledged or failed), and how many of them
        #: the last flush the server completed covers: a flush with nothing new to cover is
        #: not sent.  It starts one behind, so that the first flush always goes out: it may
        #: have to cover writes that a previous tapdisk got acknowledged on this export.
        self._changes = 1
        self._flushed = 0

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "nbd"

    # -- the connection ---------------------------------------------------------------

    async def _wire_up(self) -> _Wire:
        """The live connection, waiting a little for a lost one to come back."""
        if self._wire is not None:
            return self._wire
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"{self.spec}: closed")
        loop = asyncio.get_running_loop()
        if self._handle is not None:
            self._wire = _Wire(self._handle, loop, self._lost)
            self._handle = None
            return self._wire
        self._start_reconnect(loop)
        assert self._reconnected is not None
        try:
            await asyncio.wait_for(self._reconnected.wait(), RECONNECT_WAIT)
        except TimeoutError:
            raise OSError(errno.EAGAIN, f"{self.spec}: not connected, reconnecting") from None
        if self._wire is None:
            raise OSError(errno.EAGAIN, f"{self.spec}: not connected, reconnecting")
        return self._wire

    def _lost(self, wire: _Wire) -> None:
        """The server hung up or the connection broke: fail what was in flight, reconnect."""
        if wire is not self._wire:
            return
        wire.detach()
        self._wire = None
        for future in self._in_flight:
            if not future.done():
                future.set_result(errno.ENOTCONN)
        self._in_flight.clear()
        if not self._closed:
            log.warning("%s: connection lost; reconnecting", self.spec)
            self._start_reconnect(wire.loop)

    def _start_reconnect(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnected = asyncio.Event()
            self._reconnect_task = loop.create_task(self._reconnect(loop))

    async def _reconnect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect again with exponential back-off until it works or the image is closed."""
        delay = BACKOFF_FIRST
        while not self._closed:
            try:
                handle = await asyncio.to_thread(_connect, self.spec, self._connector)
            except ImageError as exc:
                log.debug("%s; retrying in %.2fs", exc, delay)
            else:
                if handle.get_size() != self.size:
                    log.error("%s: the export's size changed; not using it", self.spec)
                elif self._closed:
                    pass
                else:
                    self._wire = _Wire(handle, loop, self._lost)
                    log.info("%s: reconnected", self.spec)
                    assert self._reconnected is not None
                    self._reconnected.set()
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _run(
        self,
        submit: Callable[[Any, Callable[[Any], int]], Any],
        what: str,
        offset: int,
        *,
        modifies: bool = False,
    ) -> None:
        """Submit one aio command through ``submit(handle, completion)`` and await its end.

        ``what`` and ``offset`` name the request in errors; a command that ``modifies`` the
        export is counted, once it has ended, for ``flush``.
        """
        wire = self._wire or await self._wire_up()
        future: asyncio.Future[int] = wire.loop.create_future()

        def completion(error: Any) -> int:
            if not future.done():
                future.set_result(error.value)
            return 1  # retire the command

        self._in_flight.add(future)
        try:
            submit(wire.handle, completion)
        except _nbd().Error as exc:
            self._in_flight.discard(future)
            wire.check()
            code = exc.errno or errno.EIO
            where = f"{self.spec}: {what} at {offset}"
            if wire is not self._wire or code in _CONNECTION_ERRNOS:
                raise OSError(errno.EAGAIN, f"{where}: connection lost") from None
            raise OSError(code, f"{where}: {_one_line(exc.string)}") from None
        # libnbd may have found the connection dead while sending, and closed its socket,
        # without failing the call: the loop must stop watching it now (see ``check``).
        wire.check()
        try:
            code = await future
        finally:
            self._in_flight.discard(future)
            if modifies:  # even a failed one may have changed something
                self._changes += 1
        if code:
            where = f"{self.spec}: {what} at {offset}"
            if code in _CONNECTION_ERRNOS:
                raise OSError(errno.EAGAIN, f"{where}: connection lost")
            raise OSError(code, f"{where}: {os.strerror(code)}")

    # -- I/O ----------------------------------------------------------------------------

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._split(offset, buf, self._read_one)

    async def _read_one(self, offset: int, buf: memoryview) -> None:
        await self._run(lambda h, done: h.aio_pread(buf, offset, done), "read", offset)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        flags = _nbd().CMD_FLAG_FUA if fua and self._can["fua"] else 0

        async def write_one(at: int, part: memoryview) -> None:
            await self._run(
                lambda h, done: h.aio_pwrite(part, at, done, flags), "write", at, modifies=True
            )

        await self._split(offset, data, write_one)
        if fua and not flags:
            await self.flush()

    async def _split(self, offset: int, buf: memoryview, one: Callable) -> None:
        """Run ``one(offset, part)`` over ``buf`` in requests the server accepts, concurrently."""
        step = self._max_request
        if len(buf) <= step:
            await one(offset, buf)
            return
        await asyncio.gather(
            *(one(offset + at, buf[at : at + step]) for at in range(0, len(buf), step))
        )

    async def flush(self) -> None:
        """Flush, unless no modifying request has ended since the last completed flush (an
        idle client's flushes, or the flush at close after the client's own, stay here, and a
        close with its server gone does not wait for it)."""
        covered = self._changes
        if not self._can["flush"] or covered == self._flushed:
            return
        await self._run(lambda h, done: h.aio_flush(completion=done), "flush", 0)
        self._flushed = max(self._flushed, covered)

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        if not self._can["trim"]:
            return
        flags = _nbd().CMD_FLAG_FUA if fua and self._can["fua"] else 0
        for at, count in _ranges(offset, length):
            await self._run(
                lambda h, done, at=at, count=count: h.aio_trim(
                    count, at, completion=done, flags=flags
                ),
                "trim",
                at,
                modifies=True,
            )
        if fua and not flags:
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
        nbd = _nbd()
        if fast_only and not self._can["fast_zero"]:
            raise OSError(errno.ENOTSUP, f"{self.spec}: the server offers no fast zeroing")
        if not self._can["zero"]:
            await self._write_zero_buffers(offset, length, fua)
            return
        flags = 0 if may_unmap else nbd.CMD_FLAG_NO_HOLE
        if fast_only:
            flags |= nbd.CMD_FLAG_FAST_ZERO
        if fua and self._can["fua"]:
            flags |= nbd.CMD_FLAG_FUA
        for at, count in _ranges(offset, length):
            await self._run(
                lambda h, done, at=at, count=count: h.aio_zero(
                    count, at, completion=done, flags=flags
                ),
                "write zeroes",
                at,
                modifies=True,
            )
        if fua and not self._can["fua"]:
            await self.flush()

    async def _write_zero_buffers(self, offset: int, length: int, fua: bool) -> None:
        zeros = memoryview(bytes(min(length, self._max_request)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            await self.write(offset, zeros[:n], fua=fua)
            offset += n

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._can["extents"]:
            return [Extent(length, ExtentFlags.DATA)]
        count = min(length, MAX_RANGE)
        found: list[Extent] = []

        def collect(context: str, at: int, entries: list[int], error: Any) -> int:
            if context == META_CONTEXT and not found:
                found.extend(
                    Extent(entries[i], ExtentFlags(entries[i + 1] & 3))
                    for i in range(0, len(entries) - 1, 2)
                    if entries[i]
                )
            return 0

        await self._run(
            lambda h, done: h.aio_block_status(count, offset, collect, completion=done),
            "block status",
            offset,
        )
        return found or [Extent(length, ExtentFlags.DATA)]

    async def cache(self, offset: int, length: int) -> None:
        if self._can["cache"]:
            for at, count in _ranges(offset, length):
                await self._run(
                    lambda h, done, at=at, count=count: h.aio_cache(count, at, completion=done),
                    "cache",
                    at,
                )

    async def close(self) -> None:
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        wire, self._wire = self._wire, None
        handle = wire.handle if wire is not None else self._handle
        self._handle = None
        if wire is not None:
            wire.detach()
        if handle is not None:
            await asyncio.to_thread(_shutdown, handle)


def _shutdown(handle: Any) -> None:
    """Say NBD_CMD_DISC after the requests in flight; the handle closes when dropped."""
    try:
        if handle.aio_is_ready() or handle.aio_is_processing():
            handle.shutdown()
    except _nbd().Error:
        pass


def _ranges(offset: int, length: int) -> list[tuple[int, int]]:
    """``(offset, count)`` pieces of at most ``MAX_RANGE`` bytes covering the range."""
    end = offset + length
    return [(at, min(MAX_RANGE, end - at)) for at in range(offset, end, MAX_RANGE)]
