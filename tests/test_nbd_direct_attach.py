"""No-handshake mode (what the kernel's nbd driver needs): compact requests, simple replies only."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from tapdisk.drivers.raw import RawImage

from tapdisk.export import DirectAttach, Export
from tapdisk.nbd.constants import TransmissionFlag
from tapdisk.server import NBDServer

MiB = 1 << 20
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 6, 7
FUA, NO_HOLE, DF = 1, 2, 4
EPERM, EINVAL = 1, 22


class Peer:
    """The kernel's side of the socketpair, driven by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, command: int, offset: int, length: int, *, flags=0, cookie=0, data=b""):
        packet = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length) + data
        await self.loop.sock_sendall(self.sock, packet)

    async def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, n - len(data)), 10)
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    async def reply(self) -> tuple[int, int]:
        """(error, cookie) of a reply, which must be a simple one."""
        magic, error, cookie = SIMPLE_REPLY.unpack(await self.recv(SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, f"reply magic {magic:#x} is not a simple reply"
        return error, cookie


Scenario = Callable[[Peer, Path], Awaitable[None]]


def run_attached(
    tmp_path: Path, scenario: Scenario, flags: TransmissionFlag | None = None, use_uvloop=False
) -> None:
    """Serve a 4 MiB image on one end of a socketpair (no handshake) and run ``scenario``."""
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x5a" * 4 * MiB)

    async def main() -> None:
        server = NBDServer([Export("disk", RawImage(str(path)))])
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        await server.serve_socket(ours, DirectAttach("disk", flags))
        try:
            await scenario(Peer(theirs), path)
        finally:
            await server.shutdown()
            theirs.close()

    if use_uvloop:
        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_reads_and_writes_get_simple_replies(tmp_path, use_uvloop):
    async def scenario(peer: Peer, path: Path) -> None:
        await peer.send(WRITE, 4096, 8, cookie=0x0123_4567_89AB_CDEF, data=b"attached")
        assert await peer.reply() == (0, 0x0123_4567_89AB_CDEF)
        await peer.send(READ, 4090, 16, cookie=2)
        assert await peer.reply() == (0, 2)
        assert await peer.recv(16) == b"\x5a" * 6 + b"attached" + b"\x5a" * 2
        await peer.send(FLUSH, 0, 0, cookie=3)
        assert await peer.reply() == (0, 3)
        await peer.send(WRITE, 8192, 4, flags=FUA, cookie=4, data=b"fua!")
        assert await peer.reply() == (0, 4)
        assert path.read_bytes()[8192:8196] == b"fua!"

    run_attached(tmp_path, scenario, use_uvloop=use_uvloop)


def test_reads_of_zeros_are_not_holes_in_simple_mode(tmp_path):
    async def scenario(peer: Peer, path: Path) -> None:
        await peer.send(WRITE_ZEROES, 0, MiB, cookie=1)
        assert await peer.reply() == (0, 1)
        await peer.send(READ, 0, 65536, cookie=2)
        assert await peer.reply() == (0, 2)
        assert await peer.recv(65536) == bytes(65536)

    run_attached(tmp_path, scenario)


def test_many_requests_in_flight_all_get_simple_replies(tmp_path):
    async def scenario(peer: Peer, path: Path) -> None:
        batch = b""
        for i in range(128):
            batch += REQUEST.pack(REQUEST_MAGIC, 0, WRITE, 1000 + i, i * 4096, 512)
            batch += bytes([i]) * 512
        await peer.loop.sock_sendall(peer.sock, batch)
        cookies = {(await peer.reply()) for _ in range(128)}
        assert cookies == {(0, 1000 + i) for i in range(128)}
        data = path.read_bytes()
        assert all(data[i * 4096 : i * 4096 + 512] == bytes([i]) * 512 for i in range(128))

    run_attached(tmp_path, scenario)


def test_trim_and_zero_work_with_the_exports_flags(tmp_path):
    async def scenario(peer: Peer, path: Path) -> None:
        await peer.send(TRIM, 0, MiB, cookie=1)
        assert await peer.reply() == (0, 1)
        await peer.send(WRITE_ZEROES, MiB, MiB, flags=NO_HOLE, cookie=2)
        assert await peer.reply() == (0, 2)
        assert path.read_bytes()[: 2 * MiB] == bytes(2 * MiB)

    run_attached(tmp_path, scenario)


def test_errors_are_simple_replies_too(tmp_path):
    async def scenario(peer: Peer, path: Path) -> None:
        await peer.send(READ, 4 * MiB, 512, cookie=1)
        assert await peer.reply() == (EINVAL, 1)
        await peer.send(BLOCK_STATUS, 0, 4096, cookie=2)  # no metadata context without handshake
        assert await peer.reply() == (EINVAL, 2)
        await peer.send(READ, 0, 512, flags=DF, cookie=3)  # DF needs structured replies
        assert await peer.reply() == (EINVAL, 3)
        await peer.send(READ, 0, 4, cookie=4)
        assert await peer.reply() == (0, 4)
        assert await peer.recv(4) == b"\x5a" * 4

    run_attached(tmp_path, scenario)


def test_flags_given_by_the_attacher_are_enforced(tmp_path):
    read_only = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY

    async def scenario(peer: Peer, path: Path) -> None:
        await peer.send(WRITE, 0, 4, cookie=1, data=b"nope")
        assert await peer.reply() == (EPERM, 1)
        await peer.send(FLUSH, 0, 0, cookie=2)  # SEND_FLUSH was not given
        assert await peer.reply() == (EINVAL, 2)
        await peer.send(READ, 0, 4, cookie=3)
        assert await peer.reply() == (0, 3)
        assert await peer.recv(4) == b"\x5a" * 4
        assert path.read_bytes()[:4] == b"\x5a" * 4

    run_attached(tmp_path, scenario, flags=read_only)


def test_disc_closes_the_socket_after_in_flight_requests(tmp_path):
    async def scenario(peer: Peer, path: Path) -> None:
        await peer.send(WRITE, 0, 4, flags=FUA, cookie=1, data=b"last")
        await peer.send(DISC, 0, 0)
        assert await peer.reply() == (0, 1)
        assert await asyncio.wait_for(peer.loop.sock_recv(peer.sock, 1), 10) == b""
        assert path.read_bytes()[:4] == b"last"

    run_attached(tmp_path, scenario)
