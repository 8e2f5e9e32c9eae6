"""Accepted client sockets: the options each is tuned with, and how its peer is named."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final

#: Socket send buffer requested per connection (the kernel may cap it).
SEND_BUFFER: Final = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    """Low latency on TCP; a send buffer that holds whole large replies.

    With the default ~200 KiB buffer a 1 MiB read reply needs several trips
    through the event loop; with a larger one it leaves in one system call.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SEND_BUFFER)


def peer_name(transport: asyncio.BaseTransport) -> str:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6) of a TCP peer; ``unix`` for unix sockets and
    the kernel's socketpairs, which have no name."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):  # (host, port) or (host, port, flow, scope)
        return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    return "unix"
