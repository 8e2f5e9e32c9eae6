"""Generic netlink for the kernel's ``nbd`` family, sans-IO.

Builds request datagrams and parses reply datagrams as plain bytes; no socket
is touched here, so every layout can be checked byte by byte on any machine.
``tapdisk/kernel.py`` is the thin I/O shell that sends these over an
``AF_NETLINK`` socket.

Netlink integers are in host byte order (the ``=`` struct prefix), unlike NBD.
Layouts and numbers come from ``<linux/netlink.h>``, ``<linux/genetlink.h>``
and ``<linux/nbd-netlink.h>``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

# -- socket level ------------------------------------------------------------------

#: ``socket.AF_NETLINK`` protocol number (Python does not export it).
NETLINK_GENERIC: Final = 16
#: ``setsockopt`` level for netlink options.
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
#: Error replies echo only the request header, not its whole payload.
NETLINK_CAP_ACK: Final = 10
#: Error replies may carry a human-readable message (extended ACK).
NETLINK_EXT_ACK: Final = 11

# -- binary layouts ----------------------------------------------------------------

#: nlmsghdr: total length, type, flags, sequence number, port id.
NLMSGHDR = struct.Struct("=IHHII")
#: genlmsghdr: command, version, reserved.
GENLMSGHDR = struct.Struct("=BBH")
#: nlattr: length (header + payload, unpadded), type.
NLATTR = struct.Struct("=HH")
#: NLMSG_ERROR payload head: negative errno, or 0 for an ACK.
NLMSGERR = struct.Struct("=i")
U8 = struct.Struct("=B")
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")

NLA_F_NESTED: Final = 0x8000
NLA_F_NET_BYTEORDER: Final = 0x4000
NLA_TYPE_MASK: Final = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

#: Type of the generic netlink controller, which resolves family names.
GENL_ID_CTRL: Final = 0x10


def align4(n: int) -> int:
    return (n + 3) & ~3


class MsgType(enum.IntEnum):
    NOOP = 1
    ERROR = 2
    DONE = 3
    OVERRUN = 4


class MsgFlag(enum.IntFlag):
    REQUEST = 0x1
    MULTI = 0x2
    ACK = 0x4
    ECHO = 0x8
    # In NLMSG_ERROR replies: the echoed request was truncated / TLVs follow it.
    CAPPED = 0x100
    ACK_TLVS = 0x200


class ErrAttr(enum.IntEnum):
    """Extended-ACK attributes after an NLMSG_ERROR's echoed request."""

    MSG = 1
    OFFS = 2


class CtrlCmd(enum.IntEnum):
    GETFAMILY = 3


class CtrlAttr(enum.IntEnum):
    FAMILY_ID = 1
    FAMILY_NAME = 2
    VERSION = 3
    HDRSIZE = 4
    MAXATTR = 5
    OPS = 6
    MCAST_GROUPS = 7


class CtrlMcastAttr(enum.IntEnum):
    NAME = 1
    ID = 2


# -- the nbd family ----------------------------------------------------------------

NBD_FAMILY: Final = "nbd"
NBD_FAMILY_VERSION: Final = 1
NBD_MCAST_GROUP: Final = "nbd_mc_group"


class NbdCmd(enum.IntEnum):
    CONNECT = 1
    DISCONNECT = 2
    RECONFIGURE = 3
    LINK_DEAD = 4
    STATUS = 5


class NbdAttr(enum.IntEnum):
    INDEX = 1
    SIZE_BYTES = 2
    BLOCK_SIZE_BYTES = 3
    TIMEOUT = 4
    SERVER_FLAGS = 5
    CLIENT_FLAGS = 6
    SOCKETS = 7
    DEAD_CONN_TIMEOUT = 8
    DEVICE_LIST = 9
    BACKEND_IDENTIFIER = 10


#: Inside NBD_ATTR_SOCKETS: one SOCK_ITEM per connection, holding a SOCK_FD.
NBD_SOCK_ITEM: Final = 1
NBD_SOCK_FD: Final = 1
#: Inside NBD_ATTR_DEVICE_LIST: one DEVICE_ITEM per device.
NBD_DEVICE_ITEM: Final = 1
NBD_DEVICE_INDEX: Final = 1
NBD_DEVICE_CONNECTED: Final = 2


class ClientFlag(enum.IntFlag):
    """``NBD_ATTR_CLIENT_FLAGS``: how the kernel manages the device's lifetime."""

    DESTROY_ON_DISCONNECT = 0x1
    DISCONNECT_ON_CLOSE = 0x2


