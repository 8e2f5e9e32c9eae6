"""tapdisk/netlink.py: the nbd generic-netlink messages, byte by byte (no kernel needed).

Golden datagrams are written out in hex as ``<linux/netlink.h>``,
``<linux/genetlink.h>`` and ``<linux/nbd-netlink.h>`` lay them out on a
little-endian machine (netlink integers are in host byte order).
"""

from __future__ import annotations

import errno
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tapdisk import netlink as nl

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="golden bytes are little-endian (netlink uses host order)"
)


def h(text: str) -> bytes:
    """Hex with ``#`` comments and any whitespace, to bytes."""
    return bytes.fromhex("".join(line.partition("#")[0] for line in text.splitlines()))


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """An nlmsghdr (port 0) around ``body``."""
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


NBD_FAMILY_ID = 0x1D

#: What the kernel sends for STATUS: nbd0 idle, nbd1 connected (nests without NLA_F_NESTED).
STATUS_REPLY = h(
    """
    40000000 1d00 0000 09000000 01000000  # nlmsghdr: 64 bytes, nbd family, seq 9, port 1
    05 01 0000                            # genlmsghdr: STATUS, version 1
    2c00 0900                             # DEVICE_LIST
      1400 0100                           #   DEVICE_ITEM
        0800 0100 00000000                #     DEVICE_INDEX 0
        0500 0200 00 000000               #     DEVICE_CONNECTED 0, pad
      1400 0100                           #   DEVICE_ITEM
        0800 0100 01000000                #     DEVICE_INDEX 1
        0500 0200 01 000000               #     DEVICE_CONNECTED 1, pad
    """
)

#: The ACK that follows it: NLMSG_ERROR, error 0, the request's header echoed (CAP_ACK).
STATUS_ACK = h(
    """
    24000000 0200 0001 09000000 01000000  # nlmsghdr: 36 bytes, ERROR, CAPPED, seq 9
    00000000                              # error 0: ACK
    14000000 1d00 0500 09000000 00000000  # the request's nlmsghdr
    """
)


# -- attributes ----------------------------------------------------------------------


@little_endian
def test_attribute_is_padded_to_four_bytes_but_its_length_is_not() -> None:
    assert nl.attr(1, b"ab") == h("0600 0100 6162 0000")


@little_endian
def test_string_attribute_carries_its_terminating_nul() -> None:
    assert nl.attr_str(10, "abc") == h("0800 0a00 61626300")


@given(kind=st.integers(0, nl.NLA_TYPE_MASK), payload=st.binary(max_size=300))
def test_attribute_round_trips(kind: int, payload: bytes) -> None:
    encoded = nl.attr(kind, payload)
    assert len(encoded) % 4 == 0
    assert nl.Attrs.parse(encoded, "test").items == ((kind, payload),)


def test_nested_flag_is_masked_off_when_parsing() -> None:
    parsed = nl.Attrs.parse(nl.attr_nested(7, [nl.attr_u32(1, 5)]), "test")
    assert parsed.items[0][0] == 7
    assert parsed.nested(7, "SOCKETS").u32(1, "FD") == 5


def test_oversized_attribute_is_refused_when_building() -> None:
    with pytest.raises(ValueError, match="attribute 10 too long"):
        nl.attr(10, bytes(70000))


# -- requests ------------------------------------------------------------------------


@little_endian
def test_connect_request_matches_the_kernel_layout() -> None:
    datagram = nl.connect_request(
        NBD_FAMILY_ID,
        7,
        fds=[5],
        size=64 << 20,
        block_size=4096,
        server_flags=0x10D,
        client_flags=0,
        timeout=30,
        dead_conn_timeout=60,
        backend_id="raw:/d",
        index=None,
    )
    assert datagram == h(
        """
        78000000 1d00 0500 07000000 00000000   # nlmsghdr: 120 bytes, REQUEST|ACK, seq 7
        01 01 0000                             # genlmsghdr: CONNECT, version 1
        0c00 0200 0000000400000000             # SIZE_BYTES 64 MiB
        0c00 0300 0010000000000000             # BLOCK_SIZE_BYTES 4096
        0c00 0400 1e00000000000000             # TIMEOUT 30
        0c00 0500 0d01000000000000             # SERVER_FLAGS 0x10d
        0c00 0600 0000000000000000             # CLIENT_FLAGS 0
        0c00 0800 3c00000000000000             # DEAD_CONN_TIMEOUT 60
        0b00 0a00 7261773a2f6400 00            # BACKEND_IDENTIFIER "raw:/d" NUL, pad
        1000 0780 0c00 0180 0800 0100 05000000 # SOCKETS { SOCK_ITEM { SOCK_FD 5 } }
        """
    )


