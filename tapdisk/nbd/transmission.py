"""The NBD transmission phase, sans-IO: request parsing, validation, reply bytes.

``RequestReader`` is shaped for ``asyncio.BufferedProtocol``: the transport
asks it for a buffer to receive into and tells it how many bytes arrived.
Headers land in a reusable buffer.  A WRITE payload that arrived whole with its
header is handed out as a view into that buffer, valid until the next
``get_buffer`` (the server writes it to the image at once or copies it); a
payload still on its way gets a buffer of its own that the socket fills
directly, so writes are never copied in user space on the common paths.  What
of it arrived with its header is copied; so that a stream of large writes does
not copy up to a receive buffer's worth of each, the receive after a large
payload takes one request header only.

Buffers follow the traffic, so an idle connection costs next to nothing: the
receive buffer starts small, grows to ``HEADER_BUFFER_SIZE`` when a receive
fills it, and ``release_if_idle`` drops it between requests; a payload's buffer
is allocated only at the ``get_buffer`` after its header, so the caller can
first make room for ``payload_bytes`` (a per-process budget) and pause until then.
Nothing here touches a socket.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from typing import Final, NamedTuple

from ..allocator import io_buffer
from .constants import (
    ERROR_PAYLOAD_HEAD,
    EXTENT,
    HOLE_PAYLOAD,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_DATA_HEADER,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U32,
    ChunkType,
    Command,
    CommandFlag,
    Error,
    TransmissionFlag,
)
from .errors import ProtocolError

#: Receive buffer for request headers (and small writes that arrive with them) of a busy
#: connection: at queue depth 16, sixteen 4 KiB writes arrive in one receive.
HEADER_BUFFER_SIZE: Final = 256 * 1024
#: Receive buffer of a connection that has just started or woken from idle.
SMALL_BUFFER_SIZE: Final = 16 * 1024
#: After a payload this large, the next receive takes one header: if another such write
#: follows, its payload then goes straight to its own buffer, where a full receive buffer
#: would have taken up to 256 KiB of it to copy (a system call costs less than that copy).
LARGE_PAYLOAD: Final = 128 * 1024
#: Most extents sent in one BLOCK_STATUS chunk (the spec suggests at most 2**20).
MAX_EXTENTS: Final = 1 << 16
#: Error messages longer than this are cut (the spec allows 4096 bytes).
MAX_MESSAGE: Final = 1024

# The tables below are plain ints: IntFlag arithmetic costs a microsecond per
# operation, and check_request runs for every request.

#: Command flags each command accepts (FUA is accepted on every command).
_ALLOWED_FLAGS: Final[dict[int, int]] = {
    int(command): int(flags)
    for command, flags in (
        (Command.READ, CommandFlag.FUA | CommandFlag.DF),
        (Command.WRITE, CommandFlag.FUA),
        (Command.DISC, CommandFlag(0)),
        (Command.FLUSH, CommandFlag.FUA),
        (Command.TRIM, CommandFlag.FUA),
        (Command.CACHE, CommandFlag.FUA),
        (Command.WRITE_ZEROES, CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
        (Command.BLOCK_STATUS, CommandFlag.FUA | CommandFlag.REQ_ONE),
    )
}
#: Which transmission flag a command needs, if any.
_NEEDS_FLAG: Final[dict[int, int]] = {
    int(Command.FLUSH): int(TransmissionFlag.SEND_FLUSH),
    int(Command.TRIM): int(TransmissionFlag.SEND_TRIM),
    int(Command.CACHE): int(TransmissionFlag.SEND_CACHE),
    int(Command.WRITE_ZEROES): int(TransmissionFlag.SEND_WRITE_ZEROES),
}
_MODIFYING: Final = frozenset({int(Command.WRITE), int(Command.TRIM), int(Command.WRITE_ZEROES)})
_READ, _WRITE, _FLUSH, _WRITE_ZEROES, _BLOCK_STATUS = (
    int(Command.READ),
    int(Command.WRITE),
    int(Command.FLUSH),
    int(Command.WRITE_ZEROES),
    int(Command.BLOCK_STATUS),
)
_DF, _FAST_ZERO = int(CommandFlag.DF), int(CommandFlag.FAST_ZERO)
_SEND_DF, _SEND_FAST_ZERO = int(TransmissionFlag.SEND_DF), int(TransmissionFlag.SEND_FAST_ZERO)
_READ_ONLY = int(TransmissionFlag.READ_ONLY)


class Request(NamedTuple):
    """One decoded request; ``payload`` is set only for WRITE.

    A ``memoryview`` payload is borrowed from the reader's receive buffer and is
    overwritten after the next ``RequestReader.get_buffer``; see ``owned``.
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    payload: bytearray | memoryview | None

    def owned(self) -> Request:
        """This request with a payload that outlives the receive buffer (copied if borrowed)."""
        payload = self.payload
        if isinstance(payload, memoryview):
            cookie, command, flags, offset, length, _ = self
            return Request(cookie, command, flags, offset, length, bytearray(payload))
        return self


