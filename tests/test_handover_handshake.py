"""tap-ctl restart under a client still in its NBD handshake: the new tapdisk continues it.

The old tapdisk hands a plain connection that has not finished negotiating over with
where its handshake stopped (the options negotiated so far, the bytes of an option
read in part); the new one answers the rest of the options as the old would have, so
the client sees one handshake.  A raw-socket client plays the client, cut at every
stage of its negotiation.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from helpers import recv_exactly
from test_handover import restart

from tapdisk.nbd.constants import IHAVEOPT, Option, Reply, TransmissionFlag
from tapdisk.nbd.handshake import ExportInfo, Handshake, TLSMode

GREETING = struct.Struct(">QQH")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
REQUEST_MAGIC = 0x25609513
WRITE, READ, BLOCK_STATUS = 1, 0, 7
OFFSET_DATA, BLOCK_STATUS_CHUNK = 1, 5


def option(code: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload


#: A client's side of a handshake: its flags, then three options, the last one GO.
CLIENT_FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
OPTIONS = [
    option(Option.STRUCTURED_REPLY),
    option(
        Option.SET_META_CONTEXT,
        struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation",
    ),
    option(Option.GO, struct.pack(">IH", 0, 0)),
]
STREAM = CLIENT_FLAGS + b"".join(OPTIONS)


def complete_options(cut: int) -> int:
    """How many options lie wholly within the first ``cut`` bytes of the stream."""
    end, count = len(CLIENT_FLAGS), 0
    for opt in OPTIONS:
        end += len(opt)
        count += end <= cut
    return count


def option_replies(sock: socket.socket, options: int) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of every reply until ``options`` options are answered."""
    replies = []
    while options:
        magic, code, kind, length = OPTION_REPLY.unpack(recv_exactly(sock, OPTION_REPLY.size))
        assert magic == 0x3E889045565A9
        replies.append((code, kind, recv_exactly(sock, length)))
        options -= kind == Reply.ACK or kind >= 1 << 31
    return replies


def request(sock: socket.socket, command: int, cookie: int, offset: int, length: int) -> None:
    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length))


# -- the codec: a handshake continued in a second Handshake --------------------------


def exports() -> dict[str, ExportInfo]:
    return {"": ExportInfo("", 1 << 20, TransmissionFlag.HAS_FLAGS)}


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_a_handshake_cut_anywhere_continues_in_a_restored_one(cut: int) -> None:
    whole = Handshake(exports(), "")
    expected = whole.take_output()
    expected_result = whole.receive(STREAM)
    expected += whole.take_output()
    first = Handshake(exports(), "")
    output = first.take_output()
    result = first.receive(STREAM[:cut])
    output += first.take_output()
    if result is None:
        state = first.state()
        assert state is not None
        second = Handshake(exports(), "")
        second.restore(state, first.unread())
        assert second.take_output() == b""  # the greeting is not sent again
        result = second.receive(STREAM[cut:])
        output += second.take_output()
    assert (output, result) == (expected, expected_result)
    assert result is not None and result.structured and result.contexts == ((1, "base:allocation"),)


def test_a_handshake_past_starttls_has_no_state_to_carry() -> None:
    handshake = Handshake(exports(), "", TLSMode.ON)
    handshake.receive(CLIENT_FLAGS + option(Option.STARTTLS))
    assert handshake.state() is None


# -- tap-ctl restart with a raw client mid-handshake ---------------------------------


#: Cut points: nothing sent, inside the flags, after the flags, inside an option's header,
#: after an option, inside an option's payload, inside GO.
CUTS = [0, 2, 4, 4 + 9, 4 + 16, 4 + 16 + 20, len(STREAM) - 3]


@pytest.mark.parametrize("cut", CUTS)
def test_restart_mid_handshake_lets_the_client_finish_it_and_do_io(tapctl, raw_image, cut):
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('4M')}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    magic, ihaveopt, _ = GREETING.unpack(recv_exactly(sock, GREETING.size))
    assert (magic, ihaveopt) == (0x4E42444D41474943, IHAVEOPT)
    sock.sendall(STREAM[:cut])
    before = complete_options(cut)
    replies = option_replies(sock, before)  # the old tapdisk answered these
    time.sleep(0.2)  # and read what follows them (bytes still in the socket would move anyway)
    new = restart(tapctl, pid)
    assert tapctl.pids() == [new]
    sock.sendall(STREAM[cut:])
    replies += option_replies(sock, len(OPTIONS) - before)
    assert [(code, kind) for code, kind, _ in replies if kind == Reply.ACK] == [
        (Option.STRUCTURED_REPLY, Reply.ACK),
        (Option.SET_META_CONTEXT, Reply.ACK),
        (Option.GO, Reply.ACK),
    ]
    [context] = [data for _, kind, data in replies if kind == Reply.META_CONTEXT]
    context_id = struct.unpack_from(">I", context)[0]
    assert context[4:] == b"base:allocation"

    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, WRITE, 1, 8192, 4096) + b"h" * 4096)
    assert SIMPLE_REPLY.unpack(recv_exactly(sock, SIMPLE_REPLY.size)) == (0x67446698, 0, 1)
    request(sock, READ, 2, 8192, 4096)  # structured replies carried: one data chunk
    _, flags, kind, cookie, length = CHUNK.unpack(recv_exactly(sock, CHUNK.size))
    assert (flags & 1, kind, cookie, length) == (1, OFFSET_DATA, 2, 8 + 4096)
    assert recv_exactly(sock, length)[8:] == b"h" * 4096
    request(sock, BLOCK_STATUS, 3, 0, 4096)  # and the metadata context selected
    _, flags, kind, cookie, length = CHUNK.unpack(recv_exactly(sock, CHUNK.size))
    assert (kind, cookie) == (BLOCK_STATUS_CHUNK, 3)
    assert struct.unpack_from(">I", recv_exactly(sock, length))[0] == context_id
    sock.close()


def test_restart_carries_hundreds_of_silent_clients_and_each_can_still_negotiate(tapctl, raw_image):
    """Clients that connect and say nothing hold no restart up; 300 of them need two
    SCM_RIGHTS messages.  Any of them may negotiate later, with the new tapdisk."""
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('4M')}")
    silent = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(path)
        recv_exactly(sock, GREETING.size)  # accepted (the listen backlog is 128)
        silent.append(sock)
    new = restart(tapctl, pid)
    for sock in (silent[0], silent[-1]):
        sock.sendall(STREAM)
        replies = option_replies(sock, len(OPTIONS))
        assert [kind for _, kind, _ in replies if kind == Reply.ACK] == [Reply.ACK] * 3
        request(sock, READ, 1, 0, 4096)
        _, _, _, cookie, _ = CHUNK.unpack(recv_exactly(sock, CHUNK.size))
        assert cookie == 1
    assert tapctl.pids() == [new]
    for sock in silent:
        sock.close()
