"""One NBD client connection: handshake, then requests until disconnect.

An ``NBDConnection`` (an ``asyncio.BufferedProtocol``) per client socket.
Requests are validated by the codec, then run against the export's image:
reads that hit the page cache are answered inline on the event loop, the rest
run as tasks, so many requests are in flight per connection and replies go out
in completion order.

Memory is bounded per connection: reading from the socket pauses while too many
requests or too many payload bytes are in flight, or while the client is not
reading its replies; and per process for WRITE payloads still arriving
(writebudget.py).  An idle connection holds no receive buffer (idlesweep.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Final, Protocol

from tapdisk.drivers.base import Image, ImageError

from . import tls
from .admission import Admission
from .busypoll import BusyPoller
from .export import MAX_PAYLOAD, DirectAttach, Export
from .idlesweep import IdleSweeper
from .nbd.constants import SIMPLE_REPLY, Command, CommandFlag, Error, nbd_error
from .nbd.errors import ClientAborted, ProtocolError
from .nbd.handshake import Handshake, Negotiated, StartTLS, connection_flags
from .nbd.transmission import (
    Request,
    RequestReader,
    block_status_chunk,
    check_request,
    data_chunk_header,
    done_chunk,
    error_chunk,
    hole_chunk,
    simple_reply,
)
from .sockets import peer_name, tune_socket
from .tls import ServerTLS
from .writebudget import Reservation, WriteBudget

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
#: Command flags as plain ints: ``int & IntFlag`` builds a new IntFlag (0.5 us; 10% of
#: the event loop's time at 120k writes/s), ``int & int`` does not.
_FUA: Final = int(CommandFlag.FUA)
_NO_HOLE: Final = int(CommandFlag.NO_HOLE)
_FAST_ZERO: Final = int(CommandFlag.FAST_ZERO)
_REQ_ONE: Final = int(CommandFlag.REQ_ONE)
#: The commands ``_dispatch`` tests for on every request, as plain ints (an enum member is
#: an attribute lookup on its class).
_READ: Final = int(Command.READ)
_WRITE: Final = int(Command.WRITE)
_DISC: Final = int(Command.DISC)


class AcceptingServer(Protocol):
    """What a connection reads from, and records in, the server that accepted it
    (``server.NBDServer``)."""

    exports: dict[str, Export]
    default_export: str | None
    handshake_timeout: float
    admission: Admission
    write_budget: WriteBudget
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
        self._held = False  # reading stopped for a hand-over (daemon/handover.py)
        self._disconnecting = False
        self._closed = asyncio.get_running_loop().create_future()
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

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.admission.gone(self)
        self._payload_hold.close()
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
        if self._backlog:
            self._drain_backlog()
        self._update_reading()

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
        """Closed by admission.py, still negotiating, to let a newer client in."""
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
        if self._fd >= 0:
            self.server.poller.register(self)

    # -- busy-polling (see busypoll.py) --------------------------------------------

    def poll_ready(self) -> bool:
        transport = self.transport
        return (
            not self._in_flight
            and not self._read_paused
            and not self._disconnecting
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        )

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
            target[:n] = view[:n]
            view = view[n:]
            self._dispatch_all(self._reader.buffer_updated(n))
            if self._reader.payload_bytes != self._payload_hold.held:
                self._hold_payload()

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
        # end: at queue depth 16 that is one system call instead of sixteen.
        self._batch = []
        try:
            for index, request in enumerate(requests):
                if self._read_paused:
                    self._backlog.extend(request.owned() for request in requests[index:])
                    return
                self._dispatch(request)
        finally:
            self._flush_batch()
            self._batch = None

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
        image = self.image
        assert image is not None
        if command == _WRITE:
            payload = request.payload
            if payload is None:  # zero-length write
                self._ack(request.cookie)
                return
            if not request.flags & _FUA:
                try:
                    done = image.write_nowait(request.offset, memoryview(payload))
                except Exception as exc:
                    self._fail(request, exc)
                    return
                if done:
                    self._ack(request.cookie)
                    return
            # The task runs after the receive buffer the payload may be borrowed from is reused.
            self._start(self._run(request.owned()), request.length)
        elif command == _READ:
            buf = bytearray(request.length)
            try:
                done = image.read_nowait(request.offset, memoryview(buf))
            except Exception as exc:
                self._fail(request, exc)
                return
            if done:
                self._send_read(request, buf)
            else:
                self._start(self._read(request, buf), request.length)
        elif command == _DISC:
            self._close_when_drained()
        else:
            self._start(self._run(request), 0)

    def _start(self, coro, nbytes: int) -> None:  # type: ignore[no-untyped-def]
        self._in_flight += 1
        self._bytes_in_flight += nbytes
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        task.nbytes = nbytes  # type: ignore[attr-defined]
        self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._bytes_in_flight -= task.nbytes  # type: ignore[attr-defined]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: request handler failed", self.subject, exc_info=task.exception())
        if self._backlog:
            self._drain_backlog()
        self._update_reading()
        self._maybe_finished()

    async def _read(self, request: Request, buf: bytearray) -> None:
        try:
            await self.image.read(request.offset, memoryview(buf))  # type: ignore[union-attr]
        except Exception as exc:
            self._fail(request, exc)
            return
        self._send_read(request, buf)

    async def _run(self, request: Request) -> None:
        image = self.image
        assert image is not None
        command, flags, offset, length = (
            request.command,
            request.flags,
            request.offset,
            request.length,
        )
        fua = bool(flags & _FUA)
        try:
            if command == Command.WRITE:
                if length:
                    await image.write(offset, memoryview(request.payload), fua)  # type: ignore[arg-type]
            elif command == Command.FLUSH:
                await image.flush()
            elif command == Command.TRIM:
                if length:
                    await image.discard(offset, length, fua)
            elif command == Command.WRITE_ZEROES:
                if length:
                    await image.write_zeroes(
                        offset,
                        length,
                        may_unmap=not flags & _NO_HOLE,
                        fast_only=bool(flags & _FAST_ZERO),
                        fua=fua,
                    )
            elif command == Command.CACHE:
                if length:
                    await image.cache(offset, length)
            elif command == Command.BLOCK_STATUS:
                await self._block_status(request)
                return
        except Exception as exc:
            self._fail(request, exc)
            return
        self._ack(request.cookie)

    async def _block_status(self, request: Request) -> None:
        """One BLOCK_STATUS chunk per selected context, the last one DONE."""
        assert self.export is not None
        if request.length == 0:
            self._send_error(request, Error.EINVAL, "zero-length block status")
            return
        answers = await self.export.block_status(
            self.contexts, request.offset, request.length, bool(request.flags & _REQ_ONE)
        )
        last = len(answers) - 1
        self._send(
            *(
                block_status_chunk(request.cookie, context_id, extents, done=index == last)
                for index, (context_id, extents) in enumerate(answers)
            )
        )

    # -- replies -----------------------------------------------------------------

    def _ack(self, cookie: int) -> None:
        """Send a simple reply saying the request succeeded (the hot path of writes)."""
        batch = self._batch
        if batch is None:
            self._send(simple_reply(cookie))
            return
        batch.append(simple_reply(cookie))
        self._batch_bytes += SIMPLE_REPLY.size

    def _send(self, *data: bytes | bytearray) -> None:
        """Send one reply (header and payload), batched while dispatching inline."""
        batch = self._batch
        if batch is not None:
            batch += data
            self._batch_bytes += sum(map(len, data))
            if self._batch_bytes >= BATCH_BYTES:
                self._flush_batch()
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(data)

    def _flush_batch(self) -> None:
        """Hand the batched replies to the transport (which may pause us)."""
        batch = self._batch
        if not batch:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(batch)
        batch.clear()
        self._batch_bytes = 0

    def _send_read(self, request: Request, buf: bytearray) -> None:
        if not request.length:
            self._send(
                done_chunk(request.cookie) if self.structured else simple_reply(request.cookie)
            )
        elif self.structured:
            if ZEROS.startswith(buf):  # a memcmp: cheap, and it stops at the first data byte
                self._send(hole_chunk(request.cookie, request.offset, request.length))
            else:
                self._send(data_chunk_header(request.cookie, request.offset, request.length), buf)
        else:
            self._send(simple_reply(request.cookie), buf)

    def _fail(self, request: Request, exc: Exception) -> None:
        """Answer a request whose I/O raised: every request gets a reply, even after a bug.

        OSError keeps its errno (mapped to NBD's set); metadata errors and
        anything unexpected become EIO and are logged.
        """
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

    def _close_when_drained(self) -> None:
        self._disconnecting = True
        self._update_reading()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if not self._disconnecting or self._in_flight:
            return
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