class RequestReader:
    """Incremental request decoder fed through get_buffer/buffer_updated."""

    __slots__ = (
        "_buf",
        "_busy",
        "_end",
        "_header",
        "_header_only",
        "_max_payload",
        "_payload",
        "_payload_filled",
        "_payload_view",
        "_start",
        "_view",
        "payload_bytes",
    )

    def __init__(self, max_payload: int) -> None:
        self._max_payload = max_payload
        # Allocated at the first receive (see get_buffer).
        self._buf: bytearray | mmap.mmap = bytearray()
        self._view = memoryview(self._buf)
        # Bytes [_start, _end) of the buffer are received and not yet decoded; those
        # before _start may still be read through borrowed payloads.
        self._start = 0
        self._end = 0
        # Set by every receive, cleared by release_if_idle.
        self._busy = False
        # While a WRITE payload is being received: its header and buffer.
        self._header: tuple[int, int, int, int, int] | None = None
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_filled = 0
        # Set when a large payload is received: the next receive takes one header.
        self._header_only = False
        #: Length of the WRITE payload being received (its buffer is allocated at the next
        #: ``get_buffer``), 0 between payloads.
        self.payload_bytes = 0

    @property
    def idle(self) -> bool:
        """True between requests (no partial header or payload buffered)."""
        return self._end == self._start and self._header is None

    @property
    def buffer_size(self) -> int:
        """Bytes of receive buffer held (payload buffers not counted)."""
        return len(self._buf)

    def unread(self) -> bytes:
        """The bytes received and not yet decoded, as they came off the wire.

        A successor process fed these before reading the same socket decodes exactly
        the requests this reader would have (a live hand-over, tapdisk/daemon/handover.py).
        """
        waiting = bytes(self._view[self._start : self._end])
        if self._header is None:
            return waiting
        flags, command, cookie, offset, length = self._header
        header = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
        if self._payload is None:  # its buffer comes at the next get_buffer: all is in ours
            return header + waiting
        return header + bytes(self._payload[: self._payload_filled])

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go; ends the loan of borrowed payloads."""
        if self._payload_view is not None:
            return self._payload_view[self._payload_filled :]
        if self._header is not None:
            return self._start_payload()
        self._busy = True
        start, end = self._start, self._end
        if self._header_only:
            self._header_only = False
            if start == end and len(self._buf) - end >= REQUEST.size:
                return self._view[end : end + REQUEST.size]
        if end == len(self._buf) and end < HEADER_BUFFER_SIZE:
            # The last receive filled it (or none came yet): more is likely waiting.
            self._resize(HEADER_BUFFER_SIZE if end else SMALL_BUFFER_SIZE)
        elif start:
            if end > start:
                self._buf[: end - start] = self._view[start:end]
            self._start, self._end = 0, end - start
        return self._view[self._end :]

    def release_if_idle(self) -> int:
        """Drop the receive buffer if nothing arrived since the last call and no request
        is partly received; returns the bytes released."""
        busy, self._busy = self._busy, False
        size = len(self._buf)
        if busy or not size or not self.idle:
            return 0
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        return size

    def _resize(self, size: int) -> None:
        """A new receive buffer (the old one may still be lent out) holding the undecoded bytes."""
        start, end = self._start, self._end
        # Anonymous memory, not a bytearray: a bytearray is zeroed (written) whole at once,
        # while pages of a mapping are taken only once a receive reaches them, so a
        # connection with one small request at a time holds a page or two, not 256 KiB.
        buf = mmap.mmap(-1, size)
        buf[: end - start] = self._view[start:end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, end - start

    def _start_payload(self) -> memoryview:
        """The WRITE payload's own buffer, holding what arrived with its header."""
        length = self.payload_bytes
        payload = io_buffer(length)
        start, end = self._start, self._end
        payload[: end - start] = self._view[start:end]
        self._start = self._end = 0
        if end == len(self._buf) < HEADER_BUFFER_SIZE:  # the receive filled it: grow
            self._resize(HEADER_BUFFER_SIZE)
        self._payload = payload
        self._payload_view = memoryview(payload)
        self._payload_filled = end - start
        return self._payload_view[end - start :]

    def buffer_updated(self, nbytes: int) -> list[Request]:
        """Account for ``nbytes`` received; return the requests now complete."""
        if self._payload is not None:
            self._payload_filled += nbytes
            if self._payload_filled < len(self._payload):
                return []
            return [self._finish_payload()]
        self._end += nbytes
        return self._parse_headers()

    def _finish_payload(self) -> Request:
        assert self._header is not None and self._payload is not None
        flags, command, cookie, offset, length = self._header
        request = Request(cookie, command, flags, offset, length, self._payload)
        self._header_only = length >= LARGE_PAYLOAD
        self._header = self._payload = self._payload_view = None
        self._payload_filled = 0
        self.payload_bytes = 0
        return request

    def _parse_headers(self) -> list[Request]:
        requests: list[Request] = []
        buf, view, pos, end = self._buf, self._view, self._start, self._end
        size = REQUEST.size
        while end - pos >= size:
            magic, flags, command, cookie, offset, length = REQUEST.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            pos += size
            if command != _WRITE or length == 0:
                requests.append(Request(cookie, command, flags, offset, length, None))
                continue
            if length > self._max_payload:
                raise ProtocolError(
                    f"write of {length} bytes exceeds the {self._max_payload} limit"
                )
            if end - pos >= length:  # here whole: lend it
                requests.append(
                    Request(cookie, command, flags, offset, length, view[pos : pos + length])
                )
                pos += length
                continue
            # The rest of this payload goes straight from the socket into a buffer of its
            # own, allocated by the next get_buffer; what arrived of it waits in this one.
            self._header = (flags, command, cookie, offset, length)
            self.payload_bytes = length
            break
        self._start = pos
        return requests