class NetlinkError(ValueError):
    """A datagram from the kernel does not parse; the message names the field."""


# -- attributes --------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: header, payload, zero padding to 4 bytes."""
    length = NLATTR.size + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"netlink attribute {kind} too long: {length} bytes")
    return NLATTR.pack(length, kind) + payload + bytes(align4(length) - length)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, U64.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, value.encode() + b"\0")


def attr_nested(kind: int, children: Iterable[bytes]) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


@dataclass(frozen=True)
class Attrs:
    """Parsed attributes, in order; ``where`` names them in error messages."""

    items: tuple[tuple[int, bytes], ...]
    where: str

    @classmethod
    def parse(cls, data: bytes | memoryview, where: str) -> Attrs:
        items: list[tuple[int, bytes]] = []
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            if len(view) - offset < NLATTR.size:
                raise NetlinkError(
                    f"{where}: {len(view) - offset} trailing bytes at offset {offset},"
                    " too short for an attribute header"
                )
            length, kind = NLATTR.unpack_from(view, offset)
            if length < NLATTR.size or offset + length > len(view):
                raise NetlinkError(
                    f"{where}: attribute type {kind & NLA_TYPE_MASK} at offset {offset} has"
                    f" length {length}, but {len(view) - offset} bytes remain"
                )
            payload = bytes(view[offset + NLATTR.size : offset + length])
            items.append((kind & NLA_TYPE_MASK, payload))
            offset += align4(length)
        return cls(tuple(items), where)

    def get(self, kind: int) -> bytes | None:
        """Payload of the first attribute of ``kind``, or None."""
        for k, payload in self.items:
            if k == kind:
                return payload
        return None

    def require(self, kind: int, name: str) -> bytes:
        payload = self.get(kind)
        if payload is None:
            raise NetlinkError(f"{self.where}: attribute {name} ({kind}) is missing")
        return payload

    def _int(self, kind: int, name: str, layout: struct.Struct) -> int:
        payload = self.require(kind, name)
        if len(payload) < layout.size:
            raise NetlinkError(
                f"{self.where}: attribute {name} ({kind}) has {len(payload)} bytes,"
                f" expected {layout.size}"
            )
        return int(layout.unpack_from(payload)[0])

    def u8(self, kind: int, name: str) -> int:
        return self._int(kind, name, U8)

    def u16(self, kind: int, name: str) -> int:
        return self._int(kind, name, U16)

    def u32(self, kind: int, name: str) -> int:
        return self._int(kind, name, U32)

    def string(self, kind: int, name: str) -> str:
        payload = self.require(kind, name)
        try:
            return payload.split(b"\0", 1)[0].decode()
        except UnicodeDecodeError as exc:
            raise NetlinkError(f"{self.where}: attribute {name} ({kind}) is not UTF-8") from exc

    def nested(self, kind: int, name: str) -> Attrs:
        return Attrs.parse(self.require(kind, name), f"{self.where} {name}")


# -- messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One netlink message: header fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    port: int
    payload: bytes


def split_messages(data: bytes | memoryview) -> list[Message]:
    """Split one received datagram into its messages, checking every length."""
    view = memoryview(data)
    messages: list[Message] = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < NLMSGHDR.size:
            raise NetlinkError(
                f"netlink datagram: {len(view) - offset} trailing bytes at offset {offset},"
                " too short for a message header"
            )
        length, kind, flags, seq, port = NLMSGHDR.unpack_from(view, offset)
        if length < NLMSGHDR.size or offset + length > len(view):
            raise NetlinkError(
                f"netlink message at offset {offset}: length {length} out of range"
                f" ({len(view) - offset} bytes remain)"
            )
        payload = bytes(view[offset + NLMSGHDR.size : offset + length])
        messages.append(Message(kind, flags, seq, port, payload))
        offset += align4(length)
    return messages


def genl_request(
    family: int,
    cmd: int,
    attrs: bytes,
    seq: int,
    *,
    version: int = 1,
    flags: int = MsgFlag.REQUEST | MsgFlag.ACK,
) -> bytes:
    """A complete generic netlink request datagram."""
    body = GENLMSGHDR.pack(cmd, version, 0) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), family, flags, seq, 0) + body


@dataclass(frozen=True)
class GenlReply:
    """A generic netlink data message: command, version and attributes."""

    cmd: int
    version: int
    attrs: Attrs


