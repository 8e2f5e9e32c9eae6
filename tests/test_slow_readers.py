"""Clients that send READs and do not take the replies, against a real ``tapdisk serve``.

Memory is the server's ``VmRSS`` from /proc, with wide margins (the limits asserted are
tens of MB; without the reply limits these clients pin hundreds).  The server runs with
``--direct`` so that no read is answered inline: every reply a client asked for is read
into memory while the ones before it wait unsent, the worst case.  The wire is spelled
out here (fixed newstyle, EXPORT_NAME, simple replies) as in test_idle_clients.py.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbd
import pytest
from helpers import TAPDISK
from test_idle_clients import REQUEST, REQUEST_MAGIC, Server, connect, negotiate, simple_reply

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
CMD_READ = 0
#: replybudget.py's STALL_SECONDS: how long a client may take nothing while others wait.
STALL_SECONDS = 10


def block(offset: int) -> bytes:
    """The image's content at ``offset`` (a multiple of 1 MiB): each MiB its own byte."""
    return bytes([offset // MiB % 251 + 1]) * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        for offset in range(0, IMAGE_SIZE, MiB):
            f.write(block(offset))
    return path


def hostile(server: Server, reads: int, length: int, first: int) -> socket.socket:
    """A client that sends ``reads`` READs of ``length`` bytes from ``first`` on, and
    receives nothing."""
    sock = connect(server.socket)
    negotiate(sock)
    sock.sendall(
        b"".join(
            REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, n, (first + n * length) % IMAGE_SIZE, length)
            for n in range(reads)
        )
    )
    return sock


def take_replies(sock: socket.socket, reads: int, length: int, first: int) -> None:
    """Receive every reply of ``hostile``'s READs and check each one's data."""
    for n in range(reads):
        assert simple_reply(sock) == (0, n)
        data = bytearray(length)
        view = memoryview(data)
        while view:
            got = sock.recv_into(view)
            assert got, "the server closed the connection"
            view = view[got:]
        offset = (first + n * length) % IMAGE_SIZE
        assert data == b"".join(block(offset + i) for i in range(0, length, MiB))


def peak_rss_kib(server: Server, seconds: float = 3.0) -> int:
    """The largest RSS seen over ``seconds``, while the server answers what it read."""
    peak, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, server.rss_kib())
        time.sleep(0.1)
    return peak


@pytest.fixture
def server(tmp_path: Path, image: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    args = getattr(request, "param", ())
    server = Server(tmp_path, image, "--direct", *args)
    try:
        server.serves_nbdinfo()  # the first client's code paths are warm before measuring
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("server", [("--reply-budget", "128")], indirect=True)
def test_clients_that_take_no_replies_hold_8_mib_each_and_get_them_all_later(server):
    clients, reads, length = 8, 4, 8 * MiB  # 256 MB if every reply were read and kept
    base = server.rss_kib()
    socks = [hostile(server, reads, length, i * reads * length) for i in range(clients)]
    try:
        # One 8 MiB reply each: the next would go past the connection's 8 MiB.
        assert peak_rss_kib(server) - base < 128 * 1024
        other = nbd.NBD()
        other.connect_uri(server.uri)
        assert other.pread(2 * MiB, 3 * MiB) == block(3 * MiB) + block(4 * MiB)
        server.serves_nbdinfo()
        # Nobody waits for the budget: however long they take nothing, they stay.
        time.sleep(STALL_SECONDS + 2)
        with ThreadPoolExecutor(clients) as pool:
            done = [
                pool.submit(take_replies, sock, reads, length, i * reads * length)
                for i, sock in enumerate(socks)
            ]
            for future in done:
                future.result()
        assert other.pread(MiB, 7 * MiB) == block(7 * MiB)
        other.shutdown()
    finally:
        for sock in socks:
            sock.close()
    assert "took none of its read replies" not in server.log.read_text()


@pytest.mark.parametrize("server", [("--reply-budget", "32")], indirect=True)
def test_replies_not_taken_stay_within_the_reply_budget_and_small_reads_are_served(server):
    clients, length = 12, 16 * MiB  # 192 MB if every reply were read and kept
    base = server.rss_kib()
    socks = [hostile(server, 1, length, i * length) for i in range(clients)]
    try:
        # Two 16 MiB replies hold the 32 MiB budget; the others wait, unread.
        assert peak_rss_kib(server) - base < 96 * 1024
        other = nbd.NBD()
        other.connect_uri(server.uri)
        for offset in range(0, 16 * 4096, 4096):  # small reads need none of the budget
            assert other.pread(4096, offset) == block(0)[:4096]
        server.serves_nbdinfo()
        other.shutdown()
        # They all read at once: each reply taken lets a waiting one be read.
        with ThreadPoolExecutor(clients) as pool:
            done = [
                pool.submit(take_replies, sock, 1, length, i * length)
                for i, sock in enumerate(socks)
            ]
            for future in done:
                future.result()
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("server", [("--reply-budget", "16")], indirect=True)
def test_a_client_that_takes_nothing_while_others_wait_for_the_budget_is_closed(server):
    stalled = hostile(server, 1, 16 * MiB, 0)
    try:
        time.sleep(1)  # its reply holds the whole budget
        other = nbd.NBD()
        other.connect_uri(server.uri)
        # Waits for the budget until the stalled client is closed, then is served.
        assert other.pread(4 * MiB, 32 * MiB) == b"".join(
            block(32 * MiB + i * MiB) for i in range(4)
        )
        other.shutdown()
        with pytest.raises((AssertionError, EOFError, ConnectionResetError)):
            take_replies(stalled, 1, 16 * MiB, 0)
    finally:
        stalled.close()
    assert "the client took none of its read replies" in server.log.read_text()


def test_a_reply_budget_under_1_mib_is_refused(image):
    proc = subprocess.run(
        [TAPDISK, "serve", "--reply-budget", "0", f"raw:{image}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--reply-budget: must be 1 MiB or more, got 0" in proc.stderr
