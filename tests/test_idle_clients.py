"""Idle and slow clients against a real ``tapdisk serve``: what they cost, and that others get in.

Memory is the server's ``VmRSS`` from /proc, with wide margins (measured: 3.5 KiB per idle
connection; the limits asserted are MBs).  The wire is spelled out here (fixed newstyle,
EXPORT_NAME, request headers) so a thousand clients cost the test only sockets.
"""

from __future__ import annotations

import resource
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from helpers import TAPDISK, proc_status, require, run

MiB = 1 << 20
IDLE = 1000
#: What IDLE idle connections may cost together (the issue's bound).
IDLE_BUDGET_KIB = 64 * 1024

GREETING_SIZE = 18
NEGOTIATE = struct.pack(">IQII", 3, 0x49484156454F5054, 1, 0)  # flags, EXPORT_NAME ""
EXPORT_NAME_REPLY_SIZE = 10  # size and flags (NO_ZEROES)
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_WRITE = 1


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise EOFError(f"server closed after {len(data)} of {n} bytes")
        data += part
    return bytes(data)


def connect(path: Path) -> socket.socket:
    """A client that has read the greeting and sends nothing."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(path))
    recv_exactly(sock, GREETING_SIZE)
    return sock


def negotiate(sock: socket.socket) -> None:
    sock.sendall(NEGOTIATE)
    recv_exactly(sock, EXPORT_NAME_REPLY_SIZE)


def write_request(cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, cookie, offset, length)


def simple_reply(sock: socket.socket) -> tuple[int, int]:
    magic, error, cookie = SIMPLE_REPLY.unpack(recv_exactly(sock, SIMPLE_REPLY.size))
    assert magic == SIMPLE_REPLY_MAGIC
    return error, cookie


class Server:
    """A ``tapdisk serve`` whose log goes to a file (a pipe nobody reads could block it)."""

    def __init__(self, tmp_path: Path, image: Path, *args: str) -> None:
        self.socket = tmp_path / "s.sock"
        self.log = tmp_path / "serve.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [TAPDISK, "serve", "--unix", str(self.socket), *args, f"raw:{image}"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline(), self.log.read_text()
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def rss_kib(self) -> int:
        return proc_status(self.proc.pid, "VmRSS")

    def serves_nbdinfo(self) -> None:
        assert run(require("nbdinfo"), "--size", self.uri, timeout=30).strip()

    def settled_rss_kib(self, below: int, seconds: float = 20) -> int:
        """RSS once it is below ``below`` KiB, else after ``seconds`` (the sweep runs every
        2 s); the caller asserts."""
        deadline = time.monotonic() + seconds
        rss = self.rss_kib()
        while rss >= below and time.monotonic() < deadline:
            time.sleep(0.5)
            rss = self.rss_kib()
        return rss

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0, self.log.read_text()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(512 * MiB)
    return path


@pytest.fixture(autouse=True)
def enough_files() -> Iterator[None]:
    """Room for IDLE sockets here; the server raises its own limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * IDLE + 256)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_idle_clients_cost_under_64_mb_and_give_it_back(tmp_path, image):
    # Default limits: a thousand idle clients fit under both.
    server = Server(tmp_path, image, "--handshake-timeout", "300")
    clients: list[socket.socket] = []
    try:
        server.serves_nbdinfo()  # the first client's code paths are warm before measuring
        base = server.rss_kib()
        clients = [connect(server.socket) for _ in range(IDLE)]
        server.serves_nbdinfo()
        assert server.rss_kib() - base < IDLE_BUDGET_KIB
        for sock in clients:
            negotiate(sock)
        server.serves_nbdinfo()
        assert server.rss_kib() - base < IDLE_BUDGET_KIB
        # A burst of 40 pipelined 4 KiB writes grows each receive buffer to its largest
        # (256 MB in all); idle again, the buffers are given back.
        burst = b"".join(write_request(i, i * 4096, 4096) + bytes(4096) for i in range(40))
        for sock in clients:
            sock.sendall(burst)
        for sock in clients:
            assert all(simple_reply(sock)[0] == 0 for _ in range(40))
        assert server.settled_rss_kib(below=base + IDLE_BUDGET_KIB) - base < IDLE_BUDGET_KIB
        server.serves_nbdinfo()
        for sock in clients:
            sock.close()
        clients = []
        assert server.settled_rss_kib(below=base + 16 * 1024) - base < 16 * 1024
        server.serves_nbdinfo()
    finally:
        for sock in clients:
            sock.close()
        server.stop()


