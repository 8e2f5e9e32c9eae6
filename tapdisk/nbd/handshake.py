"""The fixed-newstyle NBD handshake as a sans-IO state machine.

Feed it the bytes a client sends with ``receive``; collect the bytes to send
back with ``take_output``.  When the client picks an export (GO or
EXPORT_NAME) ``receive`` returns a ``Negotiated`` event and transmission
begins; any bytes after the final option belong to the transmission phase and
are left in ``leftover``.  A server offering TLS answers STARTTLS with an ACK
and returns ``StartTLS``: the caller wraps the socket and keeps feeding the
decrypted bytes to the same ``Handshake``, which has forgotten everything
negotiated before.  Protocol violations raise ``ProtocolError``: the
caller closes the connection.  There are no sockets or clocks in here.

A plain handshake under way can move to another process (a live restart):
``state`` and ``unread`` say where it stopped, and ``restore`` makes a new
``Handshake`` over the same exports continue from there, its greeting not sent again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from .constants import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    U16,
    U32,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from .errors import ClientAborted, ProtocolError

#: Largest option payload we accept; a client announcing more is hung up on at
#: once (as nbdkit and qemu-nbd do) rather than waited for.
MAX_OPTION_LENGTH: Final = 64 * 1024
#: Longest string (export name, query) the spec allows.
MAX_STRING: Final = 4096

SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
#: A plain int: ``~`` on an IntFlag only inverts within its defined members,
#: which would make every unknown bit look known.
KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class TLSMode(StrEnum):
    """Whether the server offers STARTTLS, and whether clients must use it."""

    OFF = "off"  # STARTTLS is unsupported (and ERR_TLS_REQD never sent)
    ON = "on"  # STARTTLS offered; plain clients are served too
    REQUIRE = "require"  # every option but STARTTLS and ABORT refused before TLS


#: Options a server requiring TLS answers before STARTTLS.
_BEFORE_TLS: Final = frozenset({Option.STARTTLS, Option.ABORT})


class StartTLS:
    """STARTTLS acknowledged: the next bytes on the socket are a TLS handshake."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a client learns about one export during the handshake."""

    name: str
    size: int
    #: Transmission flags independent of the connection (SEND_DF is added per
    #: connection, only once structured replies are negotiated).
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = 32 * 1024 * 1024
    #: Metadata contexts block status can answer; a selected one's id is its position + 1.
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Handshake done: transmission starts on this export with these settings."""

    export: ExportInfo
    flags: TransmissionFlag
    structured: bool
    #: The (id, name) of each metadata context the client selected; empty for none.
    contexts: tuple[tuple[int, str], ...] = ()


def connection_flags(export: ExportInfo, structured: bool) -> TransmissionFlag:
    """Transmission flags for one connection to ``export``."""
    flags = export.flags | TransmissionFlag.HAS_FLAGS
    if structured:
        flags |= TransmissionFlag.SEND_DF
    return flags


class Handshake:
    """Server side of the fixed-newstyle handshake for one connection."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        default_export: str | None,
        tls: TLSMode = TLSMode.OFF,
    ) -> None:
        self._exports = exports
        self._default = default_export
        self._tls = tls
        self._tls_active = False
        self._buffer = bytearray()
        self._out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS))
        self._have_client_flags = False
        self._no_zeroes = False
        self._structured = False
        self._contexts: tuple[tuple[int, str], ...] = ()
        self._context_export: ExportInfo | None = None
        self.leftover = b""

    def take_output(self) -> bytes:
        """Bytes to send to the client now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def state(self) -> dict[str, Any] | None:
        """What was negotiated so far, as JSON for ``restore``; None once STARTTLS was
        acknowledged (a TLS session cannot leave the process)."""
        if self._tls_active:
            return None
        context_export = self._context_export
        return {
            "client_flags": self._have_client_flags,
            "no_zeroes": self._no_zeroes,
            "structured": self._structured,
            "contexts": [list(context) for context in self._contexts],
            "context_export": None if context_export is None else context_export.name,
        }

    def unread(self) -> bytes:
        """Bytes received and not yet decoded: the start of an option (or of the client flags)."""
        return bytes(self._buffer)

    def restore(self, state: dict[str, Any], unread: bytes) -> None:
        """Continue a handshake another process began: ``state()`` and ``unread()`` of its
        ``Handshake``.  The greeting and every reply have been sent by that one."""
        self._out.clear()
        self._have_client_flags = bool(state["client_flags"])
        self._no_zeroes = bool(state["no_zeroes"])
        self._structured = bool(state["structured"])
        self._contexts = tuple((int(cid), str(name)) for cid, name in state["contexts"])
        name = state["context_export"]
        self._context_export = None if name is None else self._exports.get(name)
        self._buffer = bytearray(unread)

    def receive(self, data: bytes) -> Negotiated | StartTLS | None:
        """Consume client bytes; return Negotiated once an export is chosen,
        StartTLS when the socket must switch to TLS before the next byte."""
        self._buffer += data
        if not self._have_client_flags:
            if len(self._buffer) < CLIENT_FLAGS.size:
                return None
            (flags,) = CLIENT_FLAGS.unpack_from(self._buffer)
            del self._buffer[: CLIENT_FLAGS.size]
            if flags & ~KNOWN_CLIENT_FLAGS:
                raise ProtocolError(f"unknown client flags {flags:#x}")
            self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._have_client_flags = True
        while True:
            if len(self._buffer) < OPTION_HEADER.size:
                return None
            magic, option, length = OPTION_HEADER.unpack_from(self._buffer)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise ProtocolError(
                    f"option {option} announces {length} bytes, limit {MAX_OPTION_LENGTH}"
                )
            end = OPTION_HEADER.size + length
            if len(self._buffer) < end:
                return None
            payload = bytes(self._buffer[OPTION_HEADER.size : end])
            del self._buffer[:end]
            result = self._handle_option(option, payload)
            if isinstance(result, StartTLS):
                if self._buffer:  # the client must wait for our ACK before its TLS hello
                    raise ProtocolError("bytes sent after STARTTLS before its reply")
                return result
            if result is not None:
                self.leftover = bytes(self._buffer)
                self._buffer.clear()
                return result

    # -- replies -----------------------------------------------------------------

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _error(self, option: int, reply: Reply, message: str) -> None:
        self._reply(option, reply, message.encode())

    # -- options -----------------------------------------------------------------

    def _handle_option(self, option: int, payload: bytes) -> Negotiated | StartTLS | None:
        if self._tls == TLSMode.REQUIRE and not self._tls_active and option not in _BEFORE_TLS:
            if option == Option.EXPORT_NAME:  # it has no error reply: hang up
                raise ProtocolError("EXPORT_NAME before STARTTLS; this server requires TLS")
            self._error(option, Reply.ERR_TLS_REQD, "TLS is required: send STARTTLS first")
            return None
        if option == Option.STARTTLS and self._tls != TLSMode.OFF:
            return self._start_tls(payload)
        if option == Option.EXPORT_NAME:
            return self._export_name(payload)
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            raise ClientAborted()
        if option == Option.LIST:
            self._list(payload)
        elif option in (Option.INFO, Option.GO):
            return self._info_or_go(option, payload)
        elif option == Option.STRUCTURED_REPLY:
            if payload:
                self._error(option, Reply.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self._structured = True
                self._reply(option, Reply.ACK)
        elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_context(option, payload)
        else:
            self._error(option, Reply.ERR_UNSUP, f"option {option} not supported")
        return None

    def _start_tls(self, payload: bytes) -> StartTLS | None:
        if payload:
            self._error(Option.STARTTLS, Reply.ERR_INVALID, "STARTTLS takes no data")
            return None
        if self._tls_active:
            self._error(Option.STARTTLS, Reply.ERR_INVALID, "TLS is already active")
            return None
        self._reply(Option.STARTTLS, Reply.ACK)
        # The spec: everything negotiated before TLS is discarded.
        self._tls_active = True
        self._structured = False
        self._contexts = ()
        self._context_export = None
        return StartTLS()

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default is not None:
            name = self._default
        return self._exports.get(name)

    def _export_name(self, payload: bytes) -> Negotiated:
        try:
            export = self._lookup(payload.decode())
        except UnicodeDecodeError:
            export = None
        if export is None:
            raise ProtocolError(f"EXPORT_NAME for unknown export {payload[:64]!r}")
        flags = connection_flags(export, self._structured)
        self._out += EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self._no_zeroes:
            self._out += bytes(EXPORT_NAME_PADDING)
        return self._negotiated(export, flags)

    def _negotiated(self, export: ExportInfo, flags: TransmissionFlag) -> Negotiated:
        # Selected contexts only apply to the export they were selected for.
        contexts = self._contexts if self._context_export is export else ()
        return Negotiated(export, flags, self._structured, contexts)

    def _list(self, payload: bytes) -> None:
        if payload:
            self._error(Option.LIST, Reply.ERR_INVALID, "LIST takes no data")
            return
        for export in self._exports.values():
            name = export.name.encode()
            self._reply(
                Option.LIST, Reply.SERVER, U32.pack(len(name)) + name + export.description.encode()
            )
        self._reply(Option.LIST, Reply.ACK)

    def _info_or_go(self, option: int, payload: bytes) -> Negotiated | None:
        parsed = _parse_info_request(payload)
        if parsed is None:
            self._error(option, Reply.ERR_INVALID, "malformed INFO/GO request")
            return None
        name, requests = parsed
        export = self._lookup(name)
        if export is None:
            self._error(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        flags = connection_flags(export, self._structured)
        self._reply(
            option, Reply.INFO, U16.pack(Info.EXPORT) + EXPORT_NAME_REPLY.pack(export.size, flags)
        )
        if Info.NAME in requests:
            self._reply(option, Reply.INFO, U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._reply(
                option, Reply.INFO, U16.pack(Info.DESCRIPTION) + export.description.encode()
            )
        # Block sizes are always sent: clients that did not ask may ignore them.
        self._reply(
            option,
            Reply.INFO,
            U16.pack(Info.BLOCK_SIZE)
            + struct_block_size(export.min_block, export.preferred_block, export.max_payload),
        )
        self._reply(option, Reply.ACK)
        if option == Option.GO:
            return self._negotiated(export, flags)
        return None

    def _meta_context(self, option: int, payload: bytes) -> None:
        if not self._structured:
            self._error(option, Reply.ERR_INVALID, "negotiate STRUCTURED_REPLY first")
            if option == Option.SET_META_CONTEXT:
                self._contexts = ()
            return
        parsed = _parse_meta_context_request(payload)
        if parsed is None:
            self._error(option, Reply.ERR_INVALID, "malformed meta context request")
            if option == Option.SET_META_CONTEXT:
                self._contexts = ()
            return
        name, queries = parsed
        export = self._lookup(name)
        if export is None:
            self._error(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")
            return
        if option == Option.LIST_META_CONTEXT:
            for name in export.contexts:
                if not queries or any(_lists(query, name) for query in queries):
                    self._context_reply(option, 0, name)
        else:
            self._contexts = tuple(
                (index + 1, name) for index, name in enumerate(export.contexts) if name in queries
            )
            self._context_export = export
            for context_id, name in self._contexts:
                self._context_reply(option, context_id, name)
        self._reply(option, Reply.ACK)

    def _context_reply(self, option: int, context_id: int, name: str) -> None:
        self._reply(option, Reply.META_CONTEXT, U32.pack(context_id) + name.encode())


def _lists(query: str, name: str) -> bool:
    """Whether LIST_META_CONTEXT's ``query`` asks for context ``name``.

    A query ending in a colon (``base:``, ``qemu:``, ``qemu:dirty-bitmap:``) is
    a wildcard over the names it starts; anything else must match exactly.
    SET_META_CONTEXT takes exact names only.
    """
    return query == name or (query.endswith(":") and name.startswith(query))


def struct_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """Payload of NBD_INFO_BLOCK_SIZE after its type."""
    return U32.pack(minimum) + U32.pack(preferred) + U32.pack(maximum)


def _parse_info_request(payload: bytes) -> tuple[str, set[int]] | None:
    """(export name, requested info types) or None when malformed."""
    if len(payload) < 6:
        return None
    (name_len,) = U32.unpack_from(payload)
    if name_len > min(len(payload) - 6, MAX_STRING):
        return None
    try:
        name = payload[4 : 4 + name_len].decode()
    except UnicodeDecodeError:
        return None
    pos = 4 + name_len
    (count,) = U16.unpack_from(payload, pos)
    pos += 2
    if len(payload) != pos + 2 * count:
        return None
    requests = {U16.unpack_from(payload, pos + 2 * i)[0] for i in range(count)}
    return name, requests


def _parse_meta_context_request(payload: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) or None when malformed."""
    if len(payload) < 8:
        return None
    (name_len,) = U32.unpack_from(payload)
    if name_len > min(len(payload) - 8, MAX_STRING):
        return None
    pos = 4 + name_len
    try:
        name = payload[4:pos].decode()
    except UnicodeDecodeError:
        return None
    (count,) = U32.unpack_from(payload, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(payload):
            return None
        (length,) = U32.unpack_from(payload, pos)
        pos += 4
        if length > MAX_STRING or pos + length > len(payload):
            return None
        try:
            queries.append(payload[pos : pos + length].decode())
        except UnicodeDecodeError:
            return None
        pos += length
    if pos != len(payload):
        return None
    return name, queries