def check_request(
    request: Request,
    export_flags: int,
    size: int,
    max_payload: int,
    block_status_ok: bool,
) -> Error | None:
    """Why a request must be refused (its NBD error), or None if it is valid.

    ``block_status_ok``: a metadata context was negotiated for this connection.
    A plain READ or WRITE in range (nearly every request) meets only two of the
    rules; it is answered here, everything else by ``check_any_request``.
    """
    command = request.command
    if not request.flags and command <= _WRITE and request.offset + request.length <= size:
        if command == _READ:
            return Error.EINVAL if request.length > max_payload else None
        return Error.EPERM if export_flags & _READ_ONLY else None
    return check_any_request(request, export_flags, size, max_payload, block_status_ok)


def check_any_request(
    request: Request,
    export_flags: int,
    size: int,
    max_payload: int,
    block_status_ok: bool,
) -> Error | None:
    """``check_request`` with every rule applied to every request."""
    command, flags, offset, length = request.command, request.flags, request.offset, request.length
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None or flags & ~allowed:
        return Error.EINVAL
    if flags & _DF and not export_flags & _SEND_DF:
        return Error.EINVAL
    if flags & _FAST_ZERO and not export_flags & _SEND_FAST_ZERO:
        return Error.EINVAL
    if command in _MODIFYING and export_flags & _READ_ONLY:
        return Error.EPERM
    needed = _NEEDS_FLAG.get(command)
    if needed is not None and not export_flags & needed:
        return Error.EINVAL
    if command == _FLUSH:
        return Error.EINVAL if offset or length else None
    if command == _BLOCK_STATUS and not block_status_ok:
        return Error.EINVAL
    if offset + length > size:
        if command in (_WRITE, _WRITE_ZEROES) and offset <= size:
            return Error.ENOSPC
        return Error.EINVAL
    if command == _READ and length > max_payload:
        return Error.EINVAL
    return None


# -- replies ----------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A 16-byte simple reply header (READ data, if any, follows it)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    return STRUCTURED_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        ChunkType.OFFSET_DATA,
        cookie,
        length + 8,
        offset,
    )


def hole_chunk(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeros."""
    return STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        ChunkType.OFFSET_HOLE,
        cookie,
        HOLE_PAYLOAD.size,
    ) + HOLE_PAYLOAD.pack(offset, length)


def done_chunk(cookie: int) -> bytes:
    """A NONE chunk with DONE: a structured reply finished successfully."""
    return STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.NONE, cookie, 0
    )


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """An ERROR chunk with DONE, carrying a human-readable message."""
    text = message.encode()[:MAX_MESSAGE]
    payload = ERROR_PAYLOAD_HEAD.pack(error, len(text)) + text
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.ERROR, cookie, len(payload)
        )
        + payload
    )


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool = True
) -> bytes:
    """A BLOCK_STATUS chunk for (length, flags) extents; DONE unless another context follows."""
    body = bytearray(U32.pack(context_id))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE if done else 0,
            ChunkType.BLOCK_STATUS,
            cookie,
            len(body),
        )
        + body
    )