@little_endian
def test_connect_request_with_index_and_two_sockets() -> None:
    datagram = nl.connect_request(
        NBD_FAMILY_ID,
        8,
        fds=[5, 6],
        size=512,
        block_size=512,
        server_flags=0x101,
        client_flags=nl.ClientFlag.DESTROY_ON_DISCONNECT,
        timeout=1,
        dead_conn_timeout=0,
        backend_id=None,
        index=3,
    )
    attrs = nl.Attrs.parse(datagram[20:], "connect")
    assert attrs.u32(nl.NbdAttr.INDEX, "INDEX") == 3
    assert attrs.get(nl.NbdAttr.BACKEND_IDENTIFIER) is None
    assert attrs.get(nl.NbdAttr.CLIENT_FLAGS) == struct.pack("=Q", 1)
    sockets = attrs.nested(nl.NbdAttr.SOCKETS, "SOCKETS")
    fds = [nl.Attrs.parse(item, "item").u32(nl.NBD_SOCK_FD, "FD") for _, item in sockets.items]
    assert fds == [5, 6]


@little_endian
def test_reconfigure_request_sends_only_what_changes() -> None:
    datagram = nl.reconfigure_request(NBD_FAMILY_ID, 2, 3, fds=[9], backend_id="b", timeout=10)
    assert datagram == h(
        """
        40000000 1d00 0500 02000000 00000000   # nlmsghdr: 64 bytes, REQUEST|ACK, seq 2
        03 01 0000                             # genlmsghdr: RECONFIGURE, version 1
        0800 0100 03000000                     # INDEX 3
        0600 0a00 6200 0000                    # BACKEND_IDENTIFIER "b" NUL, pad
        0c00 0400 0a00000000000000             # TIMEOUT 10
        1000 0780 0c00 0180 0800 0100 09000000 # SOCKETS { SOCK_ITEM { SOCK_FD 9 } }
        """
    )


@little_endian
def test_disconnect_request_names_the_device() -> None:
    assert nl.disconnect_request(NBD_FAMILY_ID, 4, 12) == h(
        """
        1c000000 1d00 0500 04000000 00000000   # nlmsghdr: 28 bytes, REQUEST|ACK, seq 4
        02 01 0000                             # genlmsghdr: DISCONNECT, version 1
        0800 0100 0c000000                     # INDEX 12
        """
    )


@little_endian
def test_status_request_without_index_asks_for_every_device() -> None:
    assert nl.status_request(NBD_FAMILY_ID, 9) == h(
        "14000000 1d00 0500 09000000 00000000  05 01 0000"
    )


@little_endian
def test_getfamily_request_goes_to_the_controller() -> None:
    assert nl.getfamily_request("nbd", 1) == h(
        """
        1c000000 1000 0500 01000000 00000000   # nlmsghdr: 28 bytes, GENL_ID_CTRL, seq 1
        03 01 0000                             # CTRL_CMD_GETFAMILY, version 1
        0800 0200 6e626400                     # CTRL_ATTR_FAMILY_NAME "nbd" NUL
        """
    )


# -- replies -------------------------------------------------------------------------


@little_endian
def test_status_reply_and_ack_complete_a_transaction() -> None:
    transaction = nl.Transaction(9)
    assert not transaction.feed(STATUS_REPLY, "status")
    assert transaction.feed(STATUS_ACK, "status")
    assert transaction.error == nl.ErrorReply(0)
    assert nl.parse_status(transaction.replies[0]) == {0: False, 1: True}


@little_endian
def test_transaction_ignores_replies_to_other_requests() -> None:
    transaction = nl.Transaction(10)
    assert not transaction.feed(STATUS_REPLY + STATUS_ACK, "status")
    assert transaction.replies == []


@little_endian
def test_connect_reply_carries_the_device_index() -> None:
    reply = message(NBD_FAMILY_ID, 0, 1, h("01 01 0000  0800 0100 05000000"))
    (msg,) = nl.split_messages(reply)
    assert nl.parse_index(nl.parse_genl(msg, "connect reply")) == 5


@little_endian
def test_error_reply_gives_errno_and_extended_ack_text() -> None:
    body = (
        struct.pack("=i", -errno.EBUSY)
        + h("14000000 1d00 0500 01000000 00000000")  # echoed request header (capped)
        + nl.attr_str(nl.ErrAttr.MSG, "device busy")
    )
    flags = nl.MsgFlag.CAPPED | nl.MsgFlag.ACK_TLVS
    (msg,) = nl.split_messages(message(nl.MsgType.ERROR, flags, 1, body))
    assert nl.parse_error(msg) == nl.ErrorReply(errno.EBUSY, "device busy")


