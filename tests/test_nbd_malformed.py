"""Malformed and hostile input over raw sockets: the server answers or hangs up, and lives on.

The wire layouts are spelled out here, independently of ``tapdisk.nbd``, so a
mistake in the codec's own tables cannot hide in both places.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from helpers import proc_status

MiB = 1 << 20

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = 0x80000001, 0x80000003, 0x80000006
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = (
    0,
    1,
    2,
    3,
    4,
    6,
    7,
)
FLAG_FUA, FLAG_DF = 1, 4
EPERM, EINVAL, ENOSPC = 1, 22, 28
CHUNK_OFFSET_DATA, CHUNK_ERROR = 1, 0x8001

GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")


class Client:
    """A hand-driven NBD client on a unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def greeting(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = GREETING.unpack(self.recv(GREETING.size))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", client_flags))
        return flags

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, option, kind, length = OPTION_REPLY.unpack(self.recv(OPTION_REPLY.size))
        assert magic == OPTION_REPLY_MAGIC
        return option, kind, self.recv(length)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        """Replies to ``option`` up to and including the final one (ACK or error)."""
        result = []
        while True:
            answered, kind, data = self.reply()
            assert answered == option
            result.append((kind, data))
            if kind == REP_ACK or kind & 0x80000000:
                return result

    def go(self, name: str = "", *, structured: bool = False, meta: bool = False) -> int:
        """Negotiate; return the transmission flags."""
        self.greeting()
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            assert self.replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        if meta:
            self.option(OPT_SET_META_CONTEXT, meta_request(name, ["base:allocation"]))
            assert self.replies(OPT_SET_META_CONTEXT)[-1][0] == REP_ACK
        self.option(OPT_GO, info_request(name))
        flags = None
        for kind, data in self.replies(OPT_GO):
            if kind == REP_INFO and data[:2] == b"\0\0":
                _, flags = struct.unpack(">QH", data[2:])
            assert kind in (REP_INFO, REP_ACK), hex(kind)
        assert flags is not None
        return flags

    def request(
        self, command: int, offset: int, length: int, flags: int = 0, cookie: int = 1
    ) -> None:
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length))

    def simple_reply(self) -> tuple[int, int]:
        """(error, cookie) of the next simple reply."""
        magic, error, cookie = SIMPLE_REPLY.unpack(self.recv(SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of the next structured reply chunk."""
        magic, flags, kind, cookie, length = CHUNK.unpack(self.recv(CHUNK.size))
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, kind, cookie, self.recv(length)

    def read(self, offset: int, length: int, cookie: int = 7) -> bytes:
        """A READ with simple replies that must succeed."""
        self.request(CMD_READ, offset, length, cookie=cookie)
        assert self.simple_reply() == (0, cookie)
        return self.recv(length)

    def assert_closed(self, within: float = 5) -> None:
        """The server hung up (EOF or reset) within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass

    def close(self) -> None:
        self.sock.close()


def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_request(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        body += struct.pack(">I", len(query)) + query.encode()
    return body


def server_rss_peak(pid: int) -> int:
    """Peak resident memory of a process, in bytes."""
    return proc_status(pid, "VmHWM") * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def server(serve, tmp_path):
    """A served 4 MiB image filled with 0x5a; the Served object has the image in .image."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * 4 * MiB)
    served = serve(f"disk=raw:{image}")
    served.image = image
    return served


@pytest.fixture
def ro_server(serve, tmp_path):
    image = tmp_path / "ro.raw"
    image.write_bytes(b"\x5a" * MiB)
    served = serve(f"disk=raw:{image}", "--read-only")
    served.image = image
    return served


# -- handshake -----------------------------------------------------------------------


def test_greeting_offers_fixed_newstyle_and_no_zeroes(server):
    client = Client(server.socket)
    assert client.greeting() == 3
    client.close()


def test_garbage_handshake_closes_that_connection_only(server):
    bystander = Client(server.socket)
    bystander.go()
    client = Client(server.socket)
    client.recv(GREETING.size)
    client.sock.sendall(b"\x00\x00\x00\x03" + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    client.assert_closed()
    assert bystander.read(0, 4) == b"\x5a" * 4
    fresh = Client(server.socket)
    fresh.go()
    assert fresh.read(4096, 4) == b"\x5a" * 4


def test_unknown_client_flag_bits_close_the_connection(server):
    client = Client(server.socket)
    client.greeting(client_flags=0x3 | 0x100)
    client.assert_closed()


def test_unknown_option_gets_err_unsup_and_negotiation_continues(server):
    client = Client(server.socket)
    client.greeting()
    client.option(0x1234, b"whatever")
    kind, message = client.replies(0x1234)[0]
    assert kind == ERR_UNSUP and message
    client.option(4)  # PEEK_EXPORT was withdrawn from the spec
    assert client.replies(4)[0][0] == ERR_UNSUP
    client.option(OPT_GO, info_request(""))
    assert client.replies(OPT_GO)[-1][0] == REP_ACK
    assert client.read(0, 8) == b"\x5a" * 8


def test_a_2_gib_go_option_is_hung_up_on_at_once(server):
    # Only the header is sent: a server that waits for the 2 GiB never hangs up.
    client = Client(server.socket)
    client.greeting()
    client.sock.sendall(OPTION.pack(IHAVEOPT, OPT_GO, 2 << 30))
    client.assert_closed()
    fresh = Client(server.socket)
    fresh.go()
    assert fresh.read(0, 8) == b"\x5a" * 8


def test_an_oversized_option_with_its_data_is_hung_up_on(server):
    client = Client(server.socket)
    client.greeting()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        client.option(OPT_LIST, b"\x00" * (MiB + 3))  # the server stops reading mid-way


def test_list_with_data_gets_err_invalid(server):
    client = Client(server.socket)
    client.greeting()
    client.option(OPT_LIST, b"junk")
    assert client.replies(OPT_LIST)[0][0] == ERR_INVALID
    client.option(OPT_LIST)
    replies = client.replies(OPT_LIST)
    assert replies[-1] == (REP_ACK, b"")
    assert [data[4 : 4 + struct.unpack(">I", data[:4])[0]] for _, data in replies[:-1]] == [b"disk"]


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
@pytest.mark.parametrize(
    "payload",
    [
        b"",  # too short for the name length and the count
        struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0),  # name runs past the data
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + struct.pack(">H", 1),  # count
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) + b"x",  # trailing byte
    ],
    ids=["short", "name-overrun", "count-overrun", "trailing"],
)
def test_info_and_go_with_inconsistent_lengths_get_err_invalid(server, option, payload):
    client = Client(server.socket)
    client.greeting()
    client.option(option, payload)
    assert client.replies(option)[0][0] == ERR_INVALID
    client.option(OPT_GO, info_request("disk"))
    assert client.replies(OPT_GO)[-1][0] == REP_ACK
    assert client.read(0, 4) == b"\x5a" * 4


def test_go_for_an_unknown_export_gets_err_unknown(server):
    client = Client(server.socket)
    client.greeting()
    client.option(OPT_GO, info_request("nope"))
    assert client.replies(OPT_GO)[0][0] == ERR_UNKNOWN
    client.option(OPT_GO, info_request("disk"))
    assert client.replies(OPT_GO)[-1][0] == REP_ACK


def test_set_meta_context_before_structured_reply_gets_err_invalid(server):
    client = Client(server.socket)
    client.greeting()
    client.option(OPT_SET_META_CONTEXT, meta_request("disk", ["base:allocation"]))
    assert client.replies(OPT_SET_META_CONTEXT)[0][0] == ERR_INVALID
    client.option(OPT_GO, info_request("disk"))
    assert client.replies(OPT_GO)[-1][0] == REP_ACK
    # No context was selected, so BLOCK_STATUS is refused.
    client.request(CMD_BLOCK_STATUS, 0, 4096, cookie=3)
    assert client.simple_reply() == (EINVAL, 3)


def test_abort_gets_an_ack_then_the_server_closes(server):
    client = Client(server.socket)
    client.greeting()
    client.option(OPT_ABORT)
    assert client.replies(OPT_ABORT) == [(REP_ACK, b"")]
    client.assert_closed()


def test_export_name_without_no_zeroes_pads_124_zero_bytes(server):
    client = Client(server.socket)
    client.greeting(client_flags=1)
    client.option(OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", client.recv(10))
    assert size == 4 * MiB and flags & 1
    assert client.recv(124) == bytes(124)
    assert client.read(0, 4) == b"\x5a" * 4


def test_export_name_with_no_zeroes_sends_no_padding(server):
    client = Client(server.socket)
    client.greeting(client_flags=3)
    client.option(OPT_EXPORT_NAME, b"")  # the default export
    size, _ = struct.unpack(">QH", client.recv(10))
    assert size == 4 * MiB
    # The next bytes are the reply to our first request, not padding.
    assert client.read(0, 4) == b"\x5a" * 4


def test_export_name_for_an_unknown_export_hangs_up(server):
    client = Client(server.socket)
    client.greeting()
    client.option(OPT_EXPORT_NAME, b"nope")
    client.assert_closed()


def test_stalled_handshake_times_out(serve, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    served = serve(f"raw:{image}", "--handshake-timeout", "1")
    client = Client(served.socket)
    client.recv(GREETING.size)  # then say nothing
    start = time.monotonic()
    client.assert_closed(within=10)
    assert 0.5 < time.monotonic() - start < 5


# -- transmission --------------------------------------------------------------------


def test_bad_request_magic_closes_that_connection_only(server):
    bystander = Client(server.socket)
    bystander.go()
    client = Client(server.socket)
    client.go()
    client.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
    client.assert_closed()
    assert bystander.read(0, 4) == b"\x5a" * 4


def test_read_out_of_range_gets_einval_and_the_connection_lives(server):
    client = Client(server.socket)
    client.go()
    client.request(CMD_READ, 4 * MiB - 512, 1024, cookie=11)
    assert client.simple_reply() == (EINVAL, 11)
    client.request(CMD_READ, 4 * MiB, 1, cookie=12)
    assert client.simple_reply() == (EINVAL, 12)
    assert client.read(4 * MiB - 4, 4) == b"\x5a" * 4


def test_structured_read_error_is_an_error_chunk(server):
    client = Client(server.socket)
    client.go(structured=True)
    client.request(CMD_READ, 4 * MiB, 512, cookie=5)
    flags, kind, cookie, payload = client.chunk()
    assert (flags & 1, kind, cookie) == (1, CHUNK_ERROR, 5)
    assert struct.unpack(">I", payload[:4])[0] == EINVAL
    client.request(CMD_READ, 0, 16, cookie=6)
    flags, kind, cookie, payload = client.chunk()
    assert (flags & 1, kind, cookie) == (1, CHUNK_OFFSET_DATA, 6)
    assert payload == struct.pack(">Q", 0) + b"\x5a" * 16


def test_offset_plus_length_overflowing_64_bits_gets_einval(server):
    client = Client(server.socket)
    client.go()
    near_end = 2**64 - 512
    client.request(CMD_READ, near_end, 1024, cookie=21)
    assert client.simple_reply() == (EINVAL, 21)
    client.request(CMD_TRIM, near_end, 1024, cookie=22)
    assert client.simple_reply() == (EINVAL, 22)
    client.request(CMD_WRITE, near_end, 1024, cookie=23)
    client.sock.sendall(b"w" * 1024)
    assert client.simple_reply()[1] == 23
    assert client.read(0, 4) == b"\x5a" * 4
    assert server.image.read_bytes() == b"\x5a" * 4 * MiB


def test_write_beyond_the_end_gets_enospc_and_its_payload_is_skipped(server):
    client = Client(server.socket)
    client.go()
    client.request(CMD_WRITE, 4 * MiB - 100, 200, cookie=31)
    client.sock.sendall(b"w" * 200)
    assert client.simple_reply() == (ENOSPC, 31)
    client.request(CMD_WRITE_ZEROES, 4 * MiB - 100, 200, cookie=32)
    assert client.simple_reply() == (ENOSPC, 32)
    assert client.read(4 * MiB - 100, 100) == b"\x5a" * 100
    assert server.image.stat().st_size == 4 * MiB


def test_read_only_export_refuses_changes_with_eperm_and_stays_in_sync(ro_server):
    client = Client(ro_server.socket)
    flags = client.go()
    assert flags & 2  # READ_ONLY
    client.request(CMD_WRITE, 0, 65536, cookie=41)
    # A payload that looks like requests: if it were not consumed, it would be parsed.
    fake = REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
    client.sock.sendall((fake * (65536 // len(fake) + 1))[:65536])
    assert client.simple_reply() == (EPERM, 41)
    client.request(CMD_TRIM, 0, 4096, cookie=42)
    assert client.simple_reply() == (EPERM, 42)
    client.request(CMD_WRITE_ZEROES, 0, 4096, cookie=43)
    assert client.simple_reply() == (EPERM, 43)
    assert client.read(0, 4) == b"\x5a" * 4
    assert ro_server.image.read_bytes() == b"\x5a" * MiB


def test_unknown_command_gets_einval(server):
    client = Client(server.socket)
    client.go()
    client.request(42, 0, 512, cookie=51)
    assert client.simple_reply() == (EINVAL, 51)
    assert client.read(0, 4) == b"\x5a" * 4


def test_unknown_command_flag_gets_einval(server):
    client = Client(server.socket)
    client.go()
    client.request(CMD_READ, 0, 512, flags=1 << 9, cookie=61)
    assert client.simple_reply() == (EINVAL, 61)
    client.request(CMD_FLUSH, 0, 0, flags=1 << 1, cookie=62)  # NO_HOLE on a flush
    assert client.simple_reply() == (EINVAL, 62)
    client.request(CMD_WRITE, 0, 8, flags=FLAG_DF, cookie=63)  # DF only applies to reads
    client.sock.sendall(b"x" * 8)
    assert client.simple_reply() == (EINVAL, 63)
    client.request(CMD_READ, 0, 512, flags=FLAG_DF, cookie=64)  # DF needs structured replies
    assert client.simple_reply() == (EINVAL, 64)
    assert client.read(0, 8) == b"\x5a" * 8


def test_flush_with_an_offset_gets_einval(server):
    client = Client(server.socket)
    client.go()
    client.request(CMD_FLUSH, 4096, 0, cookie=71)
    assert client.simple_reply() == (EINVAL, 71)
    client.request(CMD_FLUSH, 0, 0, flags=FLAG_FUA, cookie=72)
    assert client.simple_reply() == (0, 72)


def test_read_over_32_mib_gets_einval_and_payload_less_commands_may_exceed_it(serve, tmp_path):
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    served = serve(f"raw:{image}")
    client = Client(served.socket)
    client.go()
    client.request(CMD_READ, 0, 32 * MiB + 1, cookie=1)
    assert client.simple_reply() == (EINVAL, 1)
    client.request(CMD_WRITE_ZEROES, 0, 48 * MiB, cookie=2)
    assert client.simple_reply() == (0, 2)
    client.request(CMD_TRIM, 0, 64 * MiB, cookie=3)
    assert client.simple_reply() == (0, 3)
    assert client.read(0, 4) == bytes(4)


def test_write_over_32_mib_disconnects_without_allocating_it(server):
    bystander = Client(server.socket)
    bystander.go()
    before = server_rss_peak(server.proc.pid)
    client = Client(server.socket)
    client.go()
    client.request(CMD_WRITE, 0, 2**32 - 1, cookie=81)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may hang up at once
        client.sock.sendall(b"x" * 65536)
    client.assert_closed()
    assert server_rss_peak(server.proc.pid) - before < 16 * MiB
    assert bystander.read(0, 4) == b"\x5a" * 4


def test_many_large_reads_sent_at_once_do_not_exhaust_memory(serve, tmp_path):
    image = tmp_path / "big.raw"
    image.write_bytes(b"\x3c" * 32 * MiB)
    served = serve(f"raw:{image}")
    client = Client(served.socket)
    client.go()
    before = server_rss_peak(served.proc.pid)
    count = 24  # 768 MiB of replies if the server buffered them all
    client.sock.sendall(
        b"".join(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, i, 0, 32 * MiB) for i in range(count))
    )
    time.sleep(1)  # let the server do whatever it does before anyone reads
    peak = server_rss_peak(served.proc.pid) - before
    cookies = set()
    for _ in range(count):
        error, cookie = client.simple_reply()
        assert error == 0
        cookies.add(cookie)
        data = client.recv(32 * MiB)
        assert data[:4] == data[-4:] == b"\x3c" * 4
    assert cookies == set(range(count))
    assert peak < 320 * MiB, f"server grew by {peak >> 20} MiB"


def test_disconnect_with_requests_in_flight_leaks_nothing(serve, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * 16 * MiB)
    served = serve(f"raw:{image}")
    pid = served.proc.pid
    first = Client(served.socket)
    first.go()
    baseline = open_fds(pid)
    for _ in range(5):
        client = Client(served.socket)
        client.go()
        requests = b"".join(
            REQUEST.pack(REQUEST_MAGIC, FLAG_FUA, CMD_WRITE, i, i * 65536, 65536) + b"w" * 65536
            for i in range(64)
        ) + b"".join(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, i, 0, MiB) for i in range(64))
        client.sock.sendall(requests)
        client.sock.close()
    assert first.read(0, 4) in (b"\x5a" * 4, b"w" * 4)
    deadline = time.monotonic() + 10
    while open_fds(pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(pid) == baseline
    first.close()
    start = time.monotonic()
    assert served.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 3


def test_disc_finishes_in_flight_requests_then_closes(server):
    client = Client(server.socket)
    client.go()
    client.sock.sendall(
        REQUEST.pack(REQUEST_MAGIC, FLAG_FUA, CMD_WRITE, 91, 0, 4096)
        + b"d" * 4096
        + REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
        + REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 92, 0, 4096)  # must be ignored
    )
    assert client.simple_reply() == (0, 91)
    client.assert_closed()
    assert server.image.read_bytes()[:4096] == b"d" * 4096


def test_disc_after_requests_answered_at_once_still_sends_their_replies(server):
    """A read from the page cache and a plain write are answered while their receive is
    decoded; a DISC in the same receive closes only after those replies have left."""
    client = Client(server.socket)
    client.go()
    client.read(0, 4096)  # the image's first page is in the page cache now
    client.sock.sendall(
        REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 93, 0, 4096)
        + REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 94, 8192, 4096)
        + b"e" * 4096
        + REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
    )
    assert client.simple_reply() == (0, 93)
    assert client.recv(4096) == b"\x5a" * 4096
    assert client.simple_reply() == (0, 94)
    client.assert_closed()
    assert server.image.read_bytes()[8192:12288] == b"e" * 4096
