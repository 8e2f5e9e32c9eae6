"""One NBD client connection: handshake, then requests until disconnect.

An ``NBDConnection`` (an ``asyncio.BufferedProtocol``) per client socket.
Requests are validated by the codec, then run against the export's image:
reads that hit the page cache are answered inline on the event loop, reads an
image starts itself (librbd's) end in a callback, the rest run as tasks, so many
requests are in flight per connection and replies go out in completion order,
those of one event-loop turn in one system call.

Memory is bounded per connection: reading from the socket pauses while too many
requests or payload bytes are in flight, or replies wait for the client; and per
process for WRITE payloads still arriving and read replies not taken yet
(writebudget.py, replybudget.py).  An idle connection holds no receive buffer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from functools import partial
from typing import Final, Protocol

from tapdisk.drivers.base import Image, ImageError

from . import tls
from .admission import Admission
from .allocator import io_buffer
from .budget import PayloadBudget
from .busypoll import BusyPoller
from .export import MAX_PAYLOAD, DirectAttach, Export
from .idlesweep import IdleSweeper
from .nbd.constants import FUA_BIT, SIMPLE_REPLY, Command, Error, nbd_error
from .nbd.errors import ClientAborted, ProtocolError
from .nbd.handshake import Handshake, Negotiated, StartTLS, connection_flags
from .nbd.transmission import (
    Request,
    RequestReader,
    check_request,
    data_chunk_header,
    done_chunk,
    error_chunk,
    hole_chunk,
    simple_reply,
)
from .replybudget import WRITE_BUFFER_LIMITS, ReplyAccount, ReplyBudget
from .sockets import peer_name, tune_socket
from .tls import ServerTLS
from .writebudget import Reservation

#: The server's logger: everything a client causes is logged as the server's.
log = logging.getLogger("tapdisk.server")

#: Zeros to compare read data against: all-zero reads are answered with an
#: OFFSET_HOLE chunk instead of the data when structured replies are on.
ZEROS: Final = bytes(MAX_PAYLOAD)
#: Requests in flight on one connection before we stop reading from it.
MAX_IN_FLIGHT: Final = 256
#: Payload bytes (write data being stored, read data being sent) per connection
#: before we stop reading from it.
MAX_BYTES_IN_FLIGHT: Final = 128 * 1024 * 1024
#: Batched inline replies are handed to the transport once they reach this size.
BATCH_BYTES: Final = 1024 * 1024
#: Every connection's handshake bytes land here and are copied out at once (one receive at a time).
_HANDSHAKE_BUFFER: Final = bytearray(4096)
_HANDSHAKE_VIEW: Final = memoryview(_HANDSHAKE_BUFFER)
#: The commands ``_dispatch`` tests for on every request, as plain ints (an enum member is
#: an attribute lookup on its class).
_READ: Final = int(Command.READ)
_WRITE: Final = int(Command.WRITE)
_DISC: Final = int(Command.DISC)


class AcceptingServer(Protocol):
    """What a connection reads from, and records in, the server that accepted it
    (``server.NBDServer``)."""

    exports: dict[str, Export]
    handshake_timeout: float
    admission: Admission
    write_budget: PayloadBudget
    reply_budget: ReplyBudget
    closing: bool
    connections: set[NBDConnection]
    sweeper: IdleSweeper
    poller: BusyPoller
    tls: ServerTLS | None

    def handshake(self) -> Handshake: ...


class NBDConnection(asyncio.BufferedProtocol):
    """One client connection: handshake, then requests until disconnect."""

    def __init__(
        self, server: AcceptingServer, direct: DirectAttach | Handshake | None = None
    ) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: Subject of log messages: the export once known (at once when the server has
        #: only one), else the peer.
        self.subject = "?"
        self._direct = direct  # no handshake, or one a predecessor began (handover.py)
        self._handshake: Handshake | None = None
        self._timeout: asyncio.TimerHandle | None = None
        self._reader = RequestReader(MAX_PAYLOAD)
        self._tasks: set[asyncio.Task[None]] = set()
        # Replies collected while dispatching one receive's requests inline.
        self._batch: list[bytes | bytearray] | None = None
        self._batch_bytes = 0
        # Decoded requests waiting while the connection is over its limits.
        self._backlog: collections.deque[Request] = collections.deque()
        self._in_flight = 0
        self._bytes_in_flight = 0
        self._read_paused = False
        self._write_paused = False
        self._payload_hold = Reservation(server.write_budget)
        self._replies = ReplyAccount(server.reply_budget, self)
        self._held = False  # reading stopped for a hand-over (daemon/handover.py)
        self._disconnecting = False
        #: asyncio.get_running_loop() costs a getpid() system call: asked once.
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        #: The socket, read directly while busy-polling (-1: not pollable).
        self._fd = -1
        # Set when transmission begins.
        self.export: Export | None = None
        self.image: Image | None = None
        self.flags = 0
        self.structured = False
        #: The (id, name) of each metadata context the client selected.
        self.contexts: tuple[tuple[int, str], ...] = ()
        self._block_status_ok = False
        self._size = 0

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.server.sweeper.arrived()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
            self._fd = sock.fileno()
        self.peer = peer_name(transport)
        exports = list(self.server.exports.values())
        self.subject = self._subject(exports[0]) if len(exports) == 1 else self.peer
        if isinstance(self._direct, DirectAttach):
            d = self._direct
            export = self.server.exports[d.export]
            flags = d.flags or connection_flags(export.info, structured=False)
            self.server.admission.handed_in(self)
            self._begin_transmission(Negotiated(export.info, flags, d.structured, d.contexts))
            self._feed(d.unread)  # what a predecessor read and did not decode (handover.py)
            return
        if self.server.closing:
            transport.abort()
            return
        if not self.server.admission.admit(self):
            transport.abort()
            return
        self._handshake = self._direct or self.server.handshake()
        transport.write(self._handshake.take_output())
        loop = asyncio.get_running_loop()
        self._timeout = loop.call_later(self.server.handshake_timeout, self._handshake_timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._handshake is not None:
            return _HANDSHAKE_VIEW
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._handshake is not None:
            self._received(nbytes)
            return
        poller = self.server.poller
        poller.woke()
        self._received(nbytes)
        poller.spin()

    def _received(self, nbytes: int) -> None:
        try:
            if self._handshake is not None:
                self._handshake_received(bytes(_HANDSHAKE_BUFFER[:nbytes]))
                return
            self._dispatch_all(self._reader.buffer_updated(nbytes))
            if self._reader.payload_bytes != self._payload_hold.held:
                self._hold_payload()
        except ProtocolError as exc:
            log.warning("%s: protocol error, closing connection: %s", self.subject, exc)
            self._abort()
        except ClientAborted:
            self._close_when_drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.admission.gone(self)
        self._payload_hold.close()
        self._replies.close()
        self.server.poller.unregister(self)
        if self._timeout is not None:
            self._timeout.cancel()
        self._disconnecting = True
        self._backlog.clear()
        self._maybe_finished()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._replies.drained()
        self.reply_room()

    # -- handshake ---------------------------------------------------------------

    def _handshake_received(self, data: bytes) -> None:
        assert self._handshake is not None and self.transport is not None
        try:
            negotiated = self._handshake.receive(data)
        finally:
            # Replies queued before ClientAborted (the ABORT's own ACK) still go out.
            output = self._handshake.take_output()
            if output:
                self.transport.write(output)
        if isinstance(negotiated, StartTLS):
            tls.in_background(self._start_tls())
        elif negotiated is not None:
            if not self.server.admission.negotiated(self):
                self._abort()
                return
            leftover = self._handshake.leftover
            self._begin_transmission(negotiated)
            self._feed(leftover)

    async def _start_tls(self) -> None:
        """Switch to TLS (the STARTTLS ACK is queued); the handshake resumes inside it."""
        tls, transport = self.server.tls, self.transport
        assert tls is not None and transport is not None
        self._fd = -1  # the socket now carries ciphertext: never busy-poll it
        try:
            self.transport = await tls.upgrade(transport, self)
        except (OSError, TimeoutError) as exc:
            log.warning("%s: TLS handshake failed, closing: %s", self.subject, exc)
            self.connection_lost(exc)  # the event loop does not tell us

    def _subject(self, export: Export) -> str:
        """The export's label, and the client's address where it has one (TCP)."""
        return export.label if self.peer == "unix" else f"{export.label} (client {self.peer})"

    def _handshake_timed_out(self) -> None:
        timeout = self.server.handshake_timeout
        log.warning("%s: handshake not finished in %.0f s, closing", self.subject, timeout)
        self._abort()

    def evict(self) -> None:
        """Closed to let others in (admission.py) or let their replies fit (replybudget.py)."""
        self._abort()

    def _begin_transmission(self, negotiated: Negotiated) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        self._handshake = None
        self.export = self.server.exports[negotiated.export.name]
        self.image = self.export.image
        self.subject = self._subject(self.export)
        self._size = negotiated.export.size
        self.flags = int(negotiated.flags)  # plain int: checked on every request
        self.structured = negotiated.structured
        self.contexts = negotiated.contexts
        self._block_status_ok = bool(negotiated.contexts)
        if self._fd >= 0:  # a plain socket (TLS copies replies: its usual marks do)
            self.transport.set_write_buffer_limits(*WRITE_BUFFER_LIMITS)  # type: ignore[union-attr]
            self.server.poller.register(self)

    # -- busy-polling (see busypoll.py) --------------------------------------------

    def poll_ready(self) -> bool:
        transport = self.transport
        if transport is None or self._in_flight or self._batch or self._read_paused:
            return False  # the client may wait for a reply that has not left
        busy = self._disconnecting or transport.is_closing() or transport.get_write_buffer_size()
        return not busy

    def poll_receive(self) -> bool | None:
        try:
            nbytes = os.readv(self._fd, (self._reader.get_buffer(),))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return None  # the event loop reads it again and reports it
        if not nbytes:
            return None  # end of file: the event loop sees it too
        self._received(nbytes)
        return True

    def _feed(self, data: bytes) -> None:
        """Push bytes that arrived with the handshake through the request reader."""
        view = memoryview(data)
        while view:
            target = self._reader.get_buffer()
            n = min(len(target), len(view))
            target[:n], view = view[:n], view[n:]
            self._received(n)

    def _hold_payload(self) -> None:
        """Hold the write budget for the payload the reader awaits (writebudget.py)."""
        if not self._payload_hold.hold(self._reader.payload_bytes, self._update_reading):
            self._update_reading()  # paused until granted

    def release_idle_buffers(self) -> int:
        return self._reader.release_if_idle()

    # -- requests ----------------------------------------------------------------

    def _dispatch_all(self, requests: list[Request]) -> None:
        """Dispatch decoded requests, parking the rest once the connection is over its limits.

        One receive can carry thousands of requests (say 32 MiB READs); without
        the backlog each would get its buffer before reading could pause.
        """
        if self._backlog:
            self._backlog.extend(request.owned() for request in requests)
            return
        # Replies answered inline are collected and sent with one writev at the
        # end: at queue depth 16 that is one system call instead of sixteen.  A batch
        # already open (replies of reads that ended this turn) takes them too.
        opened = self._batch is None
        if opened:
            self._batch = []
        try:
            for index, request in enumerate(requests):
                if self._read_paused:
                    self._backlog.extend(request.owned() for request in requests[index:])
                    return
                self._dispatch(request)
        finally:
            if opened:
                self._close_batch()

    def _drain_backlog(self) -> None:
        backlog = self._backlog
        while backlog and not self._over_limits():
            self._dispatch(backlog.popleft())

    def _dispatch(self, request: Request) -> None:
        if self._disconnecting:
            return  # nothing may follow DISC
        command = request.command
        error = check_request(request, self.flags, self._size, MAX_PAYLOAD, self._block_status_ok)
        if error is not None:
            self._send_error(request, error, "invalid request")
            return
        if command == _WRITE:
            if request.payload is None:  # zero-length write
                self._ack(request.cookie)
            else:
                self._read_or_write(request, None)
        elif command == _READ:
            if not self._replies.admit(request.length):
                self._backlog.appendleft(request.owned())  # first when there is room
                self._update_reading()
                return
            self._read_or_write(request, io_buffer(request.length))
        elif command == _DISC:
            self._close_when_drained()
        else:
            self._start(self._run(request), 0)

    def _read_or_write(self, request: Request, buf: bytearray | None) -> None:
        """A READ into ``buf``, or a WRITE (``buf`` None), the fastest way the image takes:
        answered at once (page cache), started by the image and ended in ``_ended`` with no
        task (librbd's requests end in a callback), or run in a task."""
        image = self.image
        assert image is not None
        try:
            if buf is not None:
                view = memoryview(buf)
                if image.read_nowait(request.offset, view):
                    self._send_read(request, buf)
                    return
                started = image.start_read(request.offset, view, partial(self._ended, request, buf))
            else:
                fua = bool(request.flags & FUA_BIT)
                if not fua and image.write_nowait(request.offset, memoryview(request.payload)):
                    self._ack(request.cookie)
                    return
                # What follows outlives the receive buffer the payload may be borrowed from.
                request = request.owned()
                payload = memoryview(request.payload)  # type: ignore[arg-type]
                ended = partial(self._ended, request, None)
                started = image.start_write(request.offset, payload, fua, ended)
        except Exception as exc:
            self._fail(request, exc)
            return
        if started:
            self._started(request.length)
        else:
            self._start(self._run(request, buf), request.length)

    def _start(self, coro, nbytes: int) -> None:  # type: ignore[no-untyped-def]
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        task.nbytes = nbytes  # type: ignore[attr-defined]
        self._started(nbytes)

    def _started(self, nbytes: int) -> None:
        self._in_flight += 1
        self._bytes_in_flight += nbytes
        self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: request handler failed", self.subject, exc_info=task.exception())
        self._answered(task.nbytes)  # type: ignore[attr-defined]

    def _answered(self, nbytes: int) -> None:
        """A request has its reply: let the next ones in, and close if that was the last."""
        self._in_flight -= 1
        self._bytes_in_flight -= nbytes
        if self._backlog:
            self._drain_backlog()
        self._update_reading()
        self._maybe_finished()

    def _ended(self, request: Request, buf: bytearray | None, exc: BaseException | None) -> None:
        """A request the image started itself (``start_read``, or ``start_write`` with no
        ``buf``) has ended: reply, then what a task's end does."""
        if exc is not None:
            self._fail(request, exc)  # type: ignore[arg-type]
        elif buf is None:
            self._ack(request.cookie)
        else:
            self._send_read(request, buf)
        self._answered(request.length)

    async def _run(self, request: Request, buf: bytearray | None = None) -> None:
        """A request's task: a READ into ``buf``, or any command but READ and DISC."""
        assert self.export is not None and self.image is not None
        try:
            if buf is not None:
                await self.image.read(request.offset, memoryview(buf))
                self._send_read(request, buf)
                return
            chunks = await self.export.perform(request, self.contexts)
        except Exception as exc:
            self._fail(request, exc)
            return
        if chunks is None:
            self._ack(request.cookie)
        else:
            self._send(*chunks)

    # -- replies -----------------------------------------------------------------

    def _ack(self, cookie: int) -> None:
        """Send a simple reply saying the request succeeded (the hot path of writes)."""
        batch = self._batch
        if batch is None:
            batch = self._open_batch()
        batch.append(simple_reply(cookie))
        self._batch_bytes += SIMPLE_REPLY.size

    def _send(self, *data: bytes | bytearray) -> None:
        """Send one reply (header and payload): collected, and sent with the replies of
        the same event-loop turn (or of the same receive) in one system call."""
        batch = self._batch
        if batch is None:
            batch = self._open_batch()
        batch += data
        self._batch_bytes += sum(map(len, data))
        if self._batch_bytes >= BATCH_BYTES:
            self._flush_batch()

    def _open_batch(self) -> list[bytes | bytearray]:
        """Collect replies until the end of this event-loop turn (the socket's write-buffer
        marks are 0: each write to the transport is a system call)."""
        self._batch = batch = []
        self._loop.call_soon(self._close_batch)
        return batch

    def _close_batch(self) -> None:
        self._flush_batch()
        self._batch = None

    def _flush_batch(self) -> None:
        """Hand the batched replies to the transport (which may pause us)."""
        batch = self._batch
        if batch:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.writelines(batch)
            batch.clear()
            self._batch_bytes = 0
        self._replies.flushed()  # also read replies batched after a flush in _send

    def _send_read(self, request: Request, buf: bytearray) -> None:
        cookie, offset, length = request.cookie, request.offset, request.length
        if not self.structured:
            self._send(simple_reply(cookie), buf)
        elif not length:
            self._send(done_chunk(cookie))
        elif ZEROS.startswith(buf):  # a memcmp: cheap, and it stops at the first data byte
            self._send(hole_chunk(cookie, offset, length))
        else:
            self._send(data_chunk_header(cookie, offset, length), buf)
        self._replies.replied(length)

    def _fail(self, request: Request, exc: Exception) -> None:
        """Answer a request whose I/O raised: every request gets a reply, even after a bug.

        OSError keeps its errno (mapped to NBD's set); metadata errors and
        anything unexpected become EIO and are logged.
        """
        if request.command == _READ:
            self._replies.dropped(request.length)
        if isinstance(exc, OSError):
            self._send_error(request, nbd_error(exc.errno), exc.strerror or str(exc))
            return
        if isinstance(exc, ImageError):
            log.error("%s: %s", self.subject, exc)
        else:
            log.error("%s: request failed", self.subject, exc_info=exc)
        self._send_error(request, Error.EIO, str(exc) or type(exc).__name__)

    def _send_error(self, request: Request, error: int, message: str) -> None:
        if self.structured and request.command in (Command.READ, Command.BLOCK_STATUS):
            self._send(error_chunk(request.cookie, error, message))
        else:
            self._send(simple_reply(request.cookie, error))

    # -- flow control and shutdown -----------------------------------------------

    def _over_limits(self) -> bool:
        return (
            self._write_paused
            or self._in_flight >= MAX_IN_FLIGHT
            or self._bytes_in_flight >= MAX_BYTES_IN_FLIGHT
            or self._replies.blocked
            or self._disconnecting
        )

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self._held or self._over_limits() or self._backlog or self._payload_hold.waiting
        if pause and not self._read_paused:
            transport.pause_reading()
            self._read_paused = True
        elif not pause and self._read_paused:
            transport.resume_reading()
            self._read_paused = False

    def reply_room(self) -> None:
        """A READ waiting for room for its reply may go now (replybudget.py)."""
        self._drain_backlog()
        self._update_reading()

    def _close_when_drained(self) -> None:
        self._disconnecting = True
        self._update_reading()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if not self._disconnecting or self._in_flight:
            return
        self._flush_batch()  # replies collected this turn leave before the close
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _abort(self) -> None:
        self._disconnecting = True
        if self.transport is not None:
            self.transport.abort()

    def hold(self, held: bool = True) -> None:
        """Stop (or resume) reading for a hand-over (daemon/handover.py)."""
        self._held = held
        self._update_reading()

    async def drain_and_close(self) -> None:
        """Server shutdown: stop taking requests, finish those in flight, close."""
        self._close_when_drained()
        await self._closed