@little_endian
def test_error_reply_with_the_whole_request_echoed_still_finds_the_text() -> None:
    echoed = nl.disconnect_request(NBD_FAMILY_ID, 1, 12)
    body = struct.pack("=i", -errno.EINVAL) + echoed + nl.attr_str(nl.ErrAttr.MSG, "no")
    (msg,) = nl.split_messages(message(nl.MsgType.ERROR, nl.MsgFlag.ACK_TLVS, 1, body))
    assert nl.parse_error(msg) == nl.ErrorReply(errno.EINVAL, "no")


def test_family_reply_gives_id_version_maxattr_and_groups() -> None:
    groups = nl.attr_nested(
        nl.CtrlAttr.MCAST_GROUPS,
        [
            nl.attr_nested(
                1,
                [
                    nl.attr_str(nl.CtrlMcastAttr.NAME, "nbd_mc_group"),
                    nl.attr_u32(nl.CtrlMcastAttr.ID, 27),
                ],
            )
        ],
    )
    attrs = (
        nl.attr_str(nl.CtrlAttr.FAMILY_NAME, "nbd")
        + nl.attr(nl.CtrlAttr.FAMILY_ID, struct.pack("=H", 0x1D))
        + nl.attr_u32(nl.CtrlAttr.VERSION, 1)
        + nl.attr_u32(nl.CtrlAttr.MAXATTR, 10)
        + groups
    )
    reply = nl.GenlReply(1, 2, nl.Attrs.parse(attrs, "family"))
    assert nl.parse_family(reply) == nl.Family("nbd", 0x1D, 1, 10, {"nbd_mc_group": 27})


# -- hostile input -------------------------------------------------------------------


def test_attribute_longer_than_the_buffer_is_named() -> None:
    with pytest.raises(nl.NetlinkError, match="attribute type 2 at offset 0 has length 200"):
        nl.Attrs.parse(struct.pack("=HH", 200, 2) + bytes(8), "reply")


def test_attribute_shorter_than_its_header_is_refused() -> None:
    with pytest.raises(nl.NetlinkError, match="has length 2"):
        nl.Attrs.parse(struct.pack("=HH", 2, 1), "reply")


def test_message_length_beyond_the_datagram_is_refused() -> None:
    with pytest.raises(nl.NetlinkError, match="length 400 out of range"):
        nl.split_messages(struct.pack("=IHHII", 400, 2, 0, 1, 0))


def test_message_length_below_its_header_is_refused() -> None:
    with pytest.raises(nl.NetlinkError, match="length 4 out of range"):
        nl.split_messages(struct.pack("=IHHII", 4, 2, 0, 1, 0))


def test_short_integer_attribute_names_the_attribute() -> None:
    attrs = nl.Attrs.parse(nl.attr(nl.NbdAttr.INDEX, b"\x01\x00"), "connect reply")
    with pytest.raises(nl.NetlinkError, match=r"NBD_ATTR_INDEX \(1\) has 2 bytes, expected 4"):
        nl.parse_index(nl.GenlReply(1, 1, attrs))


def test_missing_index_in_connect_reply_is_named() -> None:
    with pytest.raises(nl.NetlinkError, match=r"NBD_ATTR_INDEX \(1\) is missing"):
        nl.parse_index(nl.GenlReply(1, 1, nl.Attrs.parse(b"", "connect reply")))


def test_status_item_without_index_is_named() -> None:
    item = nl.attr_nested(nl.NBD_DEVICE_ITEM, [nl.attr(nl.NBD_DEVICE_CONNECTED, b"\x01")])
    reply = nl.GenlReply(
        5, 1, nl.Attrs.parse(nl.attr_nested(nl.NbdAttr.DEVICE_LIST, [item]), "status")
    )
    with pytest.raises(nl.NetlinkError, match=r"NBD_DEVICE_INDEX \(1\) is missing"):
        nl.parse_status(reply)


def test_truncated_error_reply_is_refused() -> None:
    (msg,) = nl.split_messages(message(nl.MsgType.ERROR, 0, 1, struct.pack("=i", -1)))
    with pytest.raises(nl.NetlinkError, match="netlink error reply: 4 bytes"):
        nl.parse_error(msg)


@given(st.binary(max_size=200))
def test_arbitrary_datagrams_parse_or_raise_netlink_error(data: bytes) -> None:
    transaction = nl.Transaction(1)
    try:
        transaction.feed(data, "fuzz")
        for reply in transaction.replies:
            nl.parse_status(reply)
    except nl.NetlinkError:
        pass