def parse_genl(message: Message, where: str) -> GenlReply:
    if len(message.payload) < GENLMSGHDR.size:
        raise NetlinkError(
            f"{where}: {len(message.payload)} bytes, too short for a generic netlink header"
        )
    cmd, version, _ = GENLMSGHDR.unpack_from(message.payload)
    return GenlReply(cmd, version, Attrs.parse(message.payload[GENLMSGHDR.size :], where))


@dataclass(frozen=True)
class ErrorReply:
    """An NLMSG_ERROR: ``errno`` 0 is an ACK; ``text`` is the extended-ACK message."""

    errno: int
    text: str | None = None


def parse_error(message: Message) -> ErrorReply:
    payload = message.payload
    if len(payload) < NLMSGERR.size + NLMSGHDR.size:
        raise NetlinkError(
            f"netlink error reply: {len(payload)} bytes, expected at least"
            f" {NLMSGERR.size + NLMSGHDR.size}"
        )
    (error,) = NLMSGERR.unpack_from(payload)
    text = None
    if message.flags & MsgFlag.ACK_TLVS:
        echoed = NLMSGERR.size + NLMSGHDR.size
        if not message.flags & MsgFlag.CAPPED:
            (echoed_len,) = U32.unpack_from(payload, NLMSGERR.size)
            echoed = NLMSGERR.size + align4(echoed_len)
        if echoed <= len(payload):
            tlvs = Attrs.parse(payload[echoed:], "netlink extended ack")
            if tlvs.get(ErrAttr.MSG) is not None:
                text = tlvs.string(ErrAttr.MSG, "NLMSGERR_ATTR_MSG")
    return ErrorReply(-error, text)


@dataclass
class Transaction:
    """Collects the replies to one request (by sequence number) until its ACK.

    Feed every datagram received on the socket; ``feed`` returns True once the
    final ACK or error arrived.  Messages for other sequence numbers (late
    replies to an abandoned request) are ignored.
    """

    seq: int
    replies: list[GenlReply] = field(default_factory=list)
    error: ErrorReply | None = None

    def feed(self, datagram: bytes | memoryview, where: str) -> bool:
        for message in split_messages(datagram):
            if message.seq != self.seq:
                continue
            if message.type == MsgType.ERROR:
                self.error = parse_error(message)
                return True
            if message.type == MsgType.DONE:
                return True
            if message.type in (MsgType.NOOP, MsgType.OVERRUN):
                continue
            self.replies.append(parse_genl(message, where))
        return False


# -- family resolution ---------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A resolved generic netlink family."""

    name: str
    id: int
    version: int
    maxattr: int
    mcast_groups: dict[str, int]


def getfamily_request(name: str, seq: int) -> bytes:
    return genl_request(GENL_ID_CTRL, CtrlCmd.GETFAMILY, attr_str(CtrlAttr.FAMILY_NAME, name), seq)


def parse_family(reply: GenlReply) -> Family:
    attrs = reply.attrs
    groups: dict[str, int] = {}
    if attrs.get(CtrlAttr.MCAST_GROUPS) is not None:
        for entry in attrs.nested(CtrlAttr.MCAST_GROUPS, "CTRL_ATTR_MCAST_GROUPS").items:
            group = Attrs.parse(entry[1], f"{attrs.where} multicast group {entry[0]}")
            groups[group.string(CtrlMcastAttr.NAME, "CTRL_ATTR_MCAST_GRP_NAME")] = group.u32(
                CtrlMcastAttr.ID, "CTRL_ATTR_MCAST_GRP_ID"
            )
    return Family(
        name=attrs.string(CtrlAttr.FAMILY_NAME, "CTRL_ATTR_FAMILY_NAME"),
        id=attrs.u16(CtrlAttr.FAMILY_ID, "CTRL_ATTR_FAMILY_ID"),
        version=attrs.u32(CtrlAttr.VERSION, "CTRL_ATTR_VERSION"),
        maxattr=attrs.u32(CtrlAttr.MAXATTR, "CTRL_ATTR_MAXATTR"),
        mcast_groups=groups,
    )


# -- nbd requests --------------------------------------------------------------------


def _sockets_attr(fds: Iterable[int]) -> bytes:
    return attr_nested(
        NbdAttr.SOCKETS,
        (attr_nested(NBD_SOCK_ITEM, [attr_u32(NBD_SOCK_FD, fd)]) for fd in fds),
    )