def test_sockets_that_never_negotiate_cannot_lock_a_client_out(tmp_path, image):
    server = Server(tmp_path, image, "--max-connections", "4", "--max-handshakes", "16")
    try:
        silent = [connect(server.socket) for _ in range(16)]
        for _ in range(3):  # each client closes the oldest silent socket and gets in
            server.serves_nbdinfo()
        for sock in silent:
            sock.close()
    finally:
        server.stop()
    assert "closing the oldest of 16 clients still negotiating" in server.log.read_text()


def test_clients_past_the_handshake_are_limited_apart_from_those_negotiating(tmp_path, image):
    server = Server(tmp_path, image, "--max-connections", "2", "--max-handshakes", "4")
    try:
        negotiated = [connect(server.socket) for _ in range(2)]
        for sock in negotiated:
            negotiate(sock)
        refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        refused.settimeout(30)
        refused.connect(str(server.socket))
        try:
            greeting = refused.recv(GREETING_SIZE)
        except ConnectionResetError:
            greeting = b""
        assert greeting == b""  # closed at connect
        refused.close()
        negotiated.pop().close()
        for _ in range(100):  # the server notices the goodbye shortly after
            try:
                server.serves_nbdinfo()
                break
            except AssertionError:
                time.sleep(0.1)
        else:
            raise AssertionError("no client got in after one of two hung up")
        for sock in negotiated:
            sock.close()
    finally:
        server.stop()
    assert "refusing a connection: 2 clients are connected, the most allowed" in (
        server.log.read_text()
    )


def test_a_client_that_finishes_negotiating_once_the_limit_is_full_is_closed(tmp_path, image):
    server = Server(tmp_path, image, "--max-connections", "1")
    try:
        late, early = connect(server.socket), connect(server.socket)
        negotiate(early)
        late.sendall(NEGOTIATE)
        with pytest.raises((EOFError, ConnectionResetError)):
            recv_exactly(late, EXPORT_NAME_REPLY_SIZE + 1)  # the reply, then nothing
        late.close()
        early.close()
    finally:
        server.stop()
    assert "refusing a connection: 1 clients are connected" in server.log.read_text()


def test_slow_writers_stay_within_the_write_budget_and_others_are_served(tmp_path, image):
    writers, size = 8, 32 * MiB  # 256 MiB of payloads if each got its buffer
    server = Server(tmp_path, image, "--write-budget", "64")
    socks: list[socket.socket] = []
    try:
        server.serves_nbdinfo()
        base = server.rss_kib()
        for i in range(writers):
            sock = connect(server.socket)
            negotiate(sock)
            sock.sendall(write_request(i, i * size, size) + bytes([i]))
            socks.append(sock)
        for _ in range(3):  # a byte at a time, after the server has read the previous ones
            time.sleep(0.3)
            for i, sock in enumerate(socks):
                sock.sendall(bytes([i]))
        # Two payloads hold the 64 MiB budget; the six others wait, unread.
        assert server.rss_kib() - base < (64 + 32) * 1024
        other = nbd.NBD()
        other.connect_uri(server.uri)
        other.pwrite(b"\xa5" * 4096, 400 * MiB)
        assert other.pread(4096, 400 * MiB) == b"\xa5" * 4096
        server.serves_nbdinfo()
        # The writers finish in turn: each payload that arrives lets the next one be read.
        for i, sock in enumerate(socks):
            sock.sendall(bytes([i]) * (size - 4))
        for i, sock in enumerate(socks):
            assert simple_reply(sock) == (0, i)
        for i in range(writers):
            assert other.pread(8, i * size + size - 8) == bytes([i]) * 8
        other.shutdown()
    finally:
        for sock in socks:
            sock.close()
        server.stop()