def _optional_u64(pairs: Iterable[tuple[NbdAttr, int | None]]) -> bytes:
    return b"".join(attr_u64(kind, value) for kind, value in pairs if value is not None)


def connect_request(
    family: int,
    seq: int,
    *,
    fds: Iterable[int],
    size: int,
    block_size: int,
    server_flags: int,
    client_flags: int,
    timeout: int,
    dead_conn_timeout: int,
    backend_id: str | None,
    index: int | None,
) -> bytes:
    """NBD_CMD_CONNECT; without ``index`` the kernel picks (or creates) a free device."""
    attrs = b"".join(
        [
            attr_u32(NbdAttr.INDEX, index) if index is not None else b"",
            attr_u64(NbdAttr.SIZE_BYTES, size),
            attr_u64(NbdAttr.BLOCK_SIZE_BYTES, block_size),
            attr_u64(NbdAttr.TIMEOUT, timeout),
            attr_u64(NbdAttr.SERVER_FLAGS, server_flags),
            attr_u64(NbdAttr.CLIENT_FLAGS, client_flags),
            attr_u64(NbdAttr.DEAD_CONN_TIMEOUT, dead_conn_timeout),
            attr_str(NbdAttr.BACKEND_IDENTIFIER, backend_id) if backend_id is not None else b"",
            _sockets_attr(fds),
        ]
    )
    return genl_request(family, NbdCmd.CONNECT, attrs, seq, version=NBD_FAMILY_VERSION)


def reconfigure_request(
    family: int,
    seq: int,
    index: int,
    *,
    fds: Iterable[int],
    backend_id: str | None,
    size: int | None = None,
    block_size: int | None = None,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    client_flags: int | None = None,
) -> bytes:
    """NBD_CMD_RECONFIGURE: fresh sockets for dead slots, and/or new settings."""
    fds = list(fds)
    attrs = b"".join(
        [
            attr_u32(NbdAttr.INDEX, index),
            attr_str(NbdAttr.BACKEND_IDENTIFIER, backend_id) if backend_id is not None else b"",
            _optional_u64(
                [
                    (NbdAttr.SIZE_BYTES, size),
                    (NbdAttr.BLOCK_SIZE_BYTES, block_size),
                    (NbdAttr.TIMEOUT, timeout),
                    (NbdAttr.DEAD_CONN_TIMEOUT, dead_conn_timeout),
                    (NbdAttr.CLIENT_FLAGS, client_flags),
                ]
            ),
            _sockets_attr(fds) if fds else b"",
        ]
    )
    return genl_request(family, NbdCmd.RECONFIGURE, attrs, seq, version=NBD_FAMILY_VERSION)


def disconnect_request(family: int, seq: int, index: int) -> bytes:
    return genl_request(
        family,
        NbdCmd.DISCONNECT,
        attr_u32(NbdAttr.INDEX, index),
        seq,
        version=NBD_FAMILY_VERSION,
    )


def status_request(family: int, seq: int, index: int | None = None) -> bytes:
    attrs = attr_u32(NbdAttr.INDEX, index) if index is not None else b""
    return genl_request(family, NbdCmd.STATUS, attrs, seq, version=NBD_FAMILY_VERSION)


# -- nbd replies ---------------------------------------------------------------------


def parse_index(reply: GenlReply) -> int:
    """The device index of a CONNECT reply or a LINK_DEAD event."""
    return reply.attrs.u32(NbdAttr.INDEX, "NBD_ATTR_INDEX")


def parse_status(reply: GenlReply) -> dict[int, bool]:
    """A STATUS reply as {index: connected}."""
    devices: dict[int, bool] = {}
    if reply.attrs.get(NbdAttr.DEVICE_LIST) is None:
        return devices
    device_list = reply.attrs.nested(NbdAttr.DEVICE_LIST, "NBD_ATTR_DEVICE_LIST")
    for kind, payload in device_list.items:
        if kind != NBD_DEVICE_ITEM:
            raise NetlinkError(f"{device_list.where}: unexpected attribute type {kind}")
        item = Attrs.parse(payload, f"{device_list.where} item")
        index = item.u32(NBD_DEVICE_INDEX, "NBD_DEVICE_INDEX")
        devices[index] = bool(item.u8(NBD_DEVICE_CONNECTED, "NBD_DEVICE_CONNECTED"))
    return devices
